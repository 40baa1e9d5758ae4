"""BERT-style encoder families (picked by config.json's model_type) against transformers."""

import json
import re

import ml_collections
import numpy as np
import pytest
import transformers

from ftjax import models, param_groups
from ftjax.errors import ConfigError

SUPPORTED = "['bert']"


def _model_config(pretrained, **overrides):
  values = dict(name="bert_classifier", pretrained=str(pretrained), num_classes=3,
                pooling="mean", head_init="zeros", dont_load=["head/.*"])
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def test_an_unsupported_model_type_is_refused_naming_the_file(tmp_path):
  config = transformers.DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=37)
  config.save_pretrained(tmp_path)
  message = (f"{tmp_path}/config.json: model_type='deberta-v2' is not supported by "
             f"bert_classifier; supported: {SUPPORTED}")
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    models.create(_model_config(tmp_path), seed=0)


def test_an_unsupported_option_of_a_family_is_refused_by_name(tmp_path):
  transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=37).save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()),
                              "position_embedding_type": "relative_key"}))
  with pytest.raises(ConfigError, match=r"config\.json: position_embedding_type='relative_key' "
                     r"is not supported for model_type='bert'; supported: 'absolute'"):
    models.create(_model_config(tmp_path), seed=0)


def test_an_arch_without_model_type_is_bert_and_a_named_one_is_checked():
  arch = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=16)
  _, params = models.create(_model_config("", arch=arch), seed=0)
  assert param_groups.flatten(params)["encoder/layers/1/intermediate/kernel"].shape == (32, 37)
  with pytest.raises(ConfigError, match=r"^config\.model\.arch: model_type='gpt2' is not "):
    models.create(_model_config("", arch=dict(arch, model_type="gpt2")), seed=0)

"""BERT-style encoder families (picked by config.json's model_type) against transformers."""

import json
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from conftest import fine_tuned_export, save_perturbed

from ftjax import models, param_groups, sharding
from ftjax.errors import ConfigError

SUPPORTED = "['bert', 'distilbert', 'electra', 'roberta', 'xlm-roberta']"
_SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=40)
# model_type -> a tiny config of transformers' own classes, and its encoder class.
FAMILIES = {
    "bert": (lambda: transformers.BertConfig(**_SIZES), transformers.BertModel),
    "distilbert": (lambda: transformers.DistilBertConfig(
        vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40,
        activation="gelu"), transformers.DistilBertModel),
    # Embeddings narrower than the layers: a projection between them.
    "electra": (lambda: transformers.ElectraConfig(**_SIZES, embedding_size=24),
                transformers.ElectraModel),
    "roberta": (lambda: transformers.RobertaConfig(**_SIZES, type_vocab_size=1, pad_token_id=1),
                transformers.RobertaModel),
    "xlm-roberta": (lambda: transformers.XLMRobertaConfig(**_SIZES, type_vocab_size=1,
                                                          pad_token_id=1),
                    transformers.XLMRobertaModel),
}


def _model_config(pretrained, **overrides):
  values = dict(name="bert_classifier", pretrained=str(pretrained), num_classes=3,
                pooling="mean", head_init="zeros", dont_load=["head/.*"])
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _save_random(model_type, folder, **overrides):
  """Saves a random transformers encoder of `model_type` (every weight, LayerNorms and
  biases included, drawn away from its initial value) to `folder`; returns it."""
  make_config, model_class = FAMILIES[model_type]
  config = make_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return save_perturbed(model_class, config, folder)


def _padded_inputs(pad_token_id):
  """Two sequences of 10 tokens, the first with 4 padding tokens at the end."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, size=(2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[0, 6:], mask[0, 6:] = pad_token_id, 0
  return ids, mask


def _ftjax_hidden(model, params, ids, mask):
  return np.asarray(model.module(params).encoder(jnp.asarray(ids), jnp.asarray(mask),
                                                 jnp.zeros_like(ids)))


def _torch_hidden(reference, ids, mask):
  with torch.no_grad():
    return reference(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def _max_difference(model_config, reference, pad_token_id):
  """max |ftjax - transformers| of the last hidden states, padding positions included."""
  ids, mask = _padded_inputs(pad_token_id)
  model, params = models.create(model_config, seed=0)
  return float(np.abs(_ftjax_hidden(model, params, ids, mask)
                      - _torch_hidden(reference, ids, mask)).max())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_encoder_matches_the_family_s_transformers_model(tmp_path, model_type):
  reference = _save_random(model_type, tmp_path)
  difference = _max_difference(_model_config(tmp_path), reference,
                               reference.config.pad_token_id)
  print(f"{model_type}: max |ftjax - transformers| = {difference:.2e}")
  assert difference <= 1e-4


@pytest.mark.parametrize("model_type, longest", [("bert", 40), ("roberta", 38)])
def test_sequences_longer_than_the_position_table_are_refused(tmp_path, model_type, longest):
  _save_random(model_type, tmp_path)
  model, params = models.create(_model_config(tmp_path), seed=0)
  ids = np.full((1, longest), 5, np.int32)
  assert _ftjax_hidden(model, params, ids, np.ones_like(ids)).shape == (1, longest, 32)
  ids = np.full((1, longest + 1), 5, np.int32)
  with pytest.raises(ConfigError, match=rf"sequences of {longest + 1} tokens need "
                     rf"{41} positions, but the encoder's max_position_embeddings is 40.*"
                     rf"set config.data.max_length to at most {longest}"):
    _ftjax_hidden(model, params, ids, np.ones_like(ids))


def test_a_roberta_folder_is_not_loaded_as_bert(tmp_path):
  roberta = _save_random("roberta", tmp_path)
  bert = transformers.BertModel(transformers.BertConfig(**_SIZES, type_vocab_size=1)).eval()
  bert.load_state_dict(roberta.state_dict())
  assert _max_difference(_model_config(tmp_path), roberta, 1) <= 1e-4
  # BERT numbers positions from 0, RoBERTa from pad_token_id + 1.
  assert _max_difference(_model_config(tmp_path), bert, 1) > 0.1


def test_an_unsupported_model_type_is_refused_naming_the_file(tmp_path):
  config = transformers.DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=37)
  config.save_pretrained(tmp_path)
  message = (f"{tmp_path}/config.json: model_type='deberta-v2' is not supported by "
             f"bert_classifier; supported: {SUPPORTED} (config.model.name=auto picks the "
             "model that reads a folder's model_type)")
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    models.create(_model_config(tmp_path), seed=0)


@pytest.mark.parametrize("model_type, field, value, supported", [
    ("bert", "position_embedding_type", "relative_key", "'absolute'"),
    ("roberta", "position_embedding_type", "relative_key_query", "'absolute'"),
    ("distilbert", "sinusoidal_pos_embds", True, "False"),
])
def test_an_unsupported_option_of_a_family_is_refused_by_name(tmp_path, model_type, field, value,
                                                              supported):
  FAMILIES[model_type][0]().save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
  with pytest.raises(ConfigError, match=re.escape(
      f"{path}: {field}={value!r} is not supported for model_type={model_type!r}; "
      f"supported: {supported}")):
    models.create(_model_config(tmp_path), seed=0)


def test_a_family_s_own_field_names_are_type_checked(tmp_path):
  FAMILIES["distilbert"][0]().save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "n_heads": "4"}))
  with pytest.raises(ConfigError, match=re.escape(f"{path}: n_heads='4': expected an integer")):
    models.create(_model_config(tmp_path), seed=0)


def test_an_arch_without_model_type_is_bert_and_a_named_one_is_checked():
  arch = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=16)
  _, params = models.create(_model_config("", arch=arch), seed=0)
  assert param_groups.flatten(params)["encoder/layers/1/intermediate/kernel"].shape == (32, 37)
  with pytest.raises(ConfigError, match=r"^config\.model\.arch: model_type='gpt2' is not "):
    models.create(_model_config("", arch=dict(arch, model_type="gpt2")), seed=0)


def test_every_family_has_bert_s_layer_paths_and_covered_axes(tmp_path):
  """Freezing presets, LoRA targets, layer-wise LR decay and sharding rules are written
  against BERT's paths: every family's layers have exactly those, and every parameter
  (ELECTRA's projection included) has logical axes and a place in the layout."""
  layer_paths, axes = {}, {}
  for model_type in FAMILIES:
    _save_random(model_type, tmp_path / model_type)
    model, params = models.create(_model_config(tmp_path / model_type), seed=0)
    # Raises for a parameter that no rule gives axes.
    axes[model_type] = sharding.logical_axes(params, model.axes)
    paths = param_groups.flatten(params)
    layer_paths[model_type] = {p for p in paths if p.startswith("encoder/layers/")}
    assert all(model.layout.depth(p, 2) == 3 for p in paths if p.startswith("encoder/embed"))
  assert axes["electra"]["encoder"]["embeddings"]["projection"]["kernel"] == (None, "embed")
  assert all(paths == layer_paths["bert"] for paths in layer_paths.values())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_merged_export_loads_in_the_family_s_transformers_class(tmp_path, model_type):
  source_model = _save_random(model_type, tmp_path / "source")
  config = _model_config(tmp_path / "source")
  model, params = models.create(config, seed=0)
  params, names = fine_tuned_export(model, params, config, tmp_path / "out")
  ids, mask = _padded_inputs(source_model.config.pad_token_id)
  exported = FAMILIES[model_type][1].from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_torch_hidden(exported, ids, mask),
                             _ftjax_hidden(model, params, ids, mask), atol=1e-4, rtol=0)
  if model_type == "bert":  # BertForSequenceClassification's head is one linear layer
    classifier = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(classifier.classifier.weight.detach().numpy(),
                                  np.asarray(params["head"]["kernel"]).T)
  else:  # a two-layer head: the export is the encoder alone
    assert not any(name.startswith("classifier") for name in names)

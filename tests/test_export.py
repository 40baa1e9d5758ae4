"""Exports load in transformers (merged) and peft (adapter) and reproduce ftjax's outputs."""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from configs import minilm_sentiment
from ftjax import models, param_groups
from ftjax.hub import export
from ftjax.peft import lora, methods

IDS = np.asarray([[101, 2023, 3185, 2001, 2307, 102, 0, 0],
                  [101, 1037, 11704, 2143, 999, 2009, 2001, 102]], np.int32)
MASK = np.asarray([[1] * 6 + [0] * 2, [1] * 8], np.int32)


def _trained_like(arg):
  """An adapted model whose adapters and head moved away from their initial values."""
  config = minilm_sentiment.get_config(arg)
  if config.model.num_classes == 0:  # classes from the data: three here
    config.unlock()
    config.model.num_classes = 3
    config.lock()
  model, params = models.create(config.model, seed=0)
  model, params = methods.adapt(config, model, params, seed=0)
  rng = np.random.default_rng(0)
  params = param_groups.map_with_path(
      lambda p, x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32)
      if ("lora_" in p or p.startswith("head/")) else x, params)
  return config, model, params


def _ftjax_hidden(model, params):
  return np.asarray(model.module(params).encoder(
      jnp.asarray(IDS), jnp.asarray(MASK), jnp.zeros_like(IDS)))


def _torch_hidden(torch_model):
  with torch.no_grad():
    return torch_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)
                       ).last_hidden_state.numpy()


@pytest.mark.parametrize("arg", ["peft=lora", "peft=dora"])
def test_merged_export_loads_in_transformers_with_the_same_outputs(tmp_path, arg):
  config, model, params = _trained_like(arg)
  expected = _ftjax_hidden(model, params)
  source, name_map, extra = models.hf_format(config.model)
  names = export.save_merged(model.module(params), str(tmp_path), source_dir=source,
                             name_map=name_map, extra=extra)
  assert "classifier.weight" in names and not any("lora" in n for n in names)
  reference = transformers.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
  np.testing.assert_allclose(_torch_hidden(reference), expected, atol=1e-4)
  classifier = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(classifier.classifier.weight.detach().numpy(),
                             np.asarray(params["head"]["kernel"]).T)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path)("a film")["input_ids"][0] == 101


def test_a_classifier_of_the_user_s_classes_exports_them_as_id2label(tmp_path):
  config, model, params = _trained_like("data=csv")
  source, name_map, extra = models.hf_format(config.model)
  export.save_merged(model.module(params), str(tmp_path), source_dir=source, name_map=name_map,
                     extra=extra, class_names=("billing", "sales", "tech"))
  classifier = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
  assert classifier.config.id2label == {0: "billing", 1: "sales", 2: "tech"}
  assert classifier.config.label2id == {"billing": 0, "sales": 1, "tech": 2}
  np.testing.assert_allclose(classifier.classifier.weight.detach().numpy(),
                             np.asarray(params["head"]["kernel"]).T)


@pytest.mark.parametrize("arg", ["peft=lora", "peft=dora", "peft=lora,rslora"])
def test_peft_adapter_reproduces_ftjax_outputs(tmp_path, arg):
  config, model, params = _trained_like(arg)
  expected = _ftjax_hidden(model, params)
  source, name_map, _ = models.hf_format(config.model)
  spec = lora.LoraSpec.from_config(config.peft)
  export.save_peft_adapter(model.module(params), str(tmp_path), spec=spec, source_dir=source,
                           name_map=name_map)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["query", "value"] and saved["r"] == 8
  base = transformers.BertModel.from_pretrained(source, add_pooling_layer=False).eval()
  assert float(np.abs(_torch_hidden(base) - expected).max()) > 1e-3  # the adapter matters
  adapted = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  np.testing.assert_allclose(_torch_hidden(adapted), expected, atol=1e-4)


def test_merge_without_adapters_is_the_identity():
  config = minilm_sentiment.get_config()
  model, params = models.create(config.model, seed=0)
  merged = lora.merge(model.module(params))
  flat = param_groups.flatten(nnx.to_pure_dict(nnx.state(merged)))
  for path, value in param_groups.flatten(params).items():
    np.testing.assert_array_equal(flat[path], value)


def test_export_a_trained_lora_run(debug_config, tmp_path):
  from ftjax import trainer  # pylint: disable=g-import-not-at-top
  from launch import export as export_launcher  # pylint: disable=g-import-not-at-top
  config = debug_config
  config.unlock()
  config.peft.method = "lora"
  config.lock()
  trainer.run(config, str(tmp_path / "run"))
  assert len(export_launcher.export_run(str(tmp_path / "run"), str(tmp_path / "merged"),
                                        "merged")) == 103  # 101 encoder tensors + head
  export_launcher.export_run(str(tmp_path / "run"), str(tmp_path / "adapter"), "adapter")
  merged = transformers.BertModel.from_pretrained(tmp_path / "merged",
                                                  add_pooling_layer=False).eval()
  source, _, _ = models.hf_format(config.model)
  base = transformers.BertModel.from_pretrained(source, add_pooling_layer=False)
  adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  np.testing.assert_allclose(_torch_hidden(merged), _torch_hidden(adapted), atol=1e-4)

"""ModernBERT (model_type "modernbert") against transformers' ModernBertModel and
ModernBertForSequenceClassification."""

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from conftest import ONE_DEVICE, fine_tuned_export, save_perturbed, ticket_run_config

from ftjax import config as config_lib
from ftjax import models, param_groups, sharding, trainer
from ftjax.errors import ConfigError
from ftjax.hub import export
from ftjax.peft import lora, methods

# 3 layers: global, local, global; a local token sees 2 positions either side of it, so
# on 12 tokens the window matters. Rotary bases far apart, so swapping them shows.
_SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=24, max_position_embeddings=64, global_attn_every_n_layers=2,
              local_attention=4, global_rope_theta=1000.0, local_rope_theta=10.0,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# Everything biased (the Hub's checkpoints have no bias anywhere), mean pooling.
_BIASED = dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
               classifier_pooling="mean")


def _save_random(folder, model_class=transformers.ModernBertForSequenceClassification,
                 **overrides):
  """Saves a random transformers ModernBERT of `model_class` (every weight drawn away
  from its initial value) to `folder`; returns it."""
  config = transformers.ModernBertConfig(**{**_SIZES, **overrides}, num_labels=3,
                                         attn_implementation="eager")
  return save_perturbed(model_class, config, folder)


def _model_config(pretrained, **overrides):
  values = dict(name="modernbert_classifier", pretrained=str(pretrained), num_classes=3,
                pooling="cls", head_init="zeros", dont_load=[], arch={})
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _padded_inputs():
  """Two sequences of 12 tokens, the first with 5 padding tokens at the end."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, size=(2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[0, 7:], mask[0, 7:] = 0, 0
  return ids, mask


def _ftjax_outputs(model, params, ids, mask):
  """(last hidden states, logits)."""
  module = model.module(params)
  hidden = module.encoder(jnp.asarray(ids), jnp.asarray(mask))
  logits = module({"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)})
  return np.asarray(hidden), np.asarray(logits)


def _torch_outputs(reference, ids, mask):
  """(last hidden states, logits) of a ModernBertForSequenceClassification."""
  inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask))
  with torch.no_grad():
    return (reference.model(**inputs).last_hidden_state.numpy(),
            reference(**inputs).logits.numpy())


def _differences(ours, theirs):
  return tuple(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("overrides", [{}, _BIASED], ids=["hub_like", "biased"])
def test_hidden_states_and_logits_match_transformers(tmp_path, overrides):
  reference = _save_random(tmp_path, **overrides)
  pooling = overrides.get("classifier_pooling", "cls")
  model, params = models.create(_model_config(tmp_path, pooling=pooling), seed=0)
  ids, mask = _padded_inputs()
  ours = _ftjax_outputs(model, params, ids, mask)
  hidden, logits = _differences(ours, _torch_outputs(reference, ids, mask))
  print(f"max |ftjax - transformers|: hidden states {hidden:.2e}, logits {logits:.2e}")
  assert hidden <= 1e-4 and logits <= 1e-4
  if overrides:
    return
  # What the reference does differently matters: without the window, with one rotary
  # base for both kinds of layer, or with a norm before the first attention, its
  # outputs move far from ours.
  ablations = {
      "no window": lambda: setattr(reference.config, "local_attention", 100),
      "one base": lambda: reference.model.rotary_emb.sliding_attention_inv_freq.copy_(
          reference.model.rotary_emb.full_attention_inv_freq),
      "first norm": lambda: setattr(reference.model.layers[0], "attn_norm",
                                    reference.model.layers[1].attn_norm),
  }
  rotary = reference.model.rotary_emb
  kept = (reference.config.local_attention, rotary.sliding_attention_inv_freq.clone(),
          reference.model.layers[0].attn_norm)
  for name, ablate in ablations.items():
    ablate()
    moved = _differences(ours, _torch_outputs(reference, ids, mask))[0]
    print(f"{name}: hidden states differ by {moved:.2e}")
    assert moved > 1e-2, name
    reference.config.local_attention = kept[0]
    rotary.sliding_attention_inv_freq.copy_(kept[1])
    reference.model.layers[0].attn_norm = kept[2]
  assert _differences(ours, _torch_outputs(reference, ids, mask))[0] <= 1e-4  # restored


def test_a_checkpoint_s_head_is_loaded_where_it_has_one(tmp_path):
  """A masked LM's prediction head is ModernBertForSequenceClassification's `head`, as
  transformers loads it; the classifier starts new. A ModernBertModel has neither."""
  masked_lm = _save_random(tmp_path / "mlm", transformers.ModernBertForMaskedLM)
  _, params = models.create(_model_config(tmp_path / "mlm"), seed=0)
  np.testing.assert_array_equal(params["head"]["dense"]["kernel"],
                                masked_lm.head.dense.weight.detach().numpy().T)
  assert not np.asarray(params["classifier"]["kernel"]).any()  # head_init zeros
  _save_random(tmp_path / "base", transformers.ModernBertModel)
  _, params = models.create(_model_config(tmp_path / "base"), seed=0)
  assert params["head"]["dense"]["kernel"].shape == (32, 32)


def _write_config(folder, **fields):
  transformers.ModernBertConfig(**_SIZES).save_pretrained(folder)
  path = folder / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
  return path


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_activation="silu"),
     "hidden_activation='silu' is not supported; supported: ['gelu', 'gelu_new', 'relu']"),
    (dict(classifier_activation="tanh"), "classifier_activation='tanh' is not supported"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0},
                           "sliding_attention": {"rope_type": "default"}}),
     "rope_parameters.full_attention.rope_type='linear' is not supported; supported: "
     "['default']"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     "layer_types=['full_attention', 'chunked_attention', 'full_attention']: expected one "
     "of ['full_attention', 'sliding_attention'] for each of the 3 layers"),
    (dict(classifier_pooling="max"), "classifier_pooling='max' is not supported; "
     "supported: ['cls', 'mean']"),
    (dict(classifier_pooling="mean"), "classifier_pooling='mean', but "
     "config.model.pooling='cls': a ModernBERT classifier pools as its config says"),
    (dict(local_attention="4"), "local_attention='4': expected an integer"),
    (dict(model_type="bert"), "model_type='bert' is not supported by modernbert_classifier; "
     "supported: ['modernbert']"),
])
def test_an_unsupported_option_is_refused_naming_the_file_and_field(tmp_path, fields, message):
  path = _write_config(tmp_path, **fields)
  with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {message}')}"):
    models.create(_model_config(tmp_path), seed=0)


def test_the_hub_s_original_config_fields_are_read(tmp_path):
  """Configs on the Hub name the pattern and bases by their transformers 4 fields."""
  path = _write_config(tmp_path)
  raw = json.loads(path.read_text())
  for field in ("layer_types", "rope_parameters"):
    del raw[field]
  path.write_text(json.dumps(dict(raw, global_attn_every_n_layers=3, global_rope_theta=7.0)))
  arch = models.modernbert.ModernBertConfig.from_json(str(path))
  assert arch.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
  assert (arch.global_rope_theta, arch.local_rope_theta) == (7.0, 10_000.0)


def test_auto_and_arch(tmp_path):
  _write_config(tmp_path)
  assert models.resolve_name(_model_config(tmp_path, name="auto"),
                             "classification") == "modernbert_classifier"
  arch = dict(model_type="modernbert", **{k: v for k, v in _SIZES.items() if "_id" not in k})
  config = _model_config("", name="auto", arch=arch)
  assert models.resolve_name(config, "classification") == "modernbert_classifier"
  _, params = models.create(_model_config("", arch=arch), seed=0)
  assert "attn_norm" not in params["encoder"]["layers"][0]  # the identity
  assert params["encoder"]["layers"][1]["mlp"]["Wi"]["kernel"].shape == (32, 48)


@pytest.mark.parametrize("model_class", [transformers.ModernBertModel,
                                         transformers.ModernBertForMaskedLM,
                                         transformers.ModernBertForSequenceClassification])
def test_merged_export_loads_as_a_transformers_sequence_classifier(tmp_path, model_class):
  _save_random(tmp_path / "source", model_class)
  config = _model_config(tmp_path / "source")
  model, params = models.create(config, seed=0)
  params, names = fine_tuned_export(model, params, config, tmp_path / "out")
  assert {"classifier.weight", "head.dense.weight"} <= set(names)
  assert not any(name.startswith("decoder") for name in names)  # the masked LM's
  exported = transformers.ModernBertForSequenceClassification.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  assert exported.config.id2label == {0: "a", 1: "b", 2: "c"}
  ids, mask = _padded_inputs()
  hidden, logits = _differences(_ftjax_outputs(model, params, ids, mask),
                                _torch_outputs(exported, ids, mask))
  assert hidden <= 1e-4 and logits <= 1e-4


def _run_config(pretrained, **peft):
  config = config_lib.defaults()
  with config.unlocked():
    config.model.update(_model_config(pretrained))
    config.peft.update(peft)
  return config


def test_layout_axes_and_adapters_on_the_fused_projections(tmp_path):
  """Layer-wise decay and freezing see the blocks; every parameter has sharding axes;
  LoRA adapts the fused Wqkv / Wi / Wo whole, trains them with the head, and exports
  them as PEFT names them."""
  reference = _save_random(tmp_path)
  config = _run_config(tmp_path, method="lora", target=r".*/(Wqkv|Wi|Wo)/kernel")
  model, params = models.create(config.model, seed=0)
  axes = dict(zip(param_groups.flatten(params), jax.tree.leaves(
      sharding.logical_axes(params, model.axes), is_leaf=lambda x: isinstance(x, tuple))))
  assert axes["encoder/layers/1/attn/Wqkv/kernel"] == ("embed", "heads")
  assert axes["encoder/layers/1/mlp/Wo/kernel"] == ("mlp", "embed")
  depths = param_groups.flatten(model.layout.depths(params, params))
  assert depths["encoder/embeddings/tok_embeddings/embedding"] == 4
  assert depths["encoder/layers/0/mlp/Wi/kernel"] == 3
  assert depths["encoder/final_norm/scale"] == depths["head/dense/kernel"] == 0
  model, adapted = methods.adapt(config, model, params, seed=0)
  trainable, frozen = methods.split(config, model, adapted)
  trained = set(param_groups.flatten(trainable))
  assert {p for p in trained if "lora" in p} == {
      f"encoder/layers/{i}/{m}/lora_{ab}" for i in range(3) for ab in "ab"
      for m in ("attn/Wqkv", "attn/Wo", "mlp/Wi", "mlp/Wo")}
  assert {p for p in trained if "lora" not in p} == {
      "head/dense/kernel", "head/norm/scale", "classifier/kernel", "classifier/bias"}
  assert "encoder/layers/0/attn/Wqkv/kernel" in param_groups.flatten(frozen)
  # A PEFT adapter of the fused modules reproduces the adapted model in transformers.
  rng = np.random.default_rng(0)
  adapted = param_groups.map_with_path(
      lambda p, x: np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32)
      if "lora_" in p else x, adapted)
  source, name_map, _ = models.hf_format(config.model)
  export.save_peft_adapter(model.module(adapted), str(tmp_path / "adapter"), source_dir=source,
                           spec=lora.LoraSpec.from_config(config.peft), name_map=name_map)
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["Wi", "Wo", "Wqkv"]
  ids, mask = _padded_inputs()
  expected = _ftjax_outputs(model, adapted, ids, mask)
  assert _differences(expected, _torch_outputs(reference, ids, mask))[0] > 1e-3
  with_adapter = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
  hidden, logits = _differences(expected, _torch_outputs(with_adapter.base_model.model, ids,
                                                         mask))
  assert hidden <= 1e-4 and logits <= 1e-4


def test_sharded_logits_equal_one_device(tmp_path):
  _save_random(tmp_path, **_BIASED)
  model, params = models.create(_model_config(tmp_path, pooling="mean"), seed=0)
  ids, mask = _padded_inputs()
  batch = {"input_ids": jnp.asarray(np.tile(ids, (4, 1))),
           "attention_mask": jnp.asarray(np.tile(mask, (4, 1)))}
  expected = model.apply(params, batch, train=False)
  mesh_config = config_lib.defaults().mesh
  mesh_config.update(data=1, fsdp=4, tensor=2)
  mesh = sharding.make_mesh(mesh_config)
  rules = sharding.Rules.from_config(sharding.DEFAULT_RULES)
  placed = jax.device_put(params, sharding.param_shardings(params, model.axes, rules, mesh))
  with sharding.activation_sharding(mesh, rules):
    logits = jax.jit(lambda p, b: model.apply(p, b, train=False))(
        placed, jax.device_put(batch, sharding.batch_sharding(mesh, rules)))
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def _save_tokenizer(folder):
  """A word-level tokenizer.json ([CLS] text [SEP], [PAD] = 0) within the tiny vocabulary."""
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "ticket", "about", "billing", "tech", "sales",
           *map(str, range(30))]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tokenizer.save(str(folder / "tokenizer.json"))


def test_a_modernbert_folder_trains_with_lora_on_its_fused_projections(tmp_path, debug_config):
  """A run from a ModernBertModel folder and its tokenizer: auto picks the model, the
  text pipeline feeds it, the new head and the adapters learn."""
  folder = tmp_path / "model"
  _save_random(folder, transformers.ModernBertModel, classifier_pooling="mean")
  _save_tokenizer(folder)
  config = ticket_run_config(debug_config, folder, tmp_path, **{
      "peft.method": "lora", "peft.target": r".*/(Wqkv|Wi|Wo)/kernel"})
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert final["validation"]["loss"] < np.log(3)  # below the zero head's
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded["model"]["name"] == "modernbert_classifier"

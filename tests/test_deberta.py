"""DeBERTa-v2 / v3 (model_type deberta-v2) against transformers' DebertaV2Model."""

import csv
import json
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

from conftest import ONE_DEVICE, with_overrides
from ftjax import models, param_groups, sharding, trainer
from ftjax.data.tokenizer import load_tokenizer
from ftjax.errors import ConfigError, DataError
from ftjax.hub import export
from ftjax.models import deberta
from ftjax.peft import lora, methods

# microsoft/deberta-v3-*'s options at a tiny size: relative attention in 8 log buckets
# (distances beyond 4 share them), a normalised position table shared through the
# query/key projections, no absolute positions, no token types.
V3 = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=37, max_position_embeddings=40, relative_attention=True,
          position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
          pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
          max_relative_positions=-1)
VARIANTS = {
    "v3": {},
    "own_position_projections": dict(share_att_key=False),
    "no_log_buckets": dict(position_buckets=-1),
    "absolute_positions_and_token_types": dict(position_biased_input=True, type_vocab_size=2),
    "c2p_only_unnormalised": dict(pos_att_type=["c2p"], share_att_key=False, norm_rel_ebd="none"),
    # microsoft/deberta-v2-xlarge's options: a convolution beside the first block.
    "v2_conv": dict(conv_kernel_size=3, conv_act="gelu", pos_att_type="p2c|c2p"),
}


def _save_random(folder, model_class=transformers.DebertaV2Model, **overrides):
  """Saves a random transformers DeBERTa of the V3 options with `overrides` (every weight,
  LayerNorms and biases included, drawn away from its initial value); returns it."""
  torch.manual_seed(0)
  model = model_class(transformers.DebertaV2Config(**{**V3, **overrides})).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  model.save_pretrained(folder)
  return model


def _save_tokenizer(folder):
  """A DeBERTa-v3 tokenizer (a sentencepiece unigram vocabulary) saved by transformers,
  which writes the tokenizer.json that ftjax reads."""
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "▁", "▁ticket", "▁about",
            "▁billing", "▁tech", "▁sales", *"0123456789"]
  tokenizer = transformers.DebertaV2Tokenizer(vocab=[(p, 0.0 if p[0] == "[" else -1.0)
                                                     for p in pieces])
  tokenizer.save_pretrained(folder)
  return tokenizer


def _model_config(pretrained, **overrides):
  values = dict(name="deberta_classifier", pretrained=str(pretrained), num_classes=3,
                pooling="mean", head_init="zeros", dont_load=[])
  return ml_collections.ConfigDict({**values, **overrides})


def _inputs():
  """Two sequences of 10 tokens, the first with 4 padding tokens at the end; token types."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, size=(2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[0, 6:], mask[0, 6:] = 0, 0
  types = (np.arange(10) >= 5).astype(np.int32)[None].repeat(2, 0)
  return ids, mask, types


def _torch_hidden(reference, ids, mask, types):
  with torch.no_grad():
    return reference(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types, dtype=torch.long)
                     ).last_hidden_state.numpy()


def _ftjax_hidden(model, params, ids, mask, types):
  return np.asarray(model.module(params).encoder(jnp.asarray(ids), jnp.asarray(mask),
                                                 jnp.asarray(types)))


def _perturbed(params, scale=0.05, seed=1):
  rng = np.random.default_rng(seed)
  return param_groups.map_with_path(
      lambda _, x: np.asarray(x) + scale * rng.normal(size=x.shape).astype(np.float32), params)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_and_logits_match_transformers(tmp_path, variant):
  reference = _save_random(tmp_path, **VARIANTS[variant])
  model, params = models.create(_model_config(tmp_path), seed=0)
  params = {**params, "head": _perturbed(params["head"])}
  ids, mask, types = _inputs()
  expected = _torch_hidden(reference, ids, mask, types)
  hidden = _ftjax_hidden(model, params, ids, mask, types)
  difference = float(np.abs(hidden - expected).max())
  print(f"{variant}: max |ftjax - transformers| = {difference:.2e}")
  assert difference <= 1e-4
  # The classifier: BERT's masked mean pooling and linear head on those hidden states.
  logits = model.apply(params, {"input_ids": ids, "attention_mask": mask,
                                "token_type_ids": types}, train=False)
  weights = mask[..., None]
  pooled = (expected * weights).sum(1) / weights.sum(1)
  np.testing.assert_allclose(logits, pooled @ params["head"]["kernel"] + params["head"]["bias"],
                             atol=1e-4, rtol=0)


def test_log_buckets_are_transformers_to_the_edges():
  from transformers.models.deberta_v2 import modeling_deberta_v2 as reference
  layer = torch.zeros(1, 700, 1)
  for buckets, max_position in ((256, 512), (8, 40), (-1, 512)):
    expected = reference.build_relative_position(layer, layer, buckets, max_position)[0]
    np.testing.assert_array_equal(deberta.relative_positions(700, buckets, max_position),
                                  expected.numpy())


def test_a_sequence_classification_checkpoint_loads_without_its_pooler(tmp_path):
  """DebertaV2ForSequenceClassification's tensors sit under `deberta.`; its pooler and
  classifier have no place in ftjax's head, which starts new."""
  reference = _save_random(tmp_path, transformers.DebertaV2ForSequenceClassification,
                           num_labels=5)
  model, params = models.create(_model_config(tmp_path), seed=0)
  assert not np.asarray(params["head"]["kernel"]).any()
  ids, mask, types = _inputs()
  np.testing.assert_allclose(_ftjax_hidden(model, params, ids, mask, types),
                             _torch_hidden(reference.deberta, ids, mask, types), atol=1e-4)


@pytest.mark.parametrize("variant", ["v3", "v2_conv"])
def test_merged_export_loads_as_debertav2model(tmp_path, variant):
  _save_random(tmp_path / "source", transformers.DebertaV2ForSequenceClassification,
               **VARIANTS[variant])
  tokenizer = _save_tokenizer(tmp_path / "source")
  config = _model_config(tmp_path / "source")
  model, params = models.create(config, seed=0)
  params = _perturbed(params)  # every weight moved, as by fine-tuning
  source, name_map, extra = models.hf_format(config)
  names = export.save_merged(model.module(params), str(tmp_path / "out"), source_dir=source,
                             name_map=name_map, extra=extra, class_names=("a", "b", "c"))
  assert not any(name.startswith(("classifier", "pooler")) for name in names)
  exported = transformers.DebertaV2Model.from_pretrained(tmp_path / "out").eval()
  text = "ticket 7 about sales"
  assert (transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(text)["input_ids"]
          == tokenizer(text)["input_ids"])
  ids, mask, types = _inputs()
  np.testing.assert_allclose(_torch_hidden(exported, ids, mask, types),
                             _ftjax_hidden(model, params, ids, mask, types), atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, field, value, supported", [
    (dict(model_type="deberta"), "model_type", "deberta", None),
    (dict(pos_att_type=["p2c", "p2p"]), "pos_att_type", ("p2c", "p2p"), "any of ['c2p', 'p2c']"),
    (dict(norm_rel_ebd="batch_norm"), "norm_rel_ebd", "batch_norm",
     "one of ['none', 'layer_norm']"),
    (dict(conv_kernel_size=4), "conv_kernel_size", 4, "0 (no convolution) or an odd size"),
    (dict(conv_kernel_size=3, conv_act="swish"), "conv_act", "swish",
     "['gelu', 'gelu_new', 'relu', 'tanh']"),
    (dict(attention_head_size=16), "attention_head_size", 16,
     "hidden_size / num_attention_heads = 8"),
])
def test_an_option_not_reproduced_is_refused_naming_the_file(tmp_path, change, field, value,
                                                             supported):
  transformers.DebertaV2Config(**V3).save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  if supported is None:
    message = (f"{path}: model_type='deberta' is not supported by deberta_classifier; "
               "supported: ['deberta-v2']")
  else:
    message = (f"{path}: {field}={value!r} is not supported for model_type='deberta-v2'; "
               f"supported: {supported}")
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    models.create(_model_config(tmp_path), seed=0)


def test_auto_picks_deberta_from_the_folder_or_the_arch(tmp_path):
  transformers.DebertaV2Config(**V3).save_pretrained(tmp_path)
  assert models.resolve_name(_model_config(tmp_path, name="auto"),
                             "classification") == "deberta_classifier"
  arch = dict(V3, model_type="deberta-v2")
  auto = _model_config("", name="auto", arch=arch)
  assert models.resolve_name(auto, "classification") == "deberta_classifier"
  _, params = models.create(_model_config("", arch=arch), seed=0)  # random weights
  assert param_groups.flatten(params)["encoder/rel_embeddings/embedding"].shape == (16, 32)


def test_longer_sequences_than_the_absolute_position_table_are_refused(tmp_path):
  _save_random(tmp_path, position_biased_input=True)
  model, params = models.create(_model_config(tmp_path), seed=0)
  ids = np.full((1, 41), 5, np.int32)
  with pytest.raises(ConfigError, match="sequences of 41 tokens need 41 positions, but the "
                     "encoder's max_position_embeddings is 40"):
    _ftjax_hidden(model, params, ids, np.ones_like(ids), np.zeros_like(ids))


def test_axes_layout_and_adapters_cover_deberta_s_own_parameters(tmp_path, debug_config):
  _save_random(tmp_path, share_att_key=False, conv_kernel_size=3)
  model, params = models.create(_model_config(tmp_path), seed=0)
  axes = sharding.logical_axes(params, model.axes)["encoder"]  # raises for a parameter left out
  assert axes["layers"][1]["attention"]["pos_key"]["kernel"] == ("embed", "heads")
  assert axes["rel_embeddings"]["embedding"] == (None, "embed")
  assert axes["conv"]["conv"]["kernel"] == (None, None, "embed")
  paths = param_groups.flatten(params)
  depths = {p: model.layout.depth(p, 2) for p in paths}
  assert depths["encoder/rel_norm/scale"] == depths["encoder/conv/conv/bias"] == 3
  assert depths["encoder/layers/0/attention/pos_query/bias"] == 2
  assert depths["head/kernel"] == 0
  # BERT's default LoRA targets: DeBERTa's query and value projections, not pos_query.
  config = with_overrides(debug_config, **{"peft.method": "lora"})
  adapted, adapted_params = methods.adapt(config, model, params, seed=0)
  lora_paths = [p for p in param_groups.flatten(adapted_params) if p.endswith("lora_a")]
  assert sorted(lora_paths) == [f"encoder/layers/{i}/attention/{m}/lora_a"
                                for i in (0, 1) for m in ("query", "value")]
  ids, mask, types = _inputs()
  np.testing.assert_allclose(_ftjax_hidden(adapted, adapted_params, ids, mask, types),
                             _ftjax_hidden(model, params, ids, mask, types), atol=1e-6)


def test_a_peft_adapter_export_reproduces_ftjax_in_peft(tmp_path, debug_config):
  """LoRA on the query projection that, with share_att_key, projects the relative
  positions too: PEFT's adapter on query_proj does the same."""
  base = _save_random(tmp_path)
  config = with_overrides(debug_config, **{"peft.method": "lora"})
  model, params = models.create(_model_config(tmp_path), seed=0)
  model, params = methods.adapt(config, model, params, seed=0)
  rng = np.random.default_rng(0)
  params = param_groups.map_with_path(
      lambda p, x: np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32)
      if "lora_" in p else x, params)
  export.save_peft_adapter(model.module(params), str(tmp_path / "adapter"),
                           spec=lora.LoraSpec.from_config(config.peft), source_dir=str(tmp_path),
                           name_map=models.hf_format(_model_config(tmp_path))[1])
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["query_proj", "value_proj"]
  ids, mask, types = _inputs()
  expected = _ftjax_hidden(model, params, ids, mask, types)
  assert float(np.abs(_torch_hidden(base, ids, mask, types) - expected).max()) > 1e-3
  adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  np.testing.assert_allclose(_torch_hidden(adapted, ids, mask, types), expected, atol=1e-4)


def test_a_folder_with_only_a_sentencepiece_model_says_how_to_write_tokenizer_json(tmp_path):
  (tmp_path / "spm.model").write_bytes(b"")
  with pytest.raises(DataError, match=re.escape(
      f"{tmp_path}/tokenizer.json: tokenizer file not found; {tmp_path} has a sentencepiece "
      "spm.model: write its tokenizer.json with transformers: "
      "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")):
    load_tokenizer(str(tmp_path / "tokenizer.json"), 16)


def test_a_deberta_folder_trains_with_its_own_tokenizer(tmp_path, debug_config):
  folder = tmp_path / "model"
  _save_random(folder)
  tokenizer = _save_tokenizer(folder)
  encoded = load_tokenizer(str(folder / "tokenizer.json"), 10).encode(["ticket 12 about tech"])
  assert encoded["input_ids"].tolist() == [tokenizer("ticket 12 about tech")["input_ids"]
                                           + [tokenizer.pad_token_id] * 2]
  rows = [("ticket {i} about {topic}".format(i=i, topic=t), t)
          for i, t in enumerate(["billing", "tech", "sales"] * 10)]
  with open(tmp_path / "t.csv", "w", newline="") as f:
    csv.writer(f).writerows([("body", "queue"), *rows])
  config = with_overrides(debug_config, **{
      "model.name": "auto", "model.pretrained": str(folder), "model.num_classes": 0,
      "data.name": "csv", "data.files.train": str(tmp_path / "t.csv"),
      "data.columns.text": "body", "data.columns.label": "queue",
      "data.data_dir": str(tmp_path / "tfds"), "peft.method": "lora"})
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert final["validation"]["loss"] < np.log(3)  # below the zero head's
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded["model"]["name"] == "deberta_classifier"

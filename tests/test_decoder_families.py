"""Mistral, Qwen3, windowed Qwen2, Phi-3, Gemma 2, Gemma 3 and GPT-2 through the one decoder,
against transformers."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import tiny_decoders
from ftjax import generate, models, param_groups, sharding
from ftjax.errors import ConfigError, WeightsError
from ftjax.hub import export
from ftjax.hub import llama as llama_hub
from ftjax.hub import safetensors_io
from ftjax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_WINDOW = 3
_LENGTH = 12  # longer than the window, so that it matters
_EOS = 2

# Gemma 3's rotary bases: linear scaling on global layers, a base of its own on local ones.
_GEMMA3_ROPE = {"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=100.0)}

# case -> (transformers family, config overrides, config.json edits each of which changes
# the logits: what the case checks is applied)
_CASES = {
    "mistral": ("Mistral", dict(sliding_window=_WINDOW, head_dim=16),
                [dict(sliding_window=None)]),
    "qwen3": ("Qwen3", dict(head_dim=16), []),
    # The window on the second layer only (max_window_layers=1), with q/k norms.
    "qwen3_window": ("Qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=_WINDOW,
                                   max_window_layers=1), [dict(use_sliding_window=False)]),
    "qwen2_window": ("Qwen2", dict(use_sliding_window=True, sliding_window=_WINDOW,
                                   max_window_layers=0), [dict(use_sliding_window=False)]),
    # Fused q/k/v and gate/up projections, a window on every layer.
    "phi3": ("Phi3", dict(sliding_window=_WINDOW), [dict(sliding_window=None)]),
    # Local (windowed) and global layers alternating, soft-capped attention scores and
    # logits, and a query scale other than head_dim's.
    "gemma2": ("Gemma2", dict(head_dim=16, sliding_window=_WINDOW, attn_logit_softcapping=2.0,
                              final_logit_softcapping=5.0, query_pre_attn_scalar=24),
               [dict(sliding_window=None), dict(attn_logit_softcapping=None),
                dict(final_logit_softcapping=None), dict(query_pre_attn_scalar=16)]),
    # q/k norms, and sliding layers rotating with their own base.
    "gemma3": ("Gemma3Text", dict(head_dim=16, sliding_window=_WINDOW, sliding_window_pattern=2,
                                  query_pre_attn_scalar=24, rope_parameters=_GEMMA3_ROPE),
               [dict(sliding_window=None),
                dict(rope_parameters={**_GEMMA3_ROPE,
                                      "sliding_attention": dict(rope_theta=1e6)})]),
    # LayerNorms, learned positions, a fused c_attn, a plain GELU MLP, biases everywhere.
    "gpt2": ("GPT2", dict(), [dict(layer_norm_epsilon=1.0)]),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """case -> (folder, transformers model, ftjax model, params), each built once."""
  cache = {}

  def get(case):
    if case not in cache:
      family, overrides, _ = _CASES[case]
      directory = str(tmp_path_factory.mktemp(case))
      reference = tiny_decoders.save_random(directory, family, **{**_TINY, **overrides},
                                            eos_token_id=_EOS, pad_token_id=0)
      cache[case] = (directory, reference, *models.create(_config(pretrained=directory), seed=0))
    return cache[case]

  return get


_config = tiny_decoders.model_config
_batch = tiny_decoders.padded_batch


def _logits(model, params, batch):
  return np.asarray(jax.jit(lambda p, b: model.apply(p, b, train=False))(params, batch))


def _reference_logits(reference, batch):
  with torch.no_grad():
    return reference(input_ids=torch.tensor(np.asarray(batch["input_ids"])),
                     attention_mask=torch.tensor(np.asarray(batch["segment_ids"])),
                     position_ids=torch.tensor(np.asarray(batch["positions"]),
                                               dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", sorted(_CASES))
def test_logits_match_transformers(case, tiny, record_property):
  directory, reference, model, params = tiny(case)
  ids = np.random.default_rng(0).integers(3, _TINY["vocab_size"], (2, _LENGTH))
  batch = _batch(ids, [_LENGTH, _LENGTH - 4])
  logits = _logits(model, params, batch)
  expected = _reference_logits(reference, batch)
  real = np.asarray(batch["segment_ids"]).astype(bool)
  diff = float(np.max(np.abs(logits[real] - expected[real])))
  record_property("max_abs_diff", diff)
  print(f"{case}: max abs logit difference {diff:.2e} (logits up to "
        f"{np.max(np.abs(expected)):.1f})")
  assert diff <= 1e-4, (case, diff)
  assert np.max(np.abs(expected)) > 1.0  # the comparison is not of near-zero logits
  # The same weights without each checked setting give other logits: it was applied.
  with open(f"{directory}/config.json") as f:
    raw = json.load(f)
  for edit in _CASES[case][2]:
    other, _ = models.create(_config(arch={**raw, **edit}), seed=0)
    assert np.max(np.abs(_logits(other, params, batch)[real] - expected[real])) > 1e-2, edit


def test_window_and_qk_norms_are_read_as_transformers_applies_them(tiny):
  configs = {case: llama.LlamaConfig.from_json(f"{tiny(case)[0]}/config.json")
             for case in _CASES}
  assert configs["mistral"].sliding_window == _WINDOW and configs["mistral"].head_dim == 16
  assert [configs["mistral"].layer_window(i) for i in range(2)] == [_WINDOW, _WINDOW]
  assert [configs["qwen3_window"].layer_window(i) for i in range(2)] == [None, _WINDOW]
  assert [configs["qwen2_window"].layer_window(i) for i in range(2)] == [_WINDOW, _WINDOW]
  assert configs["qwen3"].sliding_window is None and configs["qwen3"].qk_norm
  assert not configs["qwen3"].qkv_bias and not configs["mistral"].qk_norm
  # Qwen3 checkpoints carry a window switched off by use_sliding_window: not applied.
  off = llama.LlamaConfig.from_dict(dict(_TINY, model_type="qwen3", sliding_window=4,
                                         use_sliding_window=False, max_window_layers=0))
  assert off.sliding_window is None
  # Mistral without the field gets transformers' default window; null is none.
  assert llama.LlamaConfig.from_dict(dict(_TINY, model_type="mistral")).sliding_window == 4096
  assert llama.LlamaConfig.from_dict(dict(_TINY, model_type="mistral",
                                          sliding_window=None)).sliding_window is None


def test_every_qwen3_tensor_is_mapped_and_q_k_norms_are_sharded(tiny):
  directory, _, model, params = tiny("qwen3")
  tensors = safetensors_io.load_safetensors(directory)
  assert "model.layers.1.self_attn.k_norm.weight" in tensors
  assert all(llama_hub.hf_name_to_path(name) is not None for name in tensors)
  flat = param_groups.flatten(params)
  np.testing.assert_array_equal(flat["model/layers/1/self_attn/q_norm/scale"],
                                tensors["model.layers.1.self_attn.q_norm.weight"])
  assert flat["model/layers/0/self_attn/k_norm/scale"].shape == (16,)
  assert not any(path.endswith("_proj/bias") for path in flat)
  sharding.logical_axes(params, model.axes)  # every parameter has axes of its rank
  assert param_groups.first_match("model/layers/0/self_attn/q_norm/scale",
                                  model.axes) == (True, ("norm",))
  assert model.layout.block_index("model/layers/1/self_attn/k_norm/scale") == 1


@pytest.mark.parametrize("case", ["mistral", "gpt2"])  # a window; learned positions
def test_packed_sequences_match_each_sequence_alone(tiny, case):
  _, _, model, params = tiny(case)
  first, second = [5, 17, 42, 8, 61], [9, 33, 70, 11]
  rows = [  # (input_ids, positions, segment_ids), all of length 9
      (first + second, [0, 1, 2, 3, 4, 0, 1, 2, 3], [1] * 5 + [2] * 4),  # packed
      (second + [0] * 5, list(range(9)), [1] * 4 + [0] * 5),  # the second alone
  ]
  ids, positions, segments = (jnp.asarray(column, jnp.int32) for column in zip(*rows))
  packed, alone = _logits(model, params, {"input_ids": ids, "positions": positions,
                                          "segment_ids": segments})
  np.testing.assert_allclose(packed[5:], alone[:4], atol=1e-5, rtol=0)


def test_a_learned_position_table_counts_as_embeddings(tiny):
  """Freezing presets, gradual unfreezing and layer-wise decay treat GPT-2's `wpe` as
  they treat its token embeddings."""
  _, _, model, params = tiny("gpt2")
  num_blocks = model.layout.num_blocks(param_groups.flatten(params))
  assert num_blocks == 2
  assert (model.layout.depth("model/embed_positions/embedding", num_blocks)
          == model.layout.depth("model/embed_tokens/embedding", num_blocks) == 3)


def test_rows_longer_than_a_learned_position_table_are_refused(tiny):
  _, _, model, params = tiny("gpt2")  # 64 positions
  ids = np.full((1, 65), 3)
  with pytest.raises(ConfigError, match="rows of 65 tokens.*has 64 positions.*max_length"):
    _logits(model, params, _batch(ids, [65]))
  with pytest.raises(ConfigError, match="max_new_tokens is 65 tokens.*has 64 positions"):
    generate.generate(model, params, [[5, 6, 7]], max_new_tokens=62, stop_tokens=[_EOS])
  # Up to the table's end (a cache of 64 + 63 slots, positions up to 63).
  [tokens] = generate.generate(model, params, [[5, 6, 7]], max_new_tokens=61)
  assert 1 <= len(tokens) <= 61


@pytest.mark.parametrize("case", ["mistral", "gemma2", "gemma3", "gpt2"])
def test_greedy_generation_with_a_window_matches_transformers_generate(tiny, case):
  _, reference, model, params = tiny(case)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, _TINY["vocab_size"], n).tolist() for n in (7, 2, 13)]
  ours = generate.generate(model, params, prompts, max_new_tokens=12, stop_tokens=[_EOS])
  theirs = []
  for prompt in prompts:
    with torch.no_grad():
      out = reference.generate(torch.tensor([prompt]),
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=_EOS,
                               pad_token_id=0)
    theirs.append(out[0, len(prompt):].tolist())
  assert ours == theirs
  assert any(len(t) == 12 for t in theirs)  # at least one row decodes far past the window


@pytest.mark.parametrize("case, loaded_as, tensor", [
    ("qwen3_window", "Qwen3ForCausalLM", "model.layers.0.self_attn.q_norm.weight"),
    ("phi3", "Phi3ForCausalLM", "model.layers.0.self_attn.qkv_proj.weight"),
    ("gemma3", "Gemma3ForCausalLM", "model.layers.0.pre_feedforward_layernorm.weight"),
    ("gpt2", "GPT2LMHeadModel", "transformer.h.0.attn.c_attn.weight")])
def test_merged_export_loads_in_transformers_with_the_same_logits(tiny, tmp_path, case,
                                                                  loaded_as, tensor):
  directory, _, model, params = tiny(case)
  rng = np.random.default_rng(2)  # trained weights differ from the checkpoint's
  params = param_groups.map_with_path(
      lambda _, x: (np.asarray(x) + 0.05 * rng.normal(size=x.shape)).astype(np.float32), params)
  source, name_map, extra = models.hf_format(_config(pretrained=directory))
  names = export.save_merged(model.module(params), str(tmp_path), source_dir=source,
                             name_map=name_map, extra=extra)
  assert tensor in names
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               dtype=torch.float32).eval()
  assert type(exported).__name__ == loaded_as
  ids = np.random.default_rng(3).integers(3, _TINY["vocab_size"], (1, _LENGTH))
  batch = _batch(ids, [_LENGTH])
  np.testing.assert_allclose(_logits(model, params, batch), _reference_logits(exported, batch),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma"), "model_type='gemma' is not supported"),
    (dict(model_type="llama", sliding_window=4), "sliding_window: model_type='llama' has no"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window=0: expected a positive"),
    (dict(model_type="mistral", layer_types=["full_attention", "sliding_attention"]),
     "layer_types=.*per-layer attention types are not supported"),
    (dict(model_type="qwen3", use_sliding_window=True,
          layer_types=["full_attention", "chunked_attention"]),
     r"layer_types has attention types \['chunked_attention'\]"),
    (dict(model_type="qwen3", layer_types=["full_attention"]),
     "layer_types=.*one attention type per layer"),
    (dict(model_type="qwen3", rope_parameters=dict(rope_type="yarn", factor=4.0)),
     "rope_type 'yarn' is not supported"),
    (dict(model_type="gemma3_text", rope_parameters={
        "full_attention": dict(rope_type="default"),
        "sliding_attention": dict(rope_type="linear", factor=2.0)}),
     "rope_parameters.sliding_attention.rope_type='linear' is not supported"),
    (dict(model_type="gemma2", hidden_activation="relu"), "hidden_act='relu' is not supported"),
    (dict(model_type="phi3", partial_rotary_factor=0.75),
     "partial_rotary_factor=0.75 is not supported"),
    (dict(model_type="phi3", rope_parameters=dict(rope_type="longrope", short_factor=[1.0])),
     "rope_type 'longrope' is not supported"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True),
     "use_bidirectional_attention=True is not supported"),
    (dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(model_type="gpt2", activation_function="relu"), "hidden_act='relu' is not supported"),
])
def test_settings_the_decoder_cannot_apply_are_refused_naming_the_file(tmp_path, change,
                                                                       message):
  (tmp_path / "config.json").write_text(json.dumps({**_TINY, **change}))
  with pytest.raises(ConfigError, match=f"config.json: .*{message}"):
    models.create(_config(pretrained=str(tmp_path)), seed=0)


@pytest.fixture(scope="module", params=["Llama", "Mistral", "Gemma3Text", "GPT2"])
def reward_model(request, tmp_path_factory):
  """(folder, transformers model) of a tiny sequence classifier with 3 labels."""
  family = request.param
  window = dict(sliding_window=_WINDOW) if family not in ("Llama", "GPT2") else {}
  config = getattr(transformers, f"{family}Config")(**_TINY, **window, num_labels=3,
                                                    pad_token_id=0)
  torch.manual_seed(0)
  reference = tiny_decoders.randomize(
      getattr(transformers, f"{family}ForSequenceClassification")(config).eval())
  directory = str(tmp_path_factory.mktemp("reward"))
  reference.save_pretrained(directory)
  return directory, reference


def test_decoder_classifier_matches_transformers_last_token_pooling(reward_model,
                                                                     record_property):
  directory, reference = reward_model
  model, params = models.create(_config(name="decoder_classifier", pretrained=directory,
                                        num_classes=3), seed=0)
  rng = np.random.default_rng(4)
  ids = rng.integers(3, _TINY["vocab_size"], (3, _LENGTH))
  mask = np.ones_like(ids)
  ids[1, 8:], mask[1, 8:] = 0, 0  # right padding
  ids[2, :5], mask[2, :5] = 0, 0  # left padding: pooled at the last column all the same
  batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask)}
  np.testing.assert_array_equal(model.module(params).last_token(batch["input_ids"],
                                                                batch["attention_mask"]),
                                [_LENGTH - 1, 7, _LENGTH - 1])
  logits = np.asarray(jax.jit(lambda p, b: model.apply(p, b, train=False))(params, batch))
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask)).logits.numpy()
  diff = float(np.max(np.abs(logits - expected)))
  record_property("max_abs_diff", diff)
  print(f"decoder_classifier ({type(reference).__name__}): max abs logit difference "
        f"{diff:.2e} (logits up to {np.max(np.abs(expected)):.1f})")
  assert logits.shape == (3, 3) and diff <= 1e-4, diff
  assert model.layout.head_is_new and model.layout.depth("score/kernel", 2) == 0


def test_decoder_classifier_from_a_causal_lm_starts_a_new_score_head(tiny, tmp_path):
  directory, _, _, lm_params = tiny("qwen3")
  config = _config(name="decoder_classifier", pretrained=directory, num_classes=1)
  model, params = models.create(config, seed=0)  # the checkpoint has no score head
  flat, lm_flat = param_groups.flatten(params), param_groups.flatten(lm_params)
  assert flat["score/kernel"].shape == (32, 1) and not np.any(flat["score/kernel"])
  assert "lm_head/kernel" not in flat
  np.testing.assert_array_equal(flat["model/layers/1/self_attn/k_norm/scale"],
                                lm_flat["model/layers/1/self_attn/k_norm/scale"])
  # Any other tensor the checkpoint lacks is still an error.
  tensors = safetensors_io.load_safetensors(directory)
  del tensors["model.layers.1.self_attn.k_norm.weight"]
  shutil.copy(f"{directory}/config.json", tmp_path / "config.json")
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightsError, match=r"model/layers/1/self_attn/k_norm/scale"):
    models.create(_config(name="decoder_classifier", pretrained=str(tmp_path), num_classes=1),
                  seed=0)


def test_auto_picks_the_model_from_the_folder_and_the_task(tiny, tmp_path):
  directory = tiny("qwen3")[0]
  auto = _config(name="auto", pretrained=directory)
  assert models.resolve_name(auto, "causal_lm") == "llama_lm"
  assert models.resolve_name(auto, "classification") == "decoder_classifier"
  encoder = tmp_path / "encoder"
  transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=37).save_pretrained(encoder)
  assert models.resolve_name(_config(name="auto", pretrained=str(encoder)),
                             "classification") == "bert_classifier"
  # A run config resolved: the MiniLM sentiment config given a decoder folder classifies
  # with the decoder; the name the run records is the model it built.
  from configs import minilm_sentiment  # pylint: disable=g-import-not-at-top
  from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = minilm_sentiment.get_config()
  with config.unlocked():
    config.model.name, config.model.pretrained = "auto", directory
  config_lib.validate(config)
  assert models.resolved(config).model.name == "decoder_classifier"
  assert config.model.name == "auto"  # unchanged
  mamba = tmp_path / "mamba"
  mamba.mkdir()
  (mamba / "config.json").write_text(json.dumps({"model_type": "mamba"}))
  with pytest.raises(ConfigError, match=r"mamba/config.json: model_type='mamba': "
                     r"config.model.name='auto' knows no model for it; supported model "
                     r"types: \['bert', .*'gemma2', .*'gpt2', .*'llama'"):
    models.resolve_name(_config(name="auto", pretrained=str(mamba)), "causal_lm")
  with pytest.raises(ConfigError, match="has none; name the model"):
    models.resolve_name(_config(name="auto", pretrained=str(tmp_path)), "causal_lm")
  with pytest.raises(ConfigError, match="resolve it first"):
    models.create(auto, seed=0)


def test_decoder_classifier_export_loads_as_a_sequence_classifier(tiny, tmp_path):
  """A classifier started from a causal LM exports the decoder and its new score head;
  transformers loads it as Qwen3ForSequenceClassification with the same logits."""
  directory = tiny("qwen3")[0]
  config = _config(name="decoder_classifier", pretrained=directory, num_classes=3)
  model, params = models.create(config, seed=0)
  rng = np.random.default_rng(5)  # a trained head and decoder
  params = param_groups.map_with_path(
      lambda _, x: (np.asarray(x) + 0.05 * rng.normal(size=x.shape)).astype(np.float32), params)
  source, name_map, extra = models.hf_format(config)
  names = export.save_merged(model.module(params), str(tmp_path), source_dir=source,
                             name_map=name_map, extra=extra, class_names=["a", "b", "c"])
  assert "score.weight" in names and "lm_head.weight" not in names
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  assert type(exported).__name__ == "Qwen3ForSequenceClassification"
  ids = np.random.default_rng(6).integers(3, _TINY["vocab_size"], (2, _LENGTH))
  mask = np.ones_like(ids)
  ids[1, 9:], mask[1, 9:] = 0, 0
  batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask)}
  logits = np.asarray(jax.jit(lambda p, b: model.apply(p, b, train=False))(params, batch))
  with torch.no_grad():
    expected = exported(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  assert np.max(np.abs(expected.numpy())) > 0.1  # not a comparison of near-zero logits
  np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


def test_a_model_section_without_newer_keys_builds_with_their_defaults():
  """A run recorded before `scan_layers` / `attention` existed (or a section written by
  hand) builds the model it built then."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  full = _config(arch=dict(_TINY, model_type="qwen3", head_dim=16))
  recorded = ml_collections.ConfigDict({key: full[key] for key in
                                        ("name", "pretrained", "arch", "dont_load", "remat")})
  model, params = models.create(full, seed=0)
  old_model, old_params = models.create(recorded, seed=0)
  assert "attention" not in recorded and old_model.graphdef == model.graphdef
  jax.tree.map(np.testing.assert_array_equal, old_params, params)

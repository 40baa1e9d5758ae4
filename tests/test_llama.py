"""The Llama / Qwen2 decoder against transformers on tiny random checkpoints, and its loader."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_decoders
from ftjax import models, param_groups, step
from ftjax.errors import ConfigError, WeightsError
from ftjax.hub import llama as llama_hub
from ftjax.hub import loading, safetensors_io
from ftjax.models import llama
from ftjax.peft import lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

# case -> (transformers family, config overrides, sequence lengths to compare at)
_CASES = {
    "gqa_untied": ("Llama", dict(head_dim=16), (12,)),
    "tied": ("Llama", dict(tie_word_embeddings=True), (12,)),
    "llama3": ("Llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=16)), (12,)),
    "linear_biases": ("Llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0),
                                    attention_bias=True, mlp_bias=True), (12,)),
    # Dynamic NTK only changes past max_position_embeddings: compare below and above it.
    "dynamic": ("Llama", dict(max_position_embeddings=16,
                              rope_scaling=dict(rope_type="dynamic", factor=2.0)), (12, 24)),
    "qwen2": ("Qwen2", dict(), (12,)),
}


def _save_tiny(directory, family, overrides):
  return tiny_decoders.save_random(directory, family, **{**_TINY, **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (checkpoint folder, transformers model), each saved once per module."""
  cache = {}

  def get(case):
    if case not in cache:
      family, overrides, _ = _CASES[case]
      directory = tmp_path_factory.mktemp(case)
      cache[case] = (str(directory), _save_tiny(directory, family, overrides))
    return cache[case]

  return get


def _forward(model):
  """The model's compiled eval-mode forward pass: (params, batch) -> numpy logits."""
  apply = jax.jit(lambda params, batch: model.apply(params, batch, train=False))
  return lambda params, batch: np.asarray(apply(params, batch))


def _train_grad(model, batch):
  """Compiled (loss, grads) of a train-mode squared-logits loss."""
  loss = lambda params: jnp.sum(jnp.square(model.apply(params, batch, train=True,
                                                       rng=jax.random.key(0))))
  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("case", sorted(_CASES))
def test_logits_match_transformers_on_real_tokens(case, checkpoints, record_property):
  directory, reference = checkpoints(case)
  model, params = models.create(tiny_decoders.model_config(pretrained=directory), seed=0)
  forward = _forward(model)
  rng = np.random.default_rng(0)
  for length in _CASES[case][2]:  # increasing, as HF's dynamic rope caches the longest
    ids = rng.integers(1, _TINY["vocab_size"], (2, length))
    lengths = [length, length - 5]
    batch = tiny_decoders.padded_batch(ids, lengths)
    logits = forward(params, batch)
    assert logits.dtype == np.float32 and logits.shape == (2, length, _TINY["vocab_size"])
    with torch.no_grad():
      expected = reference(input_ids=torch.tensor(ids),
                           attention_mask=torch.tensor(np.asarray(batch["segment_ids"])),
                           position_ids=torch.tensor(np.asarray(batch["positions"]),
                                                     dtype=torch.long)).logits.numpy()
    real = np.asarray(batch["segment_ids"]).astype(bool)
    diff = float(np.max(np.abs(logits[real] - expected[real])))
    record_property(f"max_abs_diff_len{length}", diff)
    assert diff < 1e-4, (case, length, diff)


def test_every_checkpoint_tensor_is_mapped_and_tied_head_is_absent(checkpoints):
  for case in ("gqa_untied", "tied", "qwen2", "linear_biases"):
    directory, _ = checkpoints(case)
    tensors = safetensors_io.load_safetensors(directory)
    assert all(llama_hub.hf_name_to_path(n) is not None for n in tensors), case
  _, params = models.create(tiny_decoders.model_config(pretrained=checkpoints("tied")[0]), seed=0)
  flat = param_groups.flatten(params)
  assert not any(p.startswith("lm_head/") for p in flat)
  _, params = models.create(tiny_decoders.model_config(pretrained=checkpoints("qwen2")[0]), seed=0)
  flat = param_groups.flatten(params)
  assert {"model/layers/1/self_attn/q_proj/bias", "model/layers/1/self_attn/v_proj/bias",
          "lm_head/kernel"} <= set(flat)
  assert "model/layers/1/self_attn/o_proj/bias" not in flat


def test_packed_sequences_match_each_sequence_alone(checkpoints):
  model, params = models.create(tiny_decoders.model_config(pretrained=checkpoints("gqa_untied")[0]), seed=0)
  first, second = [5, 17, 42], [9, 33]
  rows = [  # (input_ids, positions, segment_ids), all of length 5
      (first + second, [0, 1, 2, 0, 1], [1, 1, 1, 2, 2]),  # packed
      (first + [0, 0], [0, 1, 2, 3, 4], [1, 1, 1, 0, 0]),  # the first alone, right-padded
      (second + [0, 0, 0], [0, 1, 2, 3, 4], [1, 1, 0, 0, 0]),  # the second alone
      (first + second, [0, 1, 2, 0, 1], [1, 1, 1, 1, 1]),  # packed without segment ids
  ]
  ids, positions, segments = (jnp.asarray(column, jnp.int32) for column in zip(*rows))
  packed, alone_first, alone_second, leaked = _forward(model)(
      params, {"input_ids": ids, "positions": positions, "segment_ids": segments})
  np.testing.assert_allclose(packed[:3], alone_first[:3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[3:], alone_second[:2], atol=1e-5, rtol=0)
  # Without segment ids the second sequence sees the first: the checks above are not vacuous.
  assert np.max(np.abs(leaked[3:] - packed[3:])) > 1e-2


def test_bfloat16_compute_gives_float32_logits_near_transformers(checkpoints):
  directory, reference = checkpoints("gqa_untied")
  model, params = models.create(tiny_decoders.model_config(pretrained=directory), seed=0)
  ids = np.random.default_rng(3).integers(1, 64, (2, 12))
  low = _forward(model)(step.cast_floats(params, jnp.bfloat16), tiny_decoders.padded_batch(ids, [12, 12]))
  assert low.dtype == np.float32
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(low, expected, atol=0.1, rtol=0)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
  """A one-block Qwen2 checkpoint folder, for the (compile-heavy) gradient checks."""
  directory = tmp_path_factory.mktemp("one_layer")
  _save_tiny(directory, "Qwen2", dict(num_hidden_layers=1))
  return str(directory)


def test_remat_policies_give_the_same_gradients_with_lora_on_every_projection(one_layer):
  batch = tiny_decoders.padded_batch(np.random.default_rng(1).integers(1, 64, (2, 6)), [6, 4])
  spec = lora.LoraSpec(target=r"model/layers/\d+/(self_attn|mlp)/\w+_proj/kernel", rank=2,
                       alpha=4.0)  # dropout would triple XLA's compile time on CPU
  results = {}
  for remat in ("none", "full", "dots_saveable"):
    model, params = models.create(tiny_decoders.model_config(pretrained=one_layer, remat=remat), seed=0)
    module = model.module(params)
    assert len(lora.inject(module, spec, nnx.Rngs(params=1))) == 7
    graphdef, state = nnx.split(module)
    adapted = dataclasses.replace(model, graphdef=graphdef)
    results[remat] = _train_grad(adapted, batch)(nnx.to_pure_dict(state))
  value, grads = results["none"]
  flat = param_groups.flatten(grads)
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  assert np.any(flat["model/layers/0/self_attn/q_proj/lora_b"])
  for remat in ("full", "dots_saveable"):
    np.testing.assert_allclose(results[remat][0], value, rtol=1e-6)
    for path, grad in param_groups.flatten(results[remat][1]).items():
      np.testing.assert_allclose(grad, flat[path], atol=1e-4, rtol=1e-4, err_msg=path)
  with pytest.raises(ConfigError, match="config.model.remat='some'"):
    models.create(tiny_decoders.model_config(pretrained=one_layer, remat="some"), seed=0)


def test_architecture_from_config_dict_without_checkpoint():
  arch = dict(_TINY, tie_word_embeddings=True,
              rope_scaling=dict(type="linear", factor=2.0), rope_theta=500000.0)
  model, params = models.create(tiny_decoders.model_config(arch=arch), seed=0)
  flat = param_groups.flatten(params)
  assert flat["model/embed_tokens/embedding"].shape == (64, 32)
  assert flat["model/layers/1/self_attn/k_proj/kernel"].shape == (32, 16)
  assert flat["model/layers/1/mlp/down_proj/kernel"].shape == (48, 32)
  assert not any(p.startswith("lm_head/") for p in flat)
  assert model.layout.num_blocks(flat) == 2
  assert model.layout.depth("model/norm/scale", 2) == 0
  assert model.layout.depth("model/embed_tokens/embedding", 2) == 3
  rope = llama.LlamaConfig.from_dict(arch).rope()
  assert (rope.rope_type, rope.factor, rope.theta) == ("linear", 2.0, 500000.0)
  with pytest.raises(ConfigError, match="config.model.arch is not set"):
    models.create(tiny_decoders.model_config(), seed=0)


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0)),
     "rope_type 'yarn' is not supported"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), r"needs \['low_freq_factor'"),
    (dict(hidden_act="relu"), "hidden_act='relu' is not supported"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4,
          layer_types=["full_attention", "chunked_attention"]), "chunked_attention"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
])
def test_unsupported_config_raises_naming_the_file(tmp_path, change, message):
  (tmp_path / "config.json").write_text(json.dumps({**_TINY, "model_type": "llama", **change}))
  with pytest.raises(ConfigError, match=f"config.json: .*{message}"):
    models.create(tiny_decoders.model_config(pretrained=str(tmp_path)), seed=0)


def _edited_copy(source, target, edit):
  """Copies a checkpoint folder, applying `edit` to its {name: array} tensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  shutil.copy(f"{source}/config.json", target / "config.json")
  tensors = safetensors_io.load_safetensors(source)
  edit(tensors)
  save_file(tensors, str(target / "model.safetensors"))
  return str(target)


def test_loader_fails_on_missing_tensor_naming_the_parameter(checkpoints, tmp_path):
  directory = _edited_copy(checkpoints("gqa_untied")[0], tmp_path,
                           lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(WeightsError, match="model/layers/1/mlp/up_proj/kernel"):
    models.create(tiny_decoders.model_config(pretrained=directory), seed=0)


def test_loader_fails_on_shape_mismatch_naming_the_tensor(checkpoints, tmp_path):
  def edit(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

  directory = _edited_copy(checkpoints("gqa_untied")[0], tmp_path, edit)
  with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*"
                                         r"\(8, 32\).*model/layers/0/self_attn/k_proj/kernel"):
    models.create(tiny_decoders.model_config(pretrained=directory), seed=0)


def test_lm_head_tensor_of_a_tied_model_is_reported_not_loaded(checkpoints):
  directory, _ = checkpoints("tied")
  tensors = safetensors_io.load_safetensors(directory)
  tensors["lm_head.weight"] = np.ones((64, 32), np.float32)
  arch = llama.LlamaConfig.from_json(f"{directory}/config.json")
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: llama.CausalLM(arch, rngs=nnx.Rngs(params=0)))))
  params, report = loading.load_tensors(abstract, tensors, llama_hub.hf_name_to_path,
                                        source=directory)
  assert report.unexpected == ["lm_head.weight"]
  np.testing.assert_array_equal(param_groups.flatten(params)["model/embed_tokens/embedding"],
                                tensors["model.embed_tokens.weight"])

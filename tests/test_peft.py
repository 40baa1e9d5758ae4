"""Freezing, LoRA / DoRA, BitFit, layer-wise LR decay and gradual unfreezing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import minilm_sentiment, smollm2_chat
from conftest import with_overrides
from ftjax import build, sharding
from ftjax import config as config_lib, models, optim, param_groups, state as state_lib, step as step_lib, tasks
from ftjax.errors import ConfigError
from ftjax.peft import lora, methods, quant

TOKENS = {"input_ids": jnp.asarray([[101, 2023, 3185, 2001, 2307, 102, 0, 0],
                                    [101, 1037, 11704, 2143, 999, 2009, 2001, 102]], jnp.int32),
          "attention_mask": jnp.asarray([[1] * 6 + [0] * 2, [1] * 8], jnp.int32),
          "token_type_ids": jnp.zeros((2, 8), jnp.int32)}


def _config(arg="", **overrides):
  return with_overrides(minilm_sentiment.get_config(arg), **overrides)


@pytest.fixture(scope="module")
def base():
  return models.create(minilm_sentiment.get_config().model, seed=0)


def _adapted(base, arg, **overrides):
  config = _config(arg, **overrides)
  model, params = methods.adapt(config, *base, seed=0)
  return config, model, params


def _hidden(model, params):
  return model.module(params).encoder(TOKENS["input_ids"], TOKENS["attention_mask"],
                                      TOKENS["token_type_ids"])


@pytest.mark.parametrize("arg", ["peft=lora", "peft=dora", "peft=lora,rslora"])
def test_adapter_starts_as_the_base_model_exactly(base, arg):
  _, model, params = _adapted(base, arg)
  if "dora" in arg:  # m / ||W|| is 1 up to the rounding of two differently fused norms
    np.testing.assert_allclose(_hidden(model, params), _hidden(*base), rtol=0, atol=1e-5)
  else:
    np.testing.assert_array_equal(_hidden(model, params), _hidden(*base))
  adapted = [p for p in param_groups.flatten(params) if "lora_" in p]
  expected = 6 * 2 * (3 if "dora" in arg else 2)  # 6 blocks x (query, value)
  assert len(adapted) == expected


def test_merge_folds_the_adapter_into_the_kernel(base):
  _, model, params = _adapted(base, "peft=dora")
  rng = np.random.default_rng(0)
  params = param_groups.map_with_path(
      lambda path, x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype)
      if "lora_b" in path or "lora_magnitude" in path else x, params)
  adapted = _hidden(model, params)
  merged = lora.merge(model.module(params))
  assert not any("lora_" in p for p in param_groups.flatten(nnx.to_pure_dict(nnx.state(merged))))
  out = merged.encoder(TOKENS["input_ids"], TOKENS["attention_mask"], TOKENS["token_type_ids"])
  assert float(jnp.abs(_hidden(*base) - adapted).max()) > 1e-3  # the adapter does something
  np.testing.assert_allclose(out, adapted, atol=2e-5)


def test_rslora_scale():
  spec = lora.LoraSpec(target=".*", rank=16, alpha=32.0)
  assert spec.scale == 2.0
  assert lora.LoraSpec(target=".*", rank=16, alpha=32.0, rslora=True).scale == 8.0


@pytest.mark.parametrize("arg,trainable_patterns", [
    ("peft=lora", [r".*/lora_(a|b)", r"head/.*"]),
    ("peft=bitfit", [r".*/bias", r"head/.*"]),
    ("freeze=all_but_head", [r"head/.*"]),
    ("freeze_blocks=3", [r"encoder/layers/(3|4|5)/.*", r"head/.*"]),
    ("", [r".*"]),
])
def test_trainable_sets_and_optimizer_state_size(base, arg, trainable_patterns):
  config, model, params = _adapted(base, arg)
  trainable, frozen = methods.split(config, model, params)
  paths = param_groups.flatten(params)
  expected = set(param_groups.matching(paths, trainable_patterns))
  assert set(param_groups.flatten(trainable)) == expected
  assert set(param_groups.flatten(frozen)) == set(paths) - expected
  tx, _ = optim.make_optimizer(config.optimizer, trainable, 100)
  opt_state = tx.init(trainable)
  # Adam keeps exactly two moments per trainable leaf; the rest are scalar step counters.
  moments = [x for x in jax.tree.leaves(opt_state) if x.shape != ()]
  trainable_leaves = jax.tree.leaves(trainable)
  assert len(moments) == 2 * len(trainable_leaves)
  assert sum(x.nbytes for x in moments) == 2 * sum(x.nbytes for x in trainable_leaves)


@pytest.mark.parametrize("arg,trainable_patterns", [
    ("debug", [r".*/lora_(a|b)"]),  # the pretrained output layer and final norm stay frozen
    ("debug,peft=full", [r".*"]),
])
def test_language_model_adapters_leave_the_pretrained_head_frozen(arg, trainable_patterns):
  config = smollm2_chat.get_config(arg)
  config.unlock()
  config.model.arch["tie_word_embeddings"] = False  # a separate lm_head
  config.lock()
  model, params = models.create(config.model, seed=0)
  model, params = methods.adapt(config, model, params, seed=0)
  trainable, _ = methods.split(config, model, params)
  paths = param_groups.flatten(params)
  assert "lm_head/kernel" in paths
  assert set(param_groups.flatten(trainable)) == set(
      param_groups.matching(paths, trainable_patterns))


def _train(config, model, params, steps=3):
  trainable, frozen = methods.split(config, model, params)
  depths = model.layout.depths(trainable, params)
  tx, schedule = optim.make_optimizer(config.optimizer, trainable, 10, depths)
  state = state_lib.create(jax.tree.map(jnp.asarray, trainable), tx, seed=0)
  batch = dict(TOKENS, label=jnp.asarray([0, 1], jnp.int32), mask=jnp.ones((2,), bool))
  task = tasks.get(config)
  step = jax.jit(lambda s, f, b: step_lib.train_step(s, f, b, model=model, task=task, tx=tx,
                                                     schedule=schedule))
  frozen = jax.tree.map(jnp.asarray, frozen)
  history = [state.params]
  for _ in range(steps):
    state, _ = step(state, frozen, batch)
    history.append(state.params)
  return history, frozen


def test_frozen_parameters_stay_bitwise_unchanged(base):
  config, model, params = _adapted(base, "freeze_blocks=3", **{"optimizer.warmup_steps": 0})
  history, frozen = _train(config, model, params)
  original = param_groups.flatten(params)
  for path, value in param_groups.flatten(frozen).items():
    np.testing.assert_array_equal(value, original[path])
  changed = param_groups.flatten(history[-1])
  assert not np.array_equal(changed["encoder/layers/5/output/kernel"],
                            original["encoder/layers/5/output/kernel"])


def test_gradual_unfreezing_releases_one_block_at_a_time(base):
  config, model, params = _adapted(base, "unfreeze_every=1", **{"optimizer.warmup_steps": 0})
  history, _ = _train(config, model, params, steps=3)
  flat = [param_groups.flatten(p) for p in history]

  def moved(step, path):
    return not np.array_equal(flat[step][path], flat[0][path])

  # Step 1 trains the head (depth 0), step 2 also block 5 (depth 1), step 3 block 4.
  assert moved(1, "head/kernel") and not moved(1, "encoder/layers/5/output/kernel")
  assert moved(2, "encoder/layers/5/output/kernel")
  assert not moved(2, "encoder/layers/4/output/kernel")
  assert moved(3, "encoder/layers/4/output/kernel")
  assert not moved(3, "encoder/layers/3/output/kernel")
  assert not moved(3, "encoder/embeddings/word_embeddings/embedding")


def test_layer_wise_lr_decay_scales_updates_by_depth():
  params = {"encoder": {"layers": {0: {"w": jnp.ones((2,))}, 1: {"w": jnp.ones((2,))}}},
            "head": {"w": jnp.ones((2,))}}
  layout = models.Layout(embeddings="encoder/embeddings/.*", block="encoder/layers/{}",
                         head="head/.*")
  depths = param_groups.map_with_path(lambda p, _: layout.depth(p, 2), params)
  config = _config("llrd=0.5", **{"optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0,
                                  "optimizer.weight_decay": 0.0, "optimizer.lr": 1.0,
                                  "optimizer.decay": "constant"}).optimizer
  tx, _ = optim.make_optimizer(config, params, 10, depths)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first update is -lr * sign(g) per entry, times 0.5**depth.
  np.testing.assert_allclose(updates["head"]["w"], -1.0, rtol=1e-5)
  np.testing.assert_allclose(updates["encoder"]["layers"][1]["w"], -0.5, rtol=1e-5)
  np.testing.assert_allclose(updates["encoder"]["layers"][0]["w"], -0.25, rtol=1e-5)


@pytest.mark.parametrize("arg,overrides,match", [
    ("peft=lora", {"peft.target": ".*nothing_here"}, "matches no parameter"),
    ("peft=lora", {"peft.target": ".*word_embeddings/embedding"},
     "not kernels of linear layers"),
    ("peft=lora", {"peft.rank": 500}, r"rank=500 exceeds the dimensions \(384, 384\)"),
    ("peft=lora", {"peft.target": "(unclosed"}, "invalid regex"),
    ("peft=prefix", {}, "peft.method='prefix': must be one of"),
    ("peft=lora,freeze_blocks=2", {}, "choose different sets of trainable parameters"),
    ("freeze_blocks=9", {}, "the model has 6 blocks"),
    ("", {"trainable": [("encoder/layer/0/.*", None)]}, "pattern 'encoder/layer/0/.*' matches"),
])
def test_bad_peft_configs_name_the_problem(base, arg, overrides, match):
  """Refused by the config check the trainer runs first, or by the adapter itself."""
  with pytest.raises(ConfigError, match=match):
    config = _config(arg, **overrides)
    config_lib.validate(config)
    model, params = methods.adapt(config, *base, seed=0)
    methods.split(config, model, params)


@pytest.mark.parametrize("fmt,double_quant,max_error", [
    ("int8", False, 0.5 / 127), ("nf4", False, 0.17), ("nf4", True, 0.17)])
def test_quantized_kernel_round_trip(fmt, double_quant, max_error):
  kernel = np.random.default_rng(0).normal(size=(384, 96)).astype(np.float32)
  quantized = quant.QuantizedKernel(kernel, fmt, block_size=64, double_quant=double_quant)
  restored = np.asarray(quantized())
  # Errors relative to each value's scale (column absmax for int8, block absmax for nf4).
  if fmt == "int8":
    scale = np.abs(kernel).max(axis=0, keepdims=True)
  else:
    scale = np.repeat(np.abs(kernel.reshape(-1, 64)).max(axis=1), 64).reshape(kernel.shape)
  assert np.abs(restored - kernel).max() <= max_error * scale.max() + 1e-6
  assert np.abs((restored - kernel) / scale).max() <= max_error + (0.01 if double_quant else 1e-6)
  bits = 8 * quantized.nbytes() / kernel.size
  assert bits < {"int8": 8.1, "nf4": 4.6}[fmt]


def test_quantized_kernel_rejects_bad_blocks():
  with pytest.raises(ConfigError, match="quant_block=50"):
    quant.QuantizedKernel(np.zeros((384, 10), np.float32), "nf4", block_size=50)
  with pytest.raises(ConfigError, match="must be one of"):
    quant.QuantizedKernel(np.zeros((4, 4), np.float32), "fp8")


@pytest.mark.parametrize("arg,min_correlation", [("peft=qlora", 0.95),
                                                 ("peft=qlora,quant=int8", 0.995)])
def test_qlora_base_is_quantized_and_starts_at_its_dequantized_model(base, arg,
                                                                      min_correlation):
  config, model, params = _adapted(base, arg)
  flat = param_groups.flatten(params)
  assert not any(p.endswith("attention/query/kernel") for p in flat)  # stored as codes
  assert any(p.endswith("attention/query/kernel/codes") for p in flat)
  assert any(p.endswith("intermediate/kernel/codes") for p in flat)  # untargeted, quantized
  assert "head/kernel" in flat
  hidden = _hidden(model, params)
  dequantized = lora.merge(model.module(params))  # B = 0: the dequantized base model
  np.testing.assert_allclose(
      dequantized.encoder(TOKENS["input_ids"], TOKENS["attention_mask"],
                          TOKENS["token_type_ids"]), hidden, atol=2e-5)
  reference = np.asarray(_hidden(*base))
  # Six layers of 4-bit weights move the hidden states more than 8-bit ones.
  assert np.corrcoef(np.asarray(hidden).ravel(), reference.ravel())[0, 1] > min_correlation
  trainable, frozen = methods.split(config, model, params)
  assert set(param_groups.flatten(trainable)) == set(
      param_groups.matching(flat, [r".*/lora_(a|b)", r"head/.*"]))
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(base[1]))
  assert sum(np.asarray(x).nbytes for x in jax.tree.leaves(frozen)) < 0.75 * float_bytes


# model name -> (a small random architecture, the kernels LoRA adapts without peft.target)
_DEFAULT_TARGETS = {
    "bert": ("bert_classifier", dict(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32),
             r"encoder/layers/\d/attention/(query|value)/kernel"),
    "gpt2": ("llama_lm", dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=2,
                              n_head=2, n_positions=32),
             r"model/layers/\d/self_attn/qkv_proj/kernel"),
    "qwen3": ("decoder_classifier", dict(model_type="qwen3", vocab_size=50, hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2),
              r"model/layers/\d/self_attn/(q|v)_proj/kernel"),
    "modernbert": ("modernbert_classifier", dict(
        model_type="modernbert", vocab_size=50, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, classifier_pooling="mean"),
                   r"encoder/layers/\d/attn/Wqkv/kernel"),
    # Basic blocks: only the shortcuts are linear (the 3x3 convolutions are not).
    "resnet18": ("resnet", dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16],
                                depths=[1, 1], layer_type="basic"),
                 r"stages/1/layers/0/shortcut/kernel"),
    "resnet50": ("resnet", dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16],
                                depths=[1, 1], layer_type="bottleneck"),
                 r"stages/\d/layers/0/(conv1|conv3|shortcut)/kernel"),
    "convnext": ("convnext", dict(model_type="convnext", num_stages=2, hidden_sizes=[8, 16],
                                  depths=[1, 1]),
                 r"stages/\d/layers/0/pwconv(1|2)/kernel"),
}


@pytest.mark.parametrize("case", sorted(_DEFAULT_TARGETS))
def test_lora_without_a_target_adapts_the_models_usual_kernels(case):
  name, arch, expected = _DEFAULT_TARGETS[case]
  config = config_lib.defaults()
  config.model.update(name=name, pretrained="", arch=arch, num_classes=2)
  config.peft.update(method="lora", rank=2)
  model, base = models.create(config.model, seed=0)
  adapted, params = methods.adapt(config, model, base, seed=0)
  kernels = [p.removesuffix("/lora_a") for p in param_groups.flatten(params)
             if p.endswith("/lora_a")]
  linear = [p for p in param_groups.flatten(base) if re.fullmatch(expected, p)]
  assert kernels and sorted(kernels) == sorted(p.removesuffix("/kernel") for p in linear)
  assert model.layout.adapted == adapted.layout.adapted != ""


def _built_and_trained(arg, base_dtype, steps=2):
  """A tiny random encoder adapted by `arg`, built on one device in bfloat16 with its frozen
  parameters stored as `base_dtype`, then trained `steps` steps on one batch; (built,
  trained parameters, losses)."""
  config = _config(arg, **{"model.pretrained": "", "compute_dtype": "bfloat16",
                           "peft.base_dtype": base_dtype, "optimizer.warmup_steps": 0,
                           "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                           "model.arch": dict(vocab_size=12000, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64)})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.Rules.from_config(config.axis_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  built = build.build(config, mesh, rules, total_steps=10)
  if not steps:
    return built, None, []
  train, _ = build.jit_steps(built, tasks.get(config, mesh, rules), config, rules,
                             batch_sharding)
  batch = dict(TOKENS, label=jnp.asarray([0, 1], jnp.int32), mask=jnp.ones((2,), bool))
  state, losses = built.state, []
  for _ in range(steps):
    state, metrics = train(state, built.frozen, jax.device_put(batch, batch_sharding))
    losses.append(float(metrics["loss"]))
  return built, jax.device_get(state.params), losses


def _float_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_lora_base_stored_in_the_compute_dtype_halves_it_and_trains_the_same():
  as_float32, float32_params, float32_losses = _built_and_trained("peft=lora", "float32")
  as_compute, compute_params, compute_losses = _built_and_trained("peft=lora", "compute")
  assert {x.dtype for x in jax.tree.leaves(as_compute.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert _nbytes(as_compute.frozen) * 2 == _nbytes(as_float32.frozen)
  # Adapters and the head stay float32, and the step, which casts the frozen half to the
  # compute dtype anyway, computes the same numbers: a run may resume with either setting.
  assert {x.dtype for x in jax.tree.leaves(compute_params)} == {jnp.dtype(jnp.float32)}
  assert compute_losses == float32_losses and compute_losses[1] < compute_losses[0]
  jax.tree.map(np.testing.assert_array_equal, compute_params, float32_params)


def test_qlora_base_stored_in_the_compute_dtype_is_what_the_step_computes_with():
  as_float32, _, _ = _built_and_trained("peft=qlora,quant=int8", "float32", steps=0)
  as_compute, _, _ = _built_and_trained("peft=qlora,quant=int8", "compute", steps=0)
  # The int8 codes stay; their scales and the other frozen floats are halved.
  assert {x.dtype for x in _float_leaves(as_compute.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert _nbytes(_float_leaves(as_compute.frozen)) * 2 == _nbytes(_float_leaves(
      as_float32.frozen))
  jax.tree.map(np.testing.assert_array_equal, as_compute.frozen,
               step_lib.cast_floats(as_float32.frozen, jnp.bfloat16))

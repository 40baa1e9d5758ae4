"""Scanned decoder blocks (`config.model.scan_layers`) against the Python loop, and the
named remat policies against no remat."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_decoders
from ftjax import checkpoint, models, param_groups
from ftjax.errors import ConfigError
from ftjax.models import llama
from ftjax.peft import lora, methods

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
# Gemma 3 with local (windowed, their own rotary base) and global layers alternating;
# GPT-2 with learned positions.
_ARCHS = {
    "llama": dict(model_type="llama"),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=3,
                   sliding_window_pattern=2, query_pre_attn_scalar=24,
                   rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                           rope_theta=1e6),
                                    "sliding_attention": dict(rope_theta=100.0)}),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=32),
}


def _create(case, **overrides):
  arch = {**_TINY, **_ARCHS[case]}
  return models.create(tiny_decoders.model_config(arch=arch, **overrides), seed=0)


def _batch(length=10):
  ids = np.random.default_rng(0).integers(1, 64, (2, length))
  return tiny_decoders.padded_batch(ids, [length, length - 3])


def _loss(model, params, batch):
  logits = model.apply(params, batch, train=False)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * batch["segment_ids"])


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(model, params, batch):
  return jax.value_and_grad(functools.partial(_loss, model))(params, batch)


def _assert_trees_close(actual, expected, atol):
  expected = param_groups.flatten(expected)
  actual = param_groups.flatten(actual)
  assert actual.keys() == expected.keys()
  for path, value in actual.items():
    np.testing.assert_allclose(value, expected[path], atol=atol, rtol=atol, err_msg=path)


@pytest.mark.parametrize("case", list(_ARCHS))
def test_scanned_logits_and_gradients_equal_the_loop(case):
  model, params = _create(case)
  scanned, scanned_params = _create(case, scan_layers=True)
  # One parameter tree for both: checkpoints, adapters and sharding rules see no difference.
  _assert_trees_close(scanned_params, params, 0)
  batch = _batch()
  value, grads = _value_and_grad(model, params, batch)
  scanned_value, scanned_grads = _value_and_grad(scanned, params, batch)
  np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
  assert np.any(param_groups.flatten(grads)["model/layers/2/mlp/down_proj/kernel"])
  _assert_trees_close(scanned_grads, grads, 1e-5)


def test_scanned_kv_cache_generation_equals_the_loop():
  prompt = jnp.asarray([[0, 5, 17, 42], [9, 3, 11, 8]], jnp.int32)
  valid = jnp.asarray([[False, True, True, True], [True] * 4])
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  tokens = {}
  for scan in (False, True):
    model, params = _create("gemma3", scan_layers=scan)

    @jax.jit
    def greedy(params):
      module = model.module(params)
      cache = module.init_cache(2, 10)
      hidden, cache = module.decode(prompt, positions, cache, valid=valid)
      out = []
      for step in range(6):  # past the window of 3
        token = jnp.argmax(module.unembed(hidden[:, -1]), axis=-1)
        out.append(token)
        hidden, cache = module.decode(token[:, None], positions[:, -1:] + step + 1, cache)
      return jnp.stack(out, axis=1), cache

    tokens[scan], cache = greedy(params)
    assert isinstance(cache.keys, jax.Array if scan else tuple)
  np.testing.assert_array_equal(tokens[True], tokens[False])


def _train_config(scan, **overrides):
  config = ml_collections.ConfigDict(dict(
      seed=0, trainable=[], freeze="none", freeze_blocks=0,
      model=tiny_decoders.model_config(arch={**_TINY, **_ARCHS["llama"]}, scan_layers=scan),
      peft=dict(method="none", target=r".*self_attn/(q|v)_proj/kernel", rank=2, alpha=4.0,
                dropout=0.0, rslora=False, quant="", quant_block=64, double_quant=False,
                quantize="")))
  config.update(overrides)
  return config


def _train(config, steps=3):
  """The trainable parameters after `steps` SGD steps, and the frozen ones."""
  model, params = models.create(config.model, seed=0)
  model, params = methods.adapt(config, model, params, seed=0)
  trainable, frozen = methods.split(config, model, params)
  optimizer = optax.sgd(0.1)  # Adam would magnify rounding on near-zero gradients
  batch = _batch()

  @jax.jit
  def step(trainable, opt_state):
    grads = jax.grad(lambda t: _loss(model, param_groups.combine(t, frozen), batch))(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  opt_state = optimizer.init(trainable)
  for _ in range(steps):
    trainable, opt_state = step(trainable, opt_state)
  return trainable, frozen


@pytest.mark.parametrize("overrides", [
    dict(peft=dict(method="lora")),
    dict(freeze_blocks=1),
], ids=["lora", "freeze_blocks"])
def test_a_scanned_run_trains_like_the_loop(overrides):
  trained, frozen = _train(_train_config(False, **overrides))
  scanned, scanned_frozen = _train(_train_config(True, **overrides))
  paths = param_groups.flatten(trained)
  if "peft" in overrides:
    assert paths and all("lora" in p for p in paths)
  else:
    assert not any(p.startswith("model/layers/0/") for p in paths)
    assert any(p.startswith("model/layers/2/") for p in paths)
  _assert_trees_close(scanned, trained, 1e-6)
  _assert_trees_close(scanned_frozen, frozen, 0)


def test_a_checkpoint_written_by_the_loop_resumes_scanned(tmp_path):
  model, params = _create("llama")
  params = jax.tree.map(lambda x: x * 1.5, params)  # as if trained
  writer = checkpoint.Checkpointer(str(tmp_path), ml_collections.ConfigDict(
      dict(max_to_keep=1, use_async=False)))
  writer.save_best(1, params)
  writer.close()
  scanned, fresh = _create("llama", scan_layers=True)
  reader = checkpoint.Checkpointer(str(tmp_path), ml_collections.ConfigDict(
      dict(max_to_keep=1, use_async=False)))
  restored, _ = reader.restore_best(fresh)
  reader.close()
  _assert_trees_close(restored, params, 0)
  batch = _batch()
  np.testing.assert_allclose(jax.jit(scanned.apply, static_argnames="train")(
      restored, batch, train=False), jax.jit(model.apply, static_argnames="train")(
      params, batch, train=False), atol=1e-5)


def test_adapters_on_some_blocks_only_are_refused_by_name():
  model, params = _create("llama", scan_layers=True)
  module = model.module(params)
  spec = lora.LoraSpec(target=r"model/layers/[01]/self_attn/q_proj/kernel", rank=2, alpha=4.0)
  assert len(lora.inject(module, spec, nnx.Rngs(params=1))) == 2
  with pytest.raises(ConfigError, match="block 2 differs from it"):
    module(_batch())


@pytest.mark.parametrize("scan,remats", [
    (True, list(llama.REMAT_POLICIES)),
    # The policies are the same functions in the loop: one named one is enough there.
    (False, ["full", "save_dot_except_mlp"]),
], ids=["scanned", "loop"])
def test_every_remat_policy_gives_the_loss_and_gradients_of_none(scan, remats):
  # Two blocks, a window on one; one jit of every policy (a compile each would take longer).
  arch = {**_TINY, **_ARCHS["gemma3"], "num_hidden_layers": 2}
  model, params = models.create(tiny_decoders.model_config(arch=arch, scan_layers=scan),
                                seed=0)
  batch = _batch()
  remats = ["none", *remats]
  variants = [models.create(tiny_decoders.model_config(arch=arch, scan_layers=scan,
                                                       remat=remat), seed=0)[0]
              for remat in remats]

  @jax.jit
  def all_grads(params):
    return [jax.value_and_grad(functools.partial(_loss, variant))(params, batch)
            for variant in variants]

  (value, grads), *others = all_grads(params)
  for remat, (other_value, other_grads) in zip(remats[1:], others):
    np.testing.assert_allclose(other_value, value, rtol=1e-6, err_msg=remat)
    _assert_trees_close(other_grads, grads, 1e-5)


def test_a_scanned_model_compiles_one_loop_whatever_its_depth():
  texts = {}
  for depth in (2, 6):  # lowered only, not compiled
    arch = {**_TINY, **_ARCHS["llama"], "num_hidden_layers": depth}
    model, params = models.create(tiny_decoders.model_config(arch=arch, scan_layers=True),
                                  seed=0)
    lowered = jax.jit(jax.grad(functools.partial(_loss, model))).lower(params, _batch())
    texts[depth] = lowered.as_text()
    # The forward and the backward pass: one loop each.
    assert len(re.findall(r"stablehlo\.while", texts[depth])) == 2
  # The block is traced once: the program barely grows with depth (only the stacking).
  assert len(texts[6]) < 1.3 * len(texts[2])

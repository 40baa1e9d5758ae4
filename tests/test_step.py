"""The pure train step: gradient accumulation, masking, compute dtype, AdamW details."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import minilm_sentiment
import ml_collections

from ftjax import optim, state as state_lib, step as step_lib, tasks


CLASSIFICATION = tasks.get(ml_collections.ConfigDict(
    {"task": "classification", "model": {"num_classes": 3}}))


class LinearClassifier:
  """A model with the `Model.apply_with_stats` contract and no dropout, so steps are
  comparable."""

  def apply_with_stats(self, params, stats, batch, *, train, rng=None, features=False):
    del train, rng, features
    return batch["features"] @ params["head"]["kernel"] + params["head"]["bias"], stats


def _setup(lr=0.1, clip_norm=0.0):
  config = minilm_sentiment.get_config().optimizer
  config.unlock()
  config.lr, config.warmup_steps, config.clip_norm = lr, 0, clip_norm
  rng = np.random.default_rng(0)
  params = {"head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                     "bias": jnp.zeros((3,), jnp.float32)}}
  tx, schedule = optim.make_optimizer(config, params, total_steps=10)
  batch = {"features": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, size=8), jnp.int32),
           "mask": jnp.ones((8,), bool)}
  return state_lib.create(params, tx, seed=0), tx, schedule, batch


def _step(state, batch, tx, schedule, **kwargs):
  return jax.jit(lambda s, b: step_lib.train_step(
      s, {}, b, task=CLASSIFICATION, model=LinearClassifier(), tx=tx, schedule=schedule, **kwargs))(state, batch)


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_gradient_accumulation_equals_one_large_batch(micro_batches):
  state, tx, schedule, batch = _setup()
  one, m1 = _step(state, batch, tx, schedule)
  accumulated, m2 = _step(state, batch, tx, schedule, grad_accum_steps=micro_batches)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_masked_examples_do_not_count():
  state, tx, schedule, batch = _setup()
  padded = dict(batch, mask=batch["mask"].at[4:].set(False))
  garbage = dict(padded, features=padded["features"].at[4:].set(1e6),
                 label=padded["label"].at[4:].set(0))
  a, ma = _step(state, padded, tx, schedule)
  b, mb = _step(state, garbage, tx, schedule)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights():
  state, tx, schedule, batch = _setup()
  new, metrics = _step(state, batch, tx, schedule, compute_dtype=jnp.bfloat16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new.params))
  full, full_metrics = _step(state, batch, tx, schedule)
  np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=2e-2)


def test_weight_decay_skips_biases():
  state, tx, schedule, batch = _setup(lr=1.0)
  zero_grad_batch = dict(batch, mask=jnp.zeros((8,), bool))  # no example: only decay acts
  new, metrics = _step(state, zero_grad_batch, tx, schedule)
  assert float(metrics["grad_norm"]) == 0.0
  np.testing.assert_array_equal(new.params["head"]["bias"], state.params["head"]["bias"])
  np.testing.assert_allclose(new.params["head"]["kernel"],
                             state.params["head"]["kernel"] * (1 - 0.01), rtol=1e-6)


def _mean_loss(params, batch):
  logits = batch["features"] @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def _by_hand(params, batches, schedule, clip_norm):
  """AdamW written out (float64) on gradients clipped to `clip_norm` (0: not clipped), with
  the config's moments and decay; returns the parameters after one step per batch and each
  step's unclipped gradient norm."""
  config = minilm_sentiment.get_config().optimizer
  b1, b2, eps, decay = config.b1, config.b2, config.eps, config.weight_decay
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  mu = jax.tree.map(np.zeros_like, params)
  nu = jax.tree.map(np.zeros_like, params)
  norms = []
  for t, batch in enumerate(batches, 1):
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), jax.grad(_mean_loss)(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), batch))
    norms.append(np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads))))
    if clip_norm:
      grads = jax.tree.map(lambda g: g * min(1.0, clip_norm / norms[-1]), grads)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g ** 2, nu, grads)
    lr = float(schedule(t - 1))
    params = {"head": {
        name: p - lr * (mu["head"][name] / (1 - b1 ** t)
                        / (np.sqrt(nu["head"][name] / (1 - b2 ** t)) + eps)
                        + (decay * p if name == "kernel" else 0.0))  # no decay on biases
        for name, p in params["head"].items()}}
  return params, norms


@pytest.mark.parametrize("clip_norm", [0.0, 2.0, 0.1])  # off, the larger norm only, both
def test_clipping_scales_each_step_s_gradient_to_the_clip_norm(clip_norm):
  """Adam undoes a scale shared by every step's gradient, not one that differs between
  steps: two steps on batches whose gradient norms differ tell clipped from unclipped
  updates, and the results match AdamW written out by hand with the same clipping."""
  state, tx, schedule, small = _setup(clip_norm=clip_norm)
  large = dict(small, features=small["features"][::-1] * 4.0,  # a gradient norm ~4x larger
               label=small["label"][::-1])
  new, first = _step(state, small, tx, schedule)
  new, second = _step(new, large, tx, schedule)
  expected, norms = _by_hand(state.params, [small, large], schedule, clip_norm)
  assert 0.1 < norms[0] < 2.0 < norms[1]  # 2.0 clips the second step's gradient only
  # The reported norm is that of the gradient before clipping.
  np.testing.assert_allclose([first["grad_norm"], second["grad_norm"]], norms, rtol=1e-5)
  for path in (("head", "kernel"), ("head", "bias")):
    actual = new.params[path[0]][path[1]]
    np.testing.assert_allclose(actual, expected[path[0]][path[1]], rtol=1e-4, atol=1e-5,
                               err_msg="/".join(path))
  # ... and the other settings give results far outside that tolerance.
  for other in {0.0, 2.0, 0.1} - {clip_norm}:
    params, _ = _by_hand(state.params, [small, large], schedule, other)
    assert np.abs(params["head"]["kernel"] - expected["head"]["kernel"]).max() > 1e-3, other


def test_schedule_warmup_then_linear_decay():
  config = minilm_sentiment.get_config().optimizer
  config.unlock()
  config.lr, config.warmup_steps = 1.0, 4
  schedule = optim.make_schedule(config, 12)
  values = [float(schedule(i)) for i in (0, 2, 4, 8, 12)]
  np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_a_non_finite_loss_leaves_the_state_unchanged():
  state, tx, schedule, batch = _setup()
  poisoned = dict(batch, features=batch["features"].at[0, 0].set(jnp.nan))
  new, metrics = _step(state, poisoned, tx, schedule)
  assert metrics["nonfinite"] == 1.0 and int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  _, clean = _step(state, batch, tx, schedule)
  assert clean["nonfinite"] == 0.0

"""Dropout masks (`ftjax.models.dropout`): their keep rate, independence, scaling and cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.models import dropout as dropout_lib
from ftjax.peft import lora

_N = 1 << 18  # mask elements per statistical check


def _masks(key, rate, shape=(256, _N // 256), count=1):
  """`count` masks of successive draws of one rng stream, as float arrays."""

  @jax.jit
  def draw(key):
    layer, rngs = dropout_lib.Dropout(rate), nnx.Rngs(dropout=key)
    return [layer(jnp.ones(shape), deterministic=False, rngs=rngs) > 0 for _ in range(count)]

  return [np.asarray(mask, np.float64) for mask in draw(key)]


def _corr(a, b):
  return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_keep_rate_is_one_minus_rate_within_a_binomial_bound(rate):
  keep = dropout_lib.keep_prob(rate)
  assert abs(keep - (1 - rate)) <= 1 / 512  # the rate quantized to 1/256
  (mask,) = _masks(jax.random.PRNGKey(0), rate)
  sigma = np.sqrt(keep * (1 - keep) / mask.size)
  assert abs(mask.mean() - keep) < 5 * sigma
  # Every row keeps about as much: no row, column or byte position is biased.
  row_sigma = np.sqrt(keep * (1 - keep) / mask.shape[1])
  assert np.abs(mask.mean(axis=1) - keep).max() < 6 * row_sigma
  for offset in range(4):  # the four bytes of each 32-bit draw
    part = mask[:, offset::4]
    assert abs(part.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / part.size)


def test_masks_of_layers_steps_rows_and_bytes_are_independent():
  bound = 5 / np.sqrt(_N)  # |correlation| of independent masks: about 1 / sqrt(n)
  step_keys = [jax.random.fold_in(jax.random.PRNGKey(3), step) for step in (0, 1)]
  first_layer, second_layer = _masks(step_keys[0], 0.1, count=2)
  (next_step,) = _masks(step_keys[1], 0.1)
  assert abs(_corr(first_layer, second_layer)) < bound
  assert abs(_corr(first_layer, next_step)) < bound
  assert (first_layer != next_step).any()
  assert abs(_corr(first_layer[:128], first_layer[128:])) < 5 / np.sqrt(_N / 2)
  # Neighbouring bytes of one 32-bit draw.
  assert abs(_corr(first_layer[:, 0::4], first_layer[:, 1::4])) < 5 / np.sqrt(_N / 4)
  assert abs(_corr(first_layer[:, :-1], first_layer[:, 1:])) < 5 / np.sqrt(_N)


def test_same_key_same_masks():
  a, = _masks(jax.random.PRNGKey(7), 0.1, shape=(8, 64))
  b, = _masks(jax.random.PRNGKey(7), 0.1, shape=(8, 64))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_output_is_the_input_in_expectation(rate):
  x = jax.random.normal(jax.random.PRNGKey(1), (64,))
  keys = jax.random.split(jax.random.PRNGKey(2), 4096)
  y = np.asarray(jax.jit(jax.vmap(lambda k: dropout_lib.dropout(x, rate, k)))(keys))
  keep = dropout_lib.keep_prob(rate)
  kept = y != 0
  # Kept values are the input over the keep probability the masks have; the rest are 0.
  np.testing.assert_allclose(y[kept], np.broadcast_to(np.asarray(x) / keep, y.shape)[kept],
                             rtol=1e-6)
  sigma = np.abs(np.asarray(x)) * np.sqrt((1 - keep) / keep / len(keys))
  assert (np.abs(y.mean(axis=0) - np.asarray(x)) < 5 * sigma + 1e-7).all()


def test_bfloat16_input_keeps_its_dtype():
  x = jnp.ones((4, 33), jnp.bfloat16)
  y = dropout_lib.dropout(x, 0.5, jax.random.PRNGKey(0))
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  assert set(np.unique(np.asarray(y, np.float32))) <= {0.0, 2.0}


def test_rate_zero_and_evaluation_are_the_identity_and_draw_nothing():
  x = jnp.arange(12.0).reshape(3, 4)
  rngs = nnx.Rngs(dropout=0)
  count = int(rngs.dropout.count[...])
  assert dropout_lib.Dropout(0.0)(x, deterministic=False, rngs=rngs) is x
  assert dropout_lib.Dropout(0.3)(x, deterministic=True, rngs=rngs) is x
  assert int(rngs.dropout.count[...]) == count
  jaxpr = jax.make_jaxpr(lambda x, k: dropout_lib.dropout(x, 0.0, k))(x, jax.random.PRNGKey(0))
  assert "random_bits" not in str(jaxpr) and "threefry" not in str(jaxpr)


def test_stochastic_depth_drops_whole_examples():
  y = np.asarray(dropout_lib.dropout(jnp.ones((512, 3, 5)), 0.5, jax.random.PRNGKey(0),
                                     broadcast_shape=(512, 1, 1)))
  per_example = y.reshape(512, -1)
  assert (per_example == per_example[:, :1]).all()
  assert 0.35 < (per_example[:, 0] > 0).mean() < 0.65


def test_mask_is_the_same_when_sharded_by_rows():
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jnp.ones((len(jax.devices()) * 2, 10))
  run = lambda x: dropout_lib.dropout(x, 0.3, jax.random.PRNGKey(5))
  sharded = jax.jit(run, in_shardings=spec, out_shardings=spec)(jax.device_put(x, spec))
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(run)(x)))


def _identity_adapter(width: int, rate: float) -> lora.LoraLinear:
  """An adapter whose output is its dropped input (zero base, A = B = identity)."""
  base = nnx.Linear(width, width, use_bias=False, kernel_init=nnx.initializers.zeros,
                    rngs=nnx.Rngs(0))
  adapter = lora.LoraLinear(base, lora.LoraSpec(".*", rank=width, alpha=width, dropout=rate),
                            nnx.Rngs(params=0))
  adapter.lora_a[...] = jnp.eye(width)
  adapter.lora_b[...] = jnp.eye(width)
  return adapter


def test_lora_adapters_of_one_input_draw_independent_masks():
  width = 256

  @jax.jit
  def masks(x):  # adapters and rngs made in the trace, as `Model.apply` merges them
    query, value = _identity_adapter(width, 0.1), _identity_adapter(width, 0.1)
    rngs = nnx.Rngs(dropout=0)
    for adapter in (query, value):
      adapter.set_call_mode(train=True, rngs=rngs)
    outputs = [query(x) > 0, value(x) > 0]
    query.set_call_mode(train=False, rngs=None)
    return outputs + [query(x)]

  x = jnp.ones((_N // width, width))
  query, value, evaluated = masks(x)
  query, value = np.asarray(query, np.float64), np.asarray(value, np.float64)
  keep = dropout_lib.keep_prob(0.1)
  assert abs(query.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / _N)
  assert abs(_corr(query, value)) < 5 / np.sqrt(_N)
  np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(x))

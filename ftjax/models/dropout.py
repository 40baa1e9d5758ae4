"""Inverted dropout whose masks cost a byte of random bits per element.

Every model's dropout (hidden states, attention probabilities, LoRA adapters'
inputs, stochastic depth) draws its masks here. `jax.random.bernoulli` spends a
whole 32-bit draw and a float comparison on each element: on a CPU that was a
quarter of an encoder's train step, and every call site's random-bit generator
adds to the compile time. Here each 32-bit draw of the key's generator
(threefry, JAX's default, on every backend) is split into four bytes, and an
element is kept when its byte is at least `threshold`:

  threshold = round(rate * 256), clipped to [1, 255] for 0 < rate < 1
  keep_prob = 1 - threshold / 256   (the probability the masks actually have)
  y = x / keep_prob where kept, 0 elsewhere   (so E[y] = x)

The drop probability is thus `rate` rounded to a multiple of 1/256 (at most
1/512 away: 0.1 -> 0.1016, 0.05 -> 0.0508, 0.5 exactly). 16-bit draws would
round to 1/65536, but XLA:CPU compares and unpacks them three times slower than
bytes, giving up most of the saving (see docs/benchmarks.md).

Masks come from the key of the call (`rngs.dropout()`, folded from the step's
key), so a seed gives the same masks and a resumed run draws what an
uninterrupted one does. A rate of 0 (or a deterministic call) draws nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_BITS = 8
_LEVELS = 2 ** _BITS
_PER_WORD = 32 // _BITS


def threshold(rate: float) -> int:
  """The byte value below which an element is dropped, for `rate` in (0, 1)."""
  return min(max(round(rate * _LEVELS), 1), _LEVELS - 1)


def keep_prob(rate: float) -> float:
  """The probability that an element is kept at `rate` (quantized to 1/256)."""
  if rate <= 0:
    return 1.0
  if rate >= 1:
    return 0.0
  return 1.0 - threshold(rate) / _LEVELS


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """A boolean mask of `shape`, True with probability `keep_prob(rate)`, independently.

  The bytes are laid out along the last axis only (the words are drawn in `shape`
  with the last axis a quarter as long), so a mask sharded like its activations is
  drawn shard by shard.
  """
  requested = tuple(shape)
  shape = requested or (1,)
  words = jax.random.bits(key, shape[:-1] + (math.ceil(shape[-1] / _PER_WORD),), jnp.uint32)
  octets = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., words, 4]
  octets = octets.reshape(shape[:-1] + (-1,))[..., :shape[-1]]
  return (octets >= jnp.uint8(threshold(rate))).reshape(requested)


def dropout(x: jax.Array, rate: float, key: jax.Array,
            broadcast_shape: tuple[int, ...] | None = None) -> jax.Array:
  """Inverted dropout of `x`: kept values divided by the keep probability, others 0.

  Args:
    x: the input.
    rate: drop probability, in [0, 1] (quantized, see the module docstring).
    key: the rng key of this call.
    broadcast_shape: the mask's shape when it is shared along some axes (size 1
      there), e.g. one draw per example for stochastic depth; default `x.shape`.

  Returns:
    An array like `x`.
  """
  if rate <= 0:
    return x
  if rate >= 1:
    return jnp.zeros_like(x)
  mask = keep_mask(key, rate, x.shape if broadcast_shape is None else broadcast_shape)
  scaled = x / jnp.asarray(keep_prob(rate), x.dtype)
  return jnp.where(mask, scaled, jnp.zeros((), x.dtype))


class Dropout(nnx.Module):
  """`dropout` as a layer: `layer(x, deterministic=..., rngs=...)`, drawing its key from
  `rngs.dropout()` in training."""

  def __init__(self, rate: float):
    self.rate = float(rate)

  def __call__(self, x: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    if deterministic or self.rate <= 0:
      return x
    if rngs is None:
      raise ValueError("dropout in training needs rngs with a 'dropout' stream")
    return dropout(x, self.rate, rngs.dropout())

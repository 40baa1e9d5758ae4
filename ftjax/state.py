"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """Step counter, parameters (float32 master copy), optimizer state, base rng, and the
  batch statistics (running means and variances of BatchNorm layers; {} for models
  without them), which training updates without gradients."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  stats: Any


def create(params: Any, tx: optax.GradientTransformation, seed: int,
           stats: Any = None) -> TrainState:
  """Returns the state at step 0; the rng is a raw uint32 key, so checkpoints hold it."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                    stats={} if stats is None else stats)

"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """Step counter, parameters (float32 master copy), optimizer state, base rng, the
  batch statistics (running means and variances of BatchNorm layers; {} for models
  without them), which training updates without gradients, and the anchor of a
  regularized run ({"center"[, "weight"]}, trees like the parameters: the starting
  weights and each one's penalty weight, see `ftjax.regularizers`; {} without one)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  stats: Any
  anchor: Any = struct.field(default_factory=dict)


def create(params: Any, tx: optax.GradientTransformation, seed: int,
           stats: Any = None, anchor: str = "") -> TrainState:
  """Returns the state at step 0; the rng is a raw uint32 key, so checkpoints hold it.

  Args:
    params: the trainable parameters.
    tx: the optimizer.
    seed: of the rng.
    stats: the batch statistics, if any.
    anchor: "" (none), "center" (the starting parameters, all weighing 1) or
      "weighted" (also a weight per parameter, 1 until set).
  """
  anchor_tree = {}
  if anchor:
    anchor_tree["center"] = jax.tree.map(jnp.copy, params)
  if anchor == "weighted":
    anchor_tree["weight"] = jax.tree.map(jnp.ones_like, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                    stats={} if stats is None else stats, anchor=anchor_tree)

"""Config -> optax: learning-rate schedules, AdamW with per-parameter decay, clipping."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from ftjax import param_groups
from ftjax.config import check_choice
from ftjax.errors import ConfigError


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then linear or cosine decay to `lr * end_lr_factor`.

  Args:
    config: the `optimizer` config section (lr, warmup_steps, decay, end_lr_factor).
    total_steps: number of optimizer steps in the whole run.

  Returns:
    An optax schedule: step -> learning rate.
  """
  check_choice(config.decay, ("linear", "cosine", "constant"), "optimizer.decay")
  warmup = int(config.warmup_steps)
  if not 0 <= warmup <= total_steps:
    raise ConfigError(f"config.optimizer.warmup_steps={warmup}: must be in [0, {total_steps}]"
                      " (the total number of steps)")
  end = config.lr * config.end_lr_factor
  decay_steps = max(total_steps - warmup, 1)
  if config.decay == "linear":
    after = optax.linear_schedule(config.lr, end, decay_steps)
  elif config.decay == "cosine":
    after = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.end_lr_factor)
  else:
    after = optax.constant_schedule(config.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), after], [warmup])


class DecayWeightsState(NamedTuple):
  """`decay_weights` keeps no state."""


def decay_weights(rate: float, multipliers: Any) -> optax.GradientTransformation:
  """Adds `rate * multiplier * param` to each update (decoupled weight decay).

  Args:
    rate: the weight-decay coefficient.
    multipliers: a pytree like the parameters holding each leaf's multiplier
      (0.0 turns decay off for that leaf).

  Returns:
    An optax GradientTransformation.
  """

  def init_fn(params):
    del params
    return DecayWeightsState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decay_weights needs the parameters passed to update()")
    updates = jax.tree.map(lambda u, p, m: u + rate * m * p if m else u,
                           updates, params, multipliers)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup/decay schedule, per-parameter decay and global-norm clipping.

  Args:
    config: the `optimizer` config section.
    params: the parameter tree (only its structure and paths are used).
    total_steps: number of optimizer steps in the run.

  Returns:
    (optimizer, learning-rate schedule).
  """
  check_choice(config.name, ("adamw",), "optimizer.name")
  schedule = make_schedule(config, total_steps)
  multipliers = param_groups.assign(params, [tuple(r) for r in config.wd_mults],
                                    "config.optimizer.wd_mults")
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts += [
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      decay_weights(config.weight_decay, multipliers),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts), schedule


"""Config -> optax: schedules, AdamW with per-parameter decay and learning rates,
layer-wise learning-rate decay, gradual unfreezing, clipping."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ftjax import param_groups, schema
from ftjax.errors import ConfigError

DECAYS = ("linear", "cosine", "constant")


def _rules_problem(rules: Any) -> str:
  ok = all(isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
           and schema.is_number(r[1]) for r in rules)
  return "" if ok else "must be (regex, multiplier) pairs"


SCHEMA = schema.Section("optimizer", "AdamW, its learning-rate schedule and clipping.", {
    "name": schema.Key("adamw", "the optimizer", choices=("adamw",)),
    "lr": schema.Key(5e-5, "peak learning rate", rule=schema.positive),
    "b1": schema.Key(0.9, "Adam's first-moment decay", rule=schema.in_range(0, 1)),
    "b2": schema.Key(0.999, "Adam's second-moment decay", rule=schema.in_range(0, 1)),
    "eps": schema.Key(1e-8, "Adam's epsilon", rule=schema.positive),
    "weight_decay": schema.Key(0.01, "decoupled weight decay (times lr)",
                               rule=schema.at_least(0)),
    "wd_mults": schema.Key(((".*/bias", 0.0), (".*norm/scale", 0.0), (".*", 1.0)),
                           "(regex, multiplier) of the weight decay, first match wins",
                           rule=_rules_problem),
    "lr_mults": schema.Key(((".*", 1.0),), "(regex, multiplier) of the learning rate, first "
                           "match wins", rule=_rules_problem),
    "layer_decay": schema.Key(1.0, "layer-wise decay: lr * layer_decay**depth from the top "
                              "(1: off)", rule=schema.in_range(0, 1, low_open=True)),
    "unfreeze_every": schema.Key(0, "> 0: gradual unfreezing, one more block from the top "
                                 "every K steps", rule=schema.at_least(0)),
    "warmup_steps": schema.Key(60, "linear warmup from 0 to lr", rule=schema.at_least(0)),
    "decay": schema.Key("linear", "the decay after warmup", choices=DECAYS),
    "end_lr_factor": schema.Key(0.0, "the final learning rate as a fraction of lr",
                                rule=schema.in_range(0, 1)),
    "clip_norm": schema.Key(1.0, "clip the gradient's global norm (0: off)",
                            rule=schema.at_least(0)),
})


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then linear or cosine decay to `lr * end_lr_factor`.

  Args:
    config: the `optimizer` config section (lr, warmup_steps, decay, end_lr_factor).
    total_steps: number of optimizer steps in the whole run.

  Returns:
    An optax schedule: step -> learning rate.
  """
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


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's multiplier (per-parameter learning rates)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class TrainFromState(NamedTuple):
  count: jax.Array
  inner: Any


def train_from(inner: optax.GradientTransformation, starts: Any) -> optax.GradientTransformation:
  """Holds each parameter fixed until its start step (gradual unfreezing).

  Before a leaf's start step its gradient is zeroed on the way in (so it adds
  nothing to clipping norms or Adam moments) and its update on the way out (so
  weight decay does not move it either). Which leaves are active is computed
  from the step count inside the compiled step, so unfreezing never recompiles;
  the price is that gradients and Adam moments of every eventually trainable
  leaf exist from the start.

  Args:
    inner: the optimizer to wrap.
    starts: a pytree like the parameters holding each leaf's first trained step.

  Returns:
    An optax GradientTransformation.
  """

  def init_fn(params):
    return TrainFromState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    active = jax.tree.map(lambda start: state.count >= start, starts)
    hold = lambda tree: jax.tree.map(lambda x, a: jnp.where(a, x, jnp.zeros_like(x)), tree,
                                     active)
    updates, inner_state = inner.update(hold(updates), state.inner, params)
    return hold(updates), TrainFromState(state.count + 1, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int,
                   depths: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup/decay schedule, per-parameter decay and learning rates, clipping.

  Args:
    config: the `optimizer` config section.
    params: the trainable parameter tree (only its structure and paths are used).
    total_steps: number of optimizer steps in the run.
    depths: a pytree like `params` with each leaf's distance from the output
      (see `models.Layout.depth`); needed for `layer_decay` < 1 and `unfreeze_every`.

  Returns:
    (optimizer, learning-rate schedule).
  """
  schedule = make_schedule(config, total_steps)
  wd_mults = param_groups.assign(params, [tuple(r) for r in config.wd_mults],
                                 "config.optimizer.wd_mults")
  lr_mults = param_groups.assign(params, [tuple(r) for r in config.lr_mults],
                                 "config.optimizer.lr_mults")
  if config.layer_decay < 1.0:
    lr_mults = jax.tree.map(lambda m, d: m * config.layer_decay ** d, lr_mults, depths)
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts += [
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      decay_weights(config.weight_decay, wd_mults),
      optax.scale_by_learning_rate(schedule),
  ]
  if any(m != 1.0 for m in jax.tree.leaves(lr_mults)):
    parts.append(scale_by_multipliers(lr_mults))
  tx = optax.chain(*parts)
  if config.unfreeze_every:
    tx = train_from(tx, jax.tree.map(lambda d: d * config.unfreeze_every, depths))
  return tx, schedule

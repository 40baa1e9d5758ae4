"""Penalties that keep fine-tuned weights near where they started: L2-SP and EWC.

Both add strength / 2 * sum_i w_i (p_i - p0_i)**2 to the loss, where p0 are the
trainable parameters at the start of the run (the pretrained weights, or those
of the run named by `config.init_from` in continual fine-tuning), kept in the
training state's anchor:

- l2sp (Li et al., 2018): w_i = 1;
- ewc (Kirkpatrick et al., 2017): w_i = the diagonal of the empirical Fisher
  information, the mean over `config.regularizer.fisher_examples` training
  examples of `fisher_task` of the squared per-example gradient of the loss,
  computed once at the start with p0 and scaled to mean 1 over all trainable
  parameters, so a strength means about the same for both kinds.

The Fisher weights are part of the state, so a resumed run uses the same ones.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections

from ftjax import schema
from ftjax.data import mixture, registry
from ftjax.errors import ConfigError

KINDS = ("none", "l2sp", "ewc")


def fisher_task(config: ml_collections.ConfigDict) -> str:
  """The task whose training examples EWC's Fisher information is estimated on."""
  return (config.regularizer.fisher_task
          or registry.data_set_name(mixture.task_names(config.data.name)[0]))


def _check(config: ml_collections.ConfigDict) -> None:
  regularizer = config.regularizer
  if regularizer.kind != "none" and not regularizer.strength > 0:
    raise ConfigError(f"config.regularizer.strength={regularizer.strength!r}: must be > 0 "
                      f"for regularizer.kind={regularizer.kind!r}")
  if regularizer.kind != "ewc":
    return
  if not config.init_from:
    # A new zero-initialised head passes no gradient to the encoder at the start:
    # the Fisher information would weigh the head alone.
    raise ConfigError("config.regularizer.kind='ewc' needs config.init_from: the Fisher "
                      "information is that of the weights a previous run trained on "
                      "regularizer.fisher_task")
  names = [registry.data_set_name(name) for name in mixture.task_names(config.data.name)]
  if fisher_task(config) not in names:
    raise ConfigError(f"config.regularizer.fisher_task={regularizer.fisher_task!r}: not a "
                      f"task of this run; choose from {names}")


SCHEMA = schema.Section("regularizer", "A penalty toward the starting weights against "
                        "forgetting (continual fine-tuning).", {
    "kind": schema.Key("none", "l2sp: strength / 2 * sum (p - p0)**2; ewc: the same, "
                       "weighted by the diagonal Fisher information", choices=KINDS),
    "strength": schema.Key(0.0, "the penalty's strength", rule=schema.at_least(0)),
    "fisher_task": schema.Key("", "ewc: the task whose training examples estimate the "
                              "Fisher information (empty: the first task)"),
    "fisher_examples": schema.Key(512, "ewc: how many examples estimate it",
                                  rule=schema.positive),
}, check=_check)


def kind(config: ml_collections.ConfigDict) -> str:
  """The run's regularizer: one of KINDS."""
  return config.regularizer.kind


def anchor_layout(config: ml_collections.ConfigDict) -> str:
  """What the training state's anchor holds (see `ftjax.state.create`)."""
  return {"none": "", "l2sp": "center", "ewc": "weighted"}[kind(config)]


def penalty(params: Any, anchor: dict[str, Any], strength: float) -> tuple[jax.Array, Any]:
  """(strength / 2 * sum w (p - p0)**2, its gradient with respect to `params`); w = 1
  when the anchor has no "weight"."""
  diffs = jax.tree.map(jnp.subtract, params, anchor["center"])
  weighted = (jax.tree.map(jnp.multiply, anchor["weight"], diffs) if "weight" in anchor
              else diffs)
  value = 0.5 * strength * sum(jnp.vdot(w, d) for w, d in zip(jax.tree.leaves(weighted),
                                                               jax.tree.leaves(diffs)))
  return value, jax.tree.map(lambda g: strength * g, weighted)


def fisher_weights(fisher_step: Any, params: Any, stats: Any, frozen: Any,
                   batches: Iterable[dict[str, jax.Array]]) -> Any:
  """The diagonal empirical Fisher over `batches`, scaled to mean 1 over every entry.

  Args:
    fisher_step: the jitted `ftjax.step.fisher_step`.
    params, stats, frozen: the starting weights.
    batches: device batches of the examples to estimate it on.

  Raises:
    ConfigError: when the batches hold no example or every gradient is zero.
  """
  total, count = None, 0
  for batch in batches:
    sums, n = fisher_step(params, stats, frozen, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    count += int(n)
  if not count:
    raise ConfigError("regularizer.kind='ewc': no training examples to estimate the Fisher "
                      "information on")
  leaves = jax.tree.leaves(total)
  mean = sum(float(x.sum()) for x in leaves) / sum(x.size for x in leaves)
  if not mean > 0:
    raise ConfigError("regularizer.kind='ewc': the Fisher information is zero everywhere "
                      "(no trainable parameter affects the fisher_task's loss)")
  return jax.tree.map(lambda x: x / mean, total)

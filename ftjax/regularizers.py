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

from ftjax.errors import ConfigError

KINDS = ("none", "l2sp", "ewc")


def kind(config: ml_collections.ConfigDict) -> str:
  """The run's regularizer: one of KINDS."""
  regularizer = config.get("regularizer")
  return "none" if regularizer is None else regularizer.kind


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

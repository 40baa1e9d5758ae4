"""Pure train and eval steps, compiled once by the trainer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ftjax import param_groups
from ftjax.models import Model
from ftjax.state import TrainState

Batch = dict[str, jax.Array]


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts the floating-point leaves of `tree` to `dtype` (the compute dtype)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def classification_loss(logits: jax.Array, labels: jax.Array,
                        mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed cross-entropy, number of correct predictions and example count over `mask`."""
  logits = logits.astype(jnp.float32)
  weights = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (losses * weights).sum(), (correct * weights).sum(), weights.sum()


def _split_micro_batches(batch: Batch, num: int) -> Batch:
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} is not divisible into {num} micro-batches")
    return x.reshape(num, x.shape[0] // num, *x.shape[1:])
  return jax.tree.map(split, batch)


def train_step(state: TrainState, frozen: Any, batch: Batch, *, model: Model,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int = 1,
               compute_dtype: jnp.dtype = jnp.float32) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch`, accumulating gradients over micro-batches.

  The batch is split into `grad_accum_steps` micro-batches whose summed gradients
  are divided by the total number of examples, so the update equals that of one
  large batch. Parameters stay float32; the forward pass runs in `compute_dtype`.

  Args:
    state: the training state; `state.params` holds the trainable parameters.
    frozen: the frozen parameters (no gradient is computed for them).
    batch: arrays with leading batch dimension; `mask` marks real examples.
    model: the model (static).
    tx: the optimizer (static).
    schedule: the learning-rate schedule, for logging.
    grad_accum_steps: number of micro-batches.
    compute_dtype: dtype of the forward and backward pass.

  Returns:
    (new state, flat dict of scalar metrics).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_sum(params, micro, rng):
    everything = param_groups.combine(params, frozen)
    logits = model.apply(cast_floats(everything, compute_dtype), micro, train=True, rng=rng)
    total, correct, count = classification_loss(logits, micro["label"], micro["mask"])
    return total, (correct, count)

  value_and_grad = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(carry, xs):
    index, micro = xs
    (total, (correct, count)), grads = value_and_grad(
        state.params, micro, jax.random.fold_in(step_rng, index))
    sums = (carry[0] + total, carry[1] + correct, carry[2] + count)
    return (*sums, jax.tree.map(jnp.add, carry[3], grads)), None

  if grad_accum_steps == 1:  # no scan, no zero-initialised gradient accumulator
    (total, (correct, count)), grads = value_and_grad(state.params, batch, step_rng)
  else:
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), zeros)
    (total, correct, count, grads), _ = jax.lax.scan(
        accumulate, init, (jnp.arange(grad_accum_steps), micro_batches))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": total / denom, "accuracy": correct / denom,
             "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params: Any, frozen: Any, batch: Batch, *, model: Model, num_classes: int,
              compute_dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
  """Sums over the real (mask=True) examples of `batch`: loss, count, confusion matrix."""
  everything = param_groups.combine(params, frozen)
  logits = model.apply(cast_floats(everything, compute_dtype), batch, train=False)
  total, _, count = classification_loss(logits, batch["label"], batch["mask"])
  predictions = jnp.argmax(logits, -1)
  confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[
      batch["label"], predictions].add(batch["mask"].astype(jnp.float32))
  return {"loss_sum": total, "count": count, "confusion": confusion}

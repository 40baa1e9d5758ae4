"""Pure train and eval steps, compiled once by the trainer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ftjax import param_groups, regularizers
from ftjax.models import Model
from ftjax.state import TrainState
from ftjax.tasks import Task

Batch = dict[str, jax.Array]


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts the floating-point leaves of `tree` to `dtype` (the compute dtype)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def _split_micro_batches(batch: Batch, num: int) -> Batch:
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} is not divisible into {num} micro-batches")
    return x.reshape(num, x.shape[0] // num, *x.shape[1:])
  return jax.tree.map(split, batch)


def train_step(state: TrainState, frozen: Any, batch: Batch, *, model: Model, task: Task,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int = 1, compute_dtype: jnp.dtype = jnp.float32,
               penalty_strength: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch`, accumulating gradients over micro-batches.

  The batch is split into `grad_accum_steps` micro-batches whose summed losses
  and gradients are divided by the total weight (examples or target tokens), so
  the update equals that of one large batch. Parameters stay float32; the
  forward pass runs in `compute_dtype`.

  Args:
    state: the training state; `state.params` holds the trainable parameters,
      `state.stats` the batch statistics (updated by the forward pass).
    frozen: the frozen parameters (no gradient is computed for them).
    batch: arrays with leading batch dimension (see `ftjax.tasks`).
    model: the model (static).
    task: scores the logits (static).
    tx: the optimizer (static).
    schedule: the learning-rate schedule, for logging.
    grad_accum_steps: number of micro-batches.
    compute_dtype: dtype of the forward and backward pass.
    penalty_strength: of the penalty toward `state.anchor` (`ftjax.regularizers`),
      added to the mean loss when the state has an anchor.

  Returns:
    (new state, flat dict of scalar metrics: the task's train metrics (the loss
    without the penalty), penalty (when anchored), grad_norm, lr, and nonfinite:
    1.0 when the loss, the gradient norm or the update norm was NaN or infinite,
    in which case the new state is the old one with the step counted).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_sum(params, stats, micro, rng):
    everything = cast_floats(param_groups.combine(params, frozen), compute_dtype)
    outputs, stats = model.apply_with_stats(everything, stats, task.model_batch(micro),
                                            train=True, rng=rng, features=task.features)
    sums = task.train_sums(outputs, micro)
    return sums["loss"], (sums, stats)

  value_and_grad = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(carry, xs):
    index, micro = xs
    total, stats = carry
    (_, (sums, stats)), grads = value_and_grad(state.params, stats, micro,
                                               jax.random.fold_in(step_rng, index))
    return (jax.tree.map(jnp.add, total, (sums, grads)), stats), None

  if grad_accum_steps == 1:  # no scan, no zero-initialised gradient accumulator
    (_, (sums, stats)), grads = value_and_grad(state.params, state.stats, batch, step_rng)
  else:  # batch statistics carry from one micro-batch to the next
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    shapes = jax.eval_shape(value_and_grad, state.params, state.stats,
                            jax.tree.map(lambda x: x[0], micro_batches), step_rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1][0], shapes[1]))
    ((sums, grads), stats), _ = jax.lax.scan(
        accumulate, (zeros, state.stats), (jnp.arange(grad_accum_steps), micro_batches))
  denom = jnp.maximum(sums["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  metrics = {}
  if state.anchor:
    metrics["penalty"], penalty_grads = regularizers.penalty(state.params, state.anchor,
                                                             penalty_strength)
    grads = jax.tree.map(jnp.add, grads, penalty_grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update({k: v / denom for k, v in sums.items() if k != "weight"})
  metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
  # A non-finite loss, gradient or update leaves the state as it was (the step still
  # counts); the trainer stops or skips on `nonfinite` (config.on_nonfinite).
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            & jnp.isfinite(optax.global_norm(updates)))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            stats=keep(stats, state.stats))
  return new_state, metrics


def _outputs(params: Any, stats: Any, frozen: Any, batch: Batch, model: Model, task: Task,
             compute_dtype: jnp.dtype) -> Any:
  """The model's outputs on `batch` in evaluation mode, as the task scores them."""
  everything = cast_floats(param_groups.combine(params, frozen), compute_dtype)
  return model.apply(everything, task.model_batch(batch), train=False,
                     features=task.features, stats=stats)


def eval_step(params: Any, stats: Any, frozen: Any, batch: Batch, *, model: Model, task: Task,
              compute_dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
  """The task's evaluation sums over the real (mask=True) examples of `batch`."""
  return task.eval_sums(_outputs(params, stats, frozen, batch, model, task, compute_dtype),
                        batch)


def reference_step(params: Any, stats: Any, frozen: Any, batch: Batch, *, model: Model,
                   task: Task, compute_dtype: jnp.dtype = jnp.float32
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The reference log-probabilities [B, 2] of each pair of `batch` under these weights
  (`task.reference`), with the pairs' `pair_index` and `mask`."""
  outputs = _outputs(params, stats, frozen, batch, model, task, compute_dtype)
  return task.reference(outputs, batch), batch["pair_index"], batch["mask"]


def fisher_step(params: Any, stats: Any, frozen: Any, batch: Batch, *, model: Model, task: Task,
                compute_dtype: jnp.dtype = jnp.float32) -> tuple[Any, jax.Array]:
  """The squared per-example loss gradients summed over `batch`'s real examples, and
  their number (EWC's Fisher information, `ftjax.regularizers`).

  Examples go one at a time through a scan, so memory holds one gradient and the sum.
  """

  def example_loss(params, example):
    one = jax.tree.map(lambda x: x[None], example)
    everything = cast_floats(param_groups.combine(params, frozen), compute_dtype)
    outputs = model.apply(everything, task.model_batch(one), train=False,
                          features=task.features, stats=stats)
    return task.train_sums(outputs, one)["loss"]

  def add(total, example):
    squares = jax.tree.map(jnp.square, jax.grad(example_loss)(params, example))
    return jax.tree.map(jnp.add, total, squares), None

  total, _ = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), batch)
  return total, batch["mask"].sum()

"""Tasks: what a model's outputs are scored against, in training and in evaluation.

A `Task` gives the train step its loss and the eval step its summed statistics,
and turns the sums over a whole split into metrics. Everything is a sum over
weighted units (examples for classification, target tokens for language
modelling), so micro-batches, devices and hosts combine by addition and every
unit counts exactly once.

Batches carry `mask` [B] (False for evaluation padding rows). Classification
batches carry `label` [B], and image batches also `label_mix` [B] and `mix` [B]:
a training image blended by mixup or cutmix is scored as `mix` parts `label` and
`1 - mix` parts `label_mix` (evaluation batches have mix 1). Language-model
batches carry `targets` [B, L] (the next token at each position) and
`loss_mask` [B, L] (which targets count, e.g. only assistant tokens in chat
data).

A classification task scores logits. The language-model task scores hidden
states (`ftjax.models.Features`) with the model's unembedding, a chunk of tokens
at a time, so batch x length x vocabulary float32 logits never exist at once,
neither in the forward nor in the backward pass. With a plain head kernel and
`config.loss_grad` "fused" (the default), each chunk's head gradients are formed
with its forward pass (`ftjax.fused_loss`: three head matmuls, two when the head
is frozen); otherwise (an adapted or soft-capped head, or "recompute") chunks run
under `jax.checkpoint` and the backward pass recomputes their logits (four).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ftjax import fused_loss, schema, sharding, vocab_parallel
from ftjax.evals import classification as classification_evals

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """How logits are scored.

  Attributes:
    name: the task's config name.
    features: whether the task scores (hidden states, unembed function) rather
      than logits (see `Model.apply`).
    train_sums: (outputs, batch) -> sums with 'loss' and 'weight' (the number of
      units) and any other summed train metric; the step reports each as sum / weight.
    eval_sums: (outputs, batch) -> sums of evaluation statistics.
    summarize: numpy sums over a split -> metrics.
  """

  name: str
  features: bool
  train_sums: Callable[[jax.Array, Batch], Sums]
  eval_sums: Callable[[jax.Array, Batch], Sums]
  summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]


def _classification(num_classes: int, task_classes: Sequence[tuple[str, int]] = ()) -> Task:
  """Softmax cross-entropy over `num_classes` logits; with `task_classes` (name,
  count), a multi-task head: each task owns the next `count` logits, and an example
  (`batch["task"]`) is scored over its own task's logits only."""
  names = [name for name, _ in task_classes]
  sizes = np.array([count for _, count in task_classes], np.int32)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)

  def own_task(logits, batch):
    """Logits outside the example's task pushed to -1e9, labels as logit indices."""
    if not task_classes:
      return logits, batch["label"]
    start, size = jnp.asarray(starts)[batch["task"]], jnp.asarray(sizes)[batch["task"]]
    index = jnp.arange(num_classes)
    inside = (index >= start[:, None]) & (index < (start + size)[:, None])
    return jnp.where(inside, logits, -1e9), batch["label"] + start

  def scored(logits, batch):
    logits, labels = own_task(logits.astype(jnp.float32), batch)
    weights = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    predictions = jnp.argmax(logits, -1)
    return logits, labels, losses, predictions, weights

  def train_sums(logits, batch):
    logits, labels, losses, predictions, weights = scored(logits, batch)
    correct = (predictions == labels).astype(jnp.float32)
    if "mix" in batch:  # mixup / cutmix: a blend of two examples scores both labels
      mix = batch["mix"].astype(jnp.float32)
      other = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label_mix"])
      losses = mix * losses + (1 - mix) * other
      correct = mix * correct + (1 - mix) * (predictions == batch["label_mix"])
    return {"loss": (losses * weights).sum(), "accuracy": (correct * weights).sum(),
            "weight": weights.sum()}

  def eval_sums(logits, batch):
    _, labels, losses, predictions, weights = scored(logits, batch)
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[
        labels, predictions].add(weights)
    if not task_classes:
      return {"loss_sum": (losses * weights).sum(), "count": weights.sum(),
              "confusion": confusion}
    per_task = lambda values: jnp.zeros(len(names), jnp.float32).at[batch["task"]].add(values)
    return {"loss_sum": per_task(losses * weights), "count": per_task(weights),
            "confusion": confusion}  # block-diagonal: predictions stay in their task

  def summarize(sums):
    if not task_classes:
      return classification_evals.summarize(sums["loss_sum"], sums["count"], sums["confusion"])
    metrics, per_task = {}, []
    for t, name in enumerate(names):
      block = slice(starts[t], starts[t] + sizes[t])
      per_task.append(classification_evals.summarize(
          sums["loss_sum"][t], sums["count"][t], np.asarray(sums["confusion"])[block, block]))
      metrics.update({f"{name}/{key}": value for key, value in per_task[-1].items()})
    # Unweighted means over the tasks: what early stopping and sweeps compare by default.
    for key in ("loss", "accuracy", "macro_f1"):
      metrics[key] = float(np.mean([task[key] for task in per_task]))
    metrics["count"] = float(np.sum(sums["count"]))
    return metrics

  return Task("classification", False, train_sums, eval_sums, summarize)


def _token_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> Sums:
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"loss": (losses * weights).sum(), "accuracy": (correct * weights).sum(),
          "weight": weights.sum()}


def chunked_token_sums(hidden: jax.Array, unembed: Callable[[jax.Array], jax.Array],
                       targets: jax.Array, weights: jax.Array, chunk: int) -> Sums:
  """Summed next-token cross-entropy and accuracy, about `chunk` tokens of logits at a time.

  The chunks run along the sequence: each holds every row's next
  ceil(chunk / B) positions, so the batch dimension (split over devices) is
  never gathered.

  Args:
    hidden: [B, L, H] final hidden states.
    unembed: hidden [..., H] -> float32 logits [..., V].
    targets: [B, L] target ids.
    weights: [B, L] float weights (0 for tokens that do not count).
    chunk: tokens per chunk of logits; <= 0 scores all B x L tokens at once.

  Returns:
    {"loss", "accuracy", "weight"}: sums over the weighted tokens.
  """
  if chunk <= 0 or chunk >= targets.size:
    return _token_sums(unembed(hidden), targets, weights)

  @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of storing them
  def one(xs):
    h, t, w = xs
    return _token_sums(unembed(h), t, w)

  sums = jax.lax.map(one, fused_loss.split_chunks(hidden, targets, weights, chunk))
  return jax.tree.map(lambda x: x.sum(0), sums)


def _causal_lm(loss_chunk: int, loss_grad: str, mesh: Mesh | None,
               vocab_axes: tuple[str, ...], batch_axes: tuple[str, ...]) -> Task:
  def scored(features, batch):
    weights = batch["loss_mask"].astype(jnp.float32) * batch["mask"][:, None]
    kernel = features.kernel
    if (mesh is not None and kernel is not None and len(vocab_axes) == 1
        and vocab_parallel.applies(mesh, vocab_axes[0], kernel.shape[-1])):
      return vocab_parallel.token_sums(features.hidden, kernel, batch["targets"], weights,
                                       mesh=mesh, vocab_axis=vocab_axes[0],
                                       batch_axes=batch_axes, chunk=loss_chunk)
    tokens = batch["targets"].size
    if kernel is not None and loss_grad == "fused" and 0 < loss_chunk < tokens:
      return fused_loss.token_sums(features.hidden, kernel, batch["targets"], weights,
                                   loss_chunk)
    return chunked_token_sums(features.hidden, features.unembed, batch["targets"], weights,
                              loss_chunk)

  def summarize(sums):
    tokens = float(sums["weight"])
    loss = float(sums["loss"]) / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": float(sums["accuracy"]) / max(tokens, 1.0), "tokens": tokens}

  return Task("causal_lm", True, scored, scored, summarize)


TASKS = ("classification", "causal_lm")

SCHEMA = schema.Section("", "What the model's outputs are scored against.", {
    "task": schema.Key("classification", "classification (labels) or causal_lm (next "
                       "tokens)", choices=TASKS),
    "loss_chunk": schema.Key(1024, "causal_lm: tokens of logits computed at a time (0: all at "
                             "once)", rule=schema.at_least(0)),
    "loss_grad": schema.Key("fused", "causal_lm, chunked, plain head kernel: fused (the head's "
                            "gradients formed chunk by chunk in the forward pass: 3 head "
                            "matmuls) or recompute (the backward pass recomputes each chunk's "
                            "logits: 4)", choices=("fused", "recompute")),
})


def get(config: ml_collections.ConfigDict, mesh: Mesh | None = None,
        rules: sharding.Rules | None = None,
        task_classes: Sequence[tuple[str, int]] = ()) -> Task:
  """The task named by `config.task`.

  Classification reads `config.model.num_classes` and, for a multi-task run, takes
  `task_classes`: (name, number of classes) of each task, in order; causal_lm reads
  `config.loss_chunk` (tokens of logits per chunk; 0 = no chunking) and
  `config.loss_grad` (how a chunked loss with a plain head kernel gets its gradient).
  Given the run's `mesh` and axis `rules`, a language model whose vocabulary is
  split over a mesh axis computes its loss with `ftjax.vocab_parallel`.
  """
  if config.task == "classification":
    return _classification(config.model.num_classes, task_classes)
  vocab_axes = rules.mapping.get("vocab", ()) if rules else ()
  batch_axes = rules.batch_axes(mesh) if rules and mesh is not None else ()
  loss_grad = config.get("loss_grad", SCHEMA.keys["loss_grad"].default)
  return _causal_lm(config.loss_chunk, loss_grad, mesh, vocab_axes, batch_axes)

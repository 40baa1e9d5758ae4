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

Preference pairs (`ftjax.data.preference`) carry each token array as [B, 2, L],
a pair's chosen and rejected sequence; `Task.model_batch` (`pair_rows`) gives the
model [2B, L] rows. The preference task scores each sequence's completion
log-probability with a preference loss (`ftjax.pair_losses`: DPO, IPO, SimPO,
ORPO; `ref_logps` [B, 2] holds the reference model's), the reward task scores a
reward model's two outputs per pair with the Bradley-Terry loss; both count
pairs.

A classification task scores logits. The language-model task scores hidden
states (`ftjax.models.Features`) with the model's unembedding, a chunk of tokens
at a time, so batch x length x vocabulary float32 logits never exist at once,
neither in the forward nor in the backward pass. With a plain head kernel and
`config.loss_grad` "fused" (the default), each chunk's head gradients are formed
with its forward pass (`ftjax.fused_loss`: three head matmuls, two when the head
is frozen); otherwise (an adapted or soft-capped head, or "recompute") chunks run
under `jax.checkpoint` and the backward pass recomputes their logits (four). A
vocabulary split over a mesh axis (tensor parallelism) is scored by
`ftjax.vocab_parallel` in either way.
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

from ftjax import fused_loss, pair_losses, schema, sharding, vocab_parallel
from ftjax.evals import classification as classification_evals

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


def _same_batch(batch: Batch) -> Batch:
  return batch


def pair_rows(batch: Batch) -> Batch:
  """A batch of pairs as the model reads it: each [B, 2, L] token array as [2B, L] rows,
  a pair's chosen and rejected side by side; the per-pair arrays left out."""
  return {key: value.reshape(-1, value.shape[-1]) for key, value in batch.items()
          if value.ndim == 3}


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
    model_batch: the batch -> what the model reads (pair tasks: `pair_rows`).
    reference: (outputs, batch) -> [B, 2] log-probabilities of each pair's chosen and
      rejected completions, for a loss that compares with a reference model (computed
      once with the starting weights, `ftjax.reference`); None otherwise.
  """

  name: str
  features: bool
  train_sums: Callable[[jax.Array, Batch], Sums]
  eval_sums: Callable[[jax.Array, Batch], Sums]
  summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]
  model_batch: Callable[[Batch], Batch] = _same_batch
  reference: Callable[[jax.Array, Batch], jax.Array] | None = None


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
    inside = (index >= start[..., None]) & (index < (start + size)[..., None])
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


def token_log_probs(hidden: jax.Array, unembed: Callable[[jax.Array], jax.Array],
                    targets: jax.Array, chunk: int) -> jax.Array:
  """The log-probability [B, L] (float32) of each target token, about `chunk` tokens of
  logits at a time (chunks along the sequence, recomputed in the backward pass;
  <= 0: all at once)."""

  def one(xs):
    h, t = xs
    logits = unembed(h)
    picked = jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
    return picked - jax.nn.logsumexp(logits, -1)

  if chunk <= 0 or chunk >= targets.size:
    return one((hidden, targets))
  hidden_chunks, target_chunks, _ = fused_loss.split_chunks(
      hidden, targets, jnp.zeros(targets.shape, jnp.float32), chunk)
  per_token = jax.lax.map(jax.checkpoint(one), (hidden_chunks, target_chunks))
  return fused_loss.join_chunks(per_token)[:, :targets.shape[1]]


def _mean_metrics(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Each summed metric over the pairs divided by their number ("count")."""
  count = float(sums["weight"])
  metrics = {key: float(value) / max(count, 1.0) for key, value in sums.items()
             if key != "weight"}
  metrics["count"] = count
  return metrics


def _pair_sums(out: pair_losses.PairLoss, weights: jax.Array) -> Sums:
  """The per-pair loss and TRL's metrics summed over the weighted pairs."""
  total = lambda x: (x * weights).sum()
  return {"loss": total(out.loss), "weight": weights.sum(),
          "rewards/chosen": total(out.chosen_reward),
          "rewards/rejected": total(out.rejected_reward),
          "rewards/margins": total(out.chosen_reward - out.rejected_reward),
          "rewards/accuracies": total((out.chosen_reward > out.rejected_reward)
                                      .astype(jnp.float32)),
          "logps/chosen": total(out.chosen_logps), "logps/rejected": total(out.rejected_logps)}


def _preference(settings: pair_losses.Settings, loss_chunk: int) -> Task:
  """Preference tuning of a language model on pairs (`ftjax.pair_losses`)."""

  def scored(features, batch):
    rows = pair_rows(batch)
    per_token = token_log_probs(features.hidden, features.unembed, rows["targets"],
                                loss_chunk)
    completion = rows["loss_mask"].astype(jnp.float32)
    sums = (per_token * completion).sum(-1).reshape(-1, 2)
    counts = completion.sum(-1).reshape(-1, 2)
    logps = pair_losses.PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])
    return rows, per_token, logps

  def reference(features, batch):
    _, _, logps = scored(features, batch)
    return jnp.stack([logps.chosen, logps.rejected], axis=1)

  def pair_sums(features, batch):
    rows, per_token, logps = scored(features, batch)
    weights = batch["mask"].astype(jnp.float32)
    out = pair_losses.pair_loss(settings, logps,
                                batch["ref_logps"] if settings.needs_reference else None)
    sums = _pair_sums(out, weights)
    if settings.loss == "orpo":  # + the chosen sequences' mean token NLL, as TRL takes it
      segments = rows["segment_ids"]
      has_target = jnp.pad(segments[:, 1:] != 0, ((0, 0), (0, 1)))
      length = segments.shape[-1]
      chosen = has_target.reshape(-1, 2, length)[:, 0] * weights[:, None]
      nll = -(per_token.reshape(-1, 2, length)[:, 0] * chosen).sum() / jnp.maximum(
          chosen.sum(), 1.0)
      sums["nll_loss"] = weights.sum() * nll  # the step divides sums by the pairs
      sums["loss"] = sums["loss"] + sums["nll_loss"]
    return sums

  return Task("preference", True, pair_sums, pair_sums, _mean_metrics, pair_rows,
              reference if settings.needs_reference else None)


def _reward() -> Task:
  """A reward model on pairs: one score per side, Bradley-Terry loss, pairwise accuracy."""

  def pair_sums(logits, batch):
    scores = logits[..., 0].astype(jnp.float32).reshape(-1, 2)
    chosen, rejected = scores[:, 0], scores[:, 1]
    weights = batch["mask"].astype(jnp.float32)
    total = lambda x: (x * weights).sum()
    return {"loss": total(pair_losses.bradley_terry(chosen, rejected)),
            "accuracy": total((chosen > rejected).astype(jnp.float32)),
            "rewards/chosen": total(chosen), "rewards/rejected": total(rejected),
            "rewards/margins": total(chosen - rejected), "weight": weights.sum()}

  return Task("reward", False, pair_sums, pair_sums, _mean_metrics, pair_rows)


def _causal_lm(loss_chunk: int, loss_grad: str, mesh: Mesh | None,
               vocab_axes: tuple[str, ...], batch_axes: tuple[str, ...]) -> Task:
  def scored(features, batch):
    weights = batch["loss_mask"].astype(jnp.float32) * batch["mask"][:, None]
    kernel = features.kernel
    if (mesh is not None and kernel is not None and len(vocab_axes) == 1
        and vocab_parallel.applies(mesh, vocab_axes[0], kernel.shape[-1])):
      return vocab_parallel.token_sums(features.hidden, kernel, batch["targets"], weights,
                                       mesh=mesh, vocab_axis=vocab_axes[0],
                                       batch_axes=batch_axes, chunk=loss_chunk,
                                       loss_grad=loss_grad)
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


TASKS = ("classification", "causal_lm", "preference", "reward")

SCHEMA = schema.Section("", "What the model's outputs are scored against.", {
    "task": schema.Key("classification", "classification (labels), causal_lm (next "
                       "tokens), preference (a language model tuned on chosen / rejected "
                       "pairs) or reward (a reward model scoring pairs)", choices=TASKS),
    "loss_chunk": schema.Key(1024, "causal_lm: tokens of logits computed at a time (0: all at "
                             "once)", rule=schema.at_least(0)),
    "loss_grad": schema.Key("fused", "causal_lm, chunked, plain head kernel: fused (the head's "
                            "gradients formed chunk by chunk in the forward pass: 3 head "
                            "matmuls) or recompute (the backward pass recomputes each chunk's "
                            "logits: 4)", choices=("fused", "recompute")),
    "preference": {
        "loss": schema.Key("dpo", "preference: dpo (with label_smoothing: conservative DPO), "
                           "ipo, or the reference-free simpo and orpo",
                           choices=pair_losses.LOSSES),
        "beta": schema.Key(0.1, "preference: DPO / IPO / SimPO's beta, ORPO's weight of the "
                           "odds-ratio term (its lambda)", rule=schema.positive),
        "label_smoothing": schema.Key(0.0, "preference, dpo and simpo: the probability that "
                                      "a pair's preference is flipped",
                                      rule=schema.in_range(0.0, 0.49)),
        "simpo_gamma": schema.Key(0.5, "preference, simpo: the target reward margin gamma",
                                  rule=schema.at_least(0.0)),
    },
})


def get(config: ml_collections.ConfigDict, mesh: Mesh | None = None,
        rules: sharding.Rules | None = None,
        task_classes: Sequence[tuple[str, int]] = ()) -> Task:
  """The task named by `config.task`.

  Classification reads `config.model.num_classes` and, for a multi-task run, takes
  `task_classes`: (name, number of classes) of each task, in order; preference reads
  `config.preference` and `config.loss_chunk`; causal_lm reads
  `config.loss_chunk` (tokens of logits per chunk; 0 = no chunking) and
  `config.loss_grad` (how a chunked loss with a plain head kernel gets its gradient).
  Given the run's `mesh` and axis `rules`, a language model whose vocabulary is
  split over a mesh axis computes its loss with `ftjax.vocab_parallel`.
  """
  if config.task == "classification":
    return _classification(config.model.num_classes, task_classes)
  if config.task == "reward":
    return _reward()
  if config.task == "preference":
    return _preference(pair_losses.Settings(**config.preference), config.loss_chunk)
  vocab_axes = rules.mapping.get("vocab", ()) if rules else ()
  batch_axes = rules.batch_axes(mesh) if rules and mesh is not None else ()
  loss_grad = config.get("loss_grad", SCHEMA.keys["loss_grad"].default)
  return _causal_lm(config.loss_chunk, loss_grad, mesh, vocab_axes, batch_axes)

"""Tasks: what a model's outputs are scored against, in training and in evaluation.

A `Task` gives the train step its loss and the eval step its summed statistics,
and turns the sums over a whole split into metrics. Everything is a sum over
weighted units (examples for classification, target tokens for language
modelling), so micro-batches, devices and hosts combine by addition and every
unit counts exactly once.

Batches carry `mask` [B] (False for evaluation padding rows). Classification
batches carry `label` [B]; language-model batches carry `targets` [B, L] (the
next token at each position) and `loss_mask` [B, L] (which targets count, e.g.
only assistant tokens in chat data).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ftjax.config import check_choice
from ftjax.evals import classification as classification_evals

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """How logits are scored.

  Attributes:
    name: the task's config name.
    train_sums: (logits, batch) -> sums with 'loss' and 'weight' (the number of
      units) and any other summed train metric; the step reports each as sum / weight.
    eval_sums: (logits, batch) -> sums of evaluation statistics.
    summarize: numpy sums over a split -> metrics.
  """

  name: str
  train_sums: Callable[[jax.Array, Batch], Sums]
  eval_sums: Callable[[jax.Array, Batch], Sums]
  summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]


def _classification(num_classes: int) -> Task:
  def scored(logits, batch):
    logits = logits.astype(jnp.float32)
    weights = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    predictions = jnp.argmax(logits, -1)
    return losses, predictions, weights

  def train_sums(logits, batch):
    losses, predictions, weights = scored(logits, batch)
    correct = (predictions == batch["label"]).astype(jnp.float32)
    return {"loss": (losses * weights).sum(), "accuracy": (correct * weights).sum(),
            "weight": weights.sum()}

  def eval_sums(logits, batch):
    losses, predictions, weights = scored(logits, batch)
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[
        batch["label"], predictions].add(weights)
    return {"loss_sum": (losses * weights).sum(), "count": weights.sum(),
            "confusion": confusion}

  def summarize(sums):
    return classification_evals.summarize(sums["loss_sum"], sums["count"], sums["confusion"])

  return Task("classification", train_sums, eval_sums, summarize)


def _causal_lm() -> Task:
  def scored(logits, batch):
    logits = logits.astype(jnp.float32)
    weights = batch["loss_mask"].astype(jnp.float32) * batch["mask"][:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"loss": (losses * weights).sum(), "accuracy": (correct * weights).sum(),
            "weight": weights.sum()}

  def summarize(sums):
    tokens = float(sums["weight"])
    loss = float(sums["loss"]) / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": float(sums["accuracy"]) / max(tokens, 1.0), "tokens": tokens}

  return Task("causal_lm", scored, scored, summarize)


TASKS = ("classification", "causal_lm")


def get(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task` (classification reads `config.model.num_classes`)."""
  check_choice(config.task, TASKS, "task")
  if config.task == "classification":
    return _classification(config.model.num_classes)
  return _causal_lm()

"""Several classification data sets as one: examples tagged with their task, mixed for training.

A multi-task run names its data sets joined by "+" (`config.data.name =
"rotten_tomatoes+tweets"`). Every example carries `task`, the index of its data
set in that list. Evaluation splits are the data sets' splits one after the
other. The training split is a fixed table of (task, example) entries that the
pipeline shuffles like any split:

- `mixing="proportional"`: every training example of every task once, so a task
  is sampled in proportion to its size;
- `mixing="weights"`: as many entries as the trained tasks' examples together
  (those of weight > 0), task t taking the share weights[t] / sum(weights) of
  them: a small task's examples repeat, a large task's are subsampled (one
  seeded subset, fixed for the run). A weight of 0 leaves the task out of
  training; it is still evaluated (continual fine-tuning; with a little weight
  and `config.data.train_examples` as a buffer: replay).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftjax.errors import ConfigError

MIXINGS = ("proportional", "weights")


def task_names(data_name: str) -> list[str]:
  """The data sets of a (possibly "+"-joined) `config.data.name`."""
  names = [name.strip() for name in data_name.split("+")]
  if not all(names) or len(set(names)) != len(names):
    raise ConfigError(f"config.data.name={data_name!r}: expected data set names joined by "
                      "'+', each once")
  return names


class Tagged(Sequence):
  """A source whose examples gain `task`: their data set's index."""

  def __init__(self, source: Sequence[Any], task: int):
    self.source, self.task = source, task

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {**self.source[index], "task": np.int32(self.task)}


class Concatenation(Sequence):
  """Sources one after the other."""

  def __init__(self, sources: Sequence[Sequence[Any]]):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    part = bisect.bisect_right(self._ends, index)
    start = self._ends[part - 1] if part else 0
    return self.sources[part][index - start]


class _Entries(Sequence):
  """The examples of `source` at `indices` (repeats allowed)."""

  def __init__(self, source: Sequence[Any], indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]


def _shares(total: int, weights: Sequence[float]) -> list[int]:
  """`total` split in proportion to `weights`, rounding by largest remainder."""
  weights = np.asarray(weights, np.float64)
  exact = total * weights / weights.sum()
  counts = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - counts), kind="stable")[:total - counts.sum()]:
    counts[i] += 1
  return counts.tolist()


def check_weights(mixing: str, weights: Sequence[float], names: Sequence[str]) -> None:
  """Raises ConfigError for an unknown mixing or weights that do not fit the tasks."""
  if mixing not in MIXINGS:
    raise ConfigError(f"config.data.mixing={mixing!r}: must be one of {list(MIXINGS)}")
  if mixing == "weights":
    if len(weights) != len(names):
      raise ConfigError(f"config.data.weights={tuple(weights)!r}: needs one weight per task "
                        f"of {list(names)}")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
      raise ConfigError(f"config.data.weights={tuple(weights)!r}: weights must be >= 0 and "
                        "not all 0")


def training_mixture(sources: Sequence[Sequence[Any]], mixing: str,
                     weights: Sequence[float], seed: int) -> Sequence[Any]:
  """The training table of tagged `sources` (see the module docstring).

  Args:
    sources: each task's training split, already `Tagged`.
    mixing: "proportional" or "weights".
    weights: one per source (mixing="weights").
    seed: picks which examples of a subsampled or repeated task are used.
  """
  if mixing == "proportional":
    return Concatenation(sources)
  total = sum(len(s) for s, w in zip(sources, weights) if w > 0)
  rng = np.random.default_rng(seed)
  parts = []
  for source, count in zip(sources, _shares(total, weights)):
    if count == 0:
      continue
    passes = -(-count // len(source))
    order = np.concatenate([rng.permutation(len(source)) for _ in range(passes)])[:count]
    parts.append(_Entries(source, order))
  return Concatenation(parts)

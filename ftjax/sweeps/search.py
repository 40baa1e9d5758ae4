"""Hyperparameter search spaces for studies: grids and seeded random samples.

  for point in search.grid(**{"optimizer.lr": [1e-5, 3e-5], "optimizer.warmup_steps": [0, 30]}):
    add(config=..., seed=0, **point)

  for point in search.random(8, seed=0, **{"optimizer.lr": search.log_uniform(1e-5, 1e-3),
                                           "peft.rank": search.choice([4, 8, 16])}):
    add(config=..., seed=0, **point)

Each point is a dict of overrides; `launch/sweep.py` reports the best one by the
study's `SELECT` metric. Random values are rounded to 3 significant digits (they
name the runs), so two draws can coincide; the study then fails with "two runs
named ..." before anything starts: draw with another seed or a wider range.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable, Sequence

import numpy as np

from ftjax.errors import ConfigError


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """Every combination of the axes' values, the last axis varying fastest.

  Raises:
    ConfigError: for an axis without values.
  """
  lists = {}
  for name, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise ConfigError(f"grid axis {name!r}: expected a list of values, got {values!r}")
    lists[name] = list(values)
    if not lists[name]:
      raise ConfigError(f"grid axis {name!r}: no values")
  return [dict(zip(lists, values)) for values in itertools.product(*lists.values())]


@dataclasses.dataclass(frozen=True)
class Distribution:
  """A range to sample: uniform or log-uniform over [low, high], integers or reals,
  or a choice among values."""

  kind: str
  low: float = 0.0
  high: float = 0.0
  values: tuple[Any, ...] = ()

  def sample(self, rng: np.random.Generator) -> Any:
    """One value drawn with `rng`."""
    if self.kind == "choice":
      return self.values[int(rng.integers(len(self.values)))]
    if self.kind == "log_uniform":
      return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
    if self.kind == "int_uniform":
      return int(rng.integers(int(self.low), int(self.high) + 1))
    return _round(float(rng.uniform(self.low, self.high)))


def _round(value: float) -> float:
  """Three significant digits: readable run names, no loss that matters for a search."""
  return float(f"{value:.3g}")


def _check_range(kind: str, low: float, high: float) -> None:
  if not low < high:
    raise ConfigError(f"{kind}({low}, {high}): low must be below high")


def uniform(low: float, high: float) -> Distribution:
  """Uniform over [low, high]."""
  _check_range("uniform", low, high)
  return Distribution("uniform", low, high)


def log_uniform(low: float, high: float) -> Distribution:
  """Uniform in log space: each decade as likely as the next (learning rates)."""
  _check_range("log_uniform", low, high)
  if low <= 0:
    raise ConfigError(f"log_uniform({low}, {high}): the range must be positive")
  return Distribution("log_uniform", low, high)


def int_uniform(low: int, high: int) -> Distribution:
  """An integer in low..high, both included."""
  _check_range("int_uniform", low, high)
  return Distribution("int_uniform", low, high)


def choice(values: Sequence[Any]) -> Distribution:
  """One of `values`, each as likely."""
  if not list(values):
    raise ConfigError("choice([]): needs at least one value")
  return Distribution("choice", values=tuple(values))


def random(count: int, seed: int = 0, **space: Distribution) -> list[dict[str, Any]]:
  """`count` points drawn from `space`, the same for the same seed.

  Raises:
    ConfigError: for a count below 1 or an axis that is not a Distribution.
  """
  if count < 1:
    raise ConfigError(f"random search of {count} points: count must be >= 1")
  for name, distribution in space.items():
    if not isinstance(distribution, Distribution):
      raise ConfigError(f"random search axis {name!r}: expected uniform(), log_uniform(), "
                       f"int_uniform() or choice(), got {distribution!r}")
  rng = np.random.default_rng(seed)
  return [{name: distribution.sample(rng) for name, distribution in space.items()}
          for _ in range(count)]

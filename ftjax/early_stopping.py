"""Early stopping on a validation metric, with patience and a minimum improvement."""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from ftjax import schema

SCHEMA = schema.Section("early_stopping", "Which evaluation is best, and when to stop "
                        "without improvement.", {
    "metric": schema.Key("accuracy", "the validation metric that picks the best parameters"),
    "mode": schema.Key("max", "whether higher or lower is better", choices=("max", "min")),
    "patience": schema.Key(3, "evaluations without improvement before stopping (0: never "
                           "stop)", rule=schema.at_least(0)),
    "min_delta": schema.Key(0.0, "the smallest change that counts as improvement",
                            rule=schema.at_least(0)),
})


@dataclasses.dataclass
class EarlyStopping:
  """Tracks the best value of a metric; `stop` turns True after `patience` bad evals.

  patience <= 0 never stops early (the best checkpoint is still tracked).
  `best_metrics` keeps every metric of the best evaluation, so the run's final
  report need not evaluate the best parameters on that split again.
  """

  metric: str
  mode: str = "max"
  patience: int = 0
  min_delta: float = 0.0
  best: float | None = None
  best_step: int = -1
  bad_evals: int = 0
  stop: bool = False
  best_metrics: dict[str, float] | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EarlyStopping":
    return cls(metric=config.metric, mode=config.mode, patience=config.patience,
               min_delta=config.min_delta)

  def improved(self, value: float) -> bool:
    """Whether `value` beats the best so far by more than `min_delta`."""
    if self.best is None:
      return not math.isnan(value)
    if self.mode == "max":
      return value > self.best + self.min_delta
    return value < self.best - self.min_delta

  def update(self, step: int, metrics: dict[str, float]) -> bool:
    """Records an evaluation's metrics; returns True if it is the new best."""
    value = metrics[self.metric]
    if self.improved(value):
      self.best, self.best_step, self.bad_evals = value, step, 0
      self.best_metrics = {k: float(v) for k, v in metrics.items()}
      return True
    self.bad_evals += 1
    self.stop = 0 < self.patience <= self.bad_evals
    return False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> "EarlyStopping":
    return cls(**data)

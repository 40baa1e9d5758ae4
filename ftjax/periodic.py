"""The periodic work of the training loop, each piece small and named.

`Cadence` says at which steps a run logs, evaluates and checkpoints;
`NonFiniteGuard` acts on steps whose loss or gradient norm was not finite.
The loop itself (`ftjax.trainer`) calls them; their config keys are declared
here.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from ftjax import checkpoint, schema
from ftjax.errors import TrainingError
from ftjax.metrics import log_line


SCHEMA = schema.Section("", "What the training loop does besides training, and when.", {
    "log_every": schema.Key(20, "steps between training-metric records", rule=schema.positive),
    "eval_every": schema.Key(200, "steps between validations (also at the end)",
                             rule=schema.positive),
    "eval_at_epoch_end": schema.Key(True, "also validate when an epoch ends"),
    "eval_at_start": schema.Key(False, "validate the starting weights as step 0"),
    "test_at_start": schema.Key(False, "test the starting weights first (always with "
                                "init_from: the final metrics then show forgetting)"),
    "on_nonfinite": schema.Key("stop", "a NaN or infinite loss or gradient norm: stop with an "
                               "error naming the step, or skip the update",
                               choices=("stop", "skip")),
    "max_nonfinite_skips": schema.Key(10, "on_nonfinite='skip': at most this many skipped "
                                      "steps", rule=schema.at_least(0)),
    "samples": {
        "count": schema.Key(3, "causal_lm: completions of validation prompts written at each "
                            "validation (0: none)", rule=schema.at_least(0)),
        "max_new_tokens": schema.Key(32, "causal_lm: tokens per completion",
                                     rule=schema.positive),
        "prompt_tokens": schema.Key(32, "causal_lm text data: continue the first N tokens "
                                    "of a passage", rule=schema.positive),
    },
})


@dataclasses.dataclass(frozen=True)
class Cadence:
  """At which steps a run of `total_steps` logs, validates and checkpoints."""

  total_steps: int
  steps_per_epoch: int
  log_every: int
  eval_every: int
  eval_at_epoch_end: bool
  checkpoint_every: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> "Cadence":
    return cls(total_steps, steps_per_epoch, config.log_every, config.eval_every,
               config.eval_at_epoch_end, config.checkpoint.every)

  def last(self, step: int) -> bool:
    return step == self.total_steps

  def logs(self, step: int) -> bool:
    return step % self.log_every == 0 or self.last(step)

  def validates(self, step: int) -> bool:
    epoch_end = self.eval_at_epoch_end and step % self.steps_per_epoch == 0
    return step % self.eval_every == 0 or epoch_end or self.last(step)

  def checkpoints(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or self.last(step)


class NonFiniteGuard:
  """Stops training, or skips the step, when its loss or gradient norm is NaN or infinite.

  The train step already left the state unchanged on such a step; this decides
  whether to go on (`config.on_nonfinite="skip"`, at most
  `config.max_nonfinite_skips` times) or stop with an error naming the step
  (`"stop"`, the default). The check reads the flag one step late, so the host
  never waits for the device.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.policy = config.on_nonfinite
    self.max_skips = config.max_nonfinite_skips
    self.skipped: list[int] = []
    self._pending: tuple[int, jax.Array] | None = None

  def check(self, step: int, flag: jax.Array, checkpointer: checkpoint.Checkpointer) -> None:
    """Records `step`'s flag and acts on the previous step's."""
    pending, self._pending = self._pending, (step, flag)
    if pending is not None:
      self._act(*pending, checkpointer)

  def finish(self, checkpointer: checkpoint.Checkpointer) -> None:
    if self._pending is not None:
      self._act(*self._pending, checkpointer)
      self._pending = None

  def _act(self, step: int, flag: jax.Array, checkpointer: checkpoint.Checkpointer) -> None:
    if not float(jax.device_get(flag)):
      return
    latest = checkpointer.latest_step()
    kept = ("no checkpoint was written yet" if latest is None
            else f"the latest checkpoint (step {latest}) is intact")
    where = (f"non-finite loss or gradient norm at step {step}: the update was not applied; "
             f"{kept}")
    if self.policy == "skip" and len(self.skipped) < self.max_skips:
      self.skipped.append(step)
      log_line(f"{where}; skipped ({len(self.skipped)} of at most {self.max_skips})")
      return
    checkpointer.wait()
    raise TrainingError(f"{where}; training stopped (on_nonfinite={self.policy!r}, "
                        f"{len(self.skipped)} step(s) skipped before: {self.skipped})")

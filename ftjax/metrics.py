"""Metric writers (JSONL and TensorBoard event files) and progress lines with ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):
    return value.item() if np.ndim(value) == 0 else value.tolist()
  return value


# Records written by the end of a run (after its last checkpoint), which a start that
# resumes from that checkpoint writes again.
END_SPLITS = ("test",)


class MetricWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard event files in the workdir.

  TensorBoard events are written with tensorboardX, so TensorFlow is not needed.
  Only the writing process (process 0 on multi-host runs) creates files, and only
  once there is something to write: a run refused before its first record leaves
  the workdir as it was.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               trackers: Any = None):
    """`tensorboard`: write TensorBoard events too; `trackers`: a `ftjax.trackers.Trackers`
    that gets every record of scalar metrics as well."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.tensorboard = tensorboard
    self.trackers = trackers
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._tb_writer = None

  @property
  def _tb(self) -> Any:
    """The TensorBoard event writer, created on first use."""
    if self._tb_writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb_writer = SummaryWriter(self._tb_dir)
    return self._tb_writer

  def truncate_after(self, step: int) -> None:
    """Makes the log what an uninterrupted run had logged when its checkpoint of `step`
    was written (-1: nothing), for a start that continues from that checkpoint.

    Dropped: records past `step`, the end-of-run records (split 'test'; the end of
    the run is done again), and a last line cut short by a kill. The TensorBoard
    events are then written again from the records kept, so a killed start's
    points are not shown twice.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = [record for record in read_metrics(os.path.dirname(self.path))
            if record["step"] <= step and record["split"] not in END_SPLITS]
    temporary = self.path + ".tmp"
    with open(temporary, "w") as f:
      f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(temporary, self.path)  # a kill leaves the old log or the new one
    self._rewrite_tensorboard(kept)

  def _rewrite_tensorboard(self, records: list[dict[str, Any]]) -> None:
    """Replaces the TensorBoard event files with one holding `records`."""
    if not self.tensorboard:
      return
    self.close()
    self._tb_writer = None
    if os.path.isdir(self._tb_dir):
      for name in os.listdir(self._tb_dir):
        if name.startswith("events.out.tfevents."):
          os.remove(os.path.join(self._tb_dir, name))
    for record in records:
      if record["split"] == "samples":
        self._add_samples(record["step"], record["samples"])
      else:
        metrics = {k: v for k, v in record.items() if k not in ("step", "split")}
        self._add_scalars(record["step"], record["split"], metrics)
    if self._tb_writer is not None:
      self._tb.flush()

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Records scalar metrics of `split` ('train', 'validation', 'test') at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.trackers is not None:
      self.trackers.log(int(step), split, {k: v for k, v in record.items()
                                           if k not in ("step", "split")})
    if self.tensorboard:
      self._add_scalars(step, split, metrics)
      self._tb.flush()

  def _add_scalars(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
      if np.ndim(value) == 0:
        self._tb.add_scalar(f"{split}/{key}", float(value), int(step))

  def write_samples(self, step: int, samples: list[dict[str, str]]) -> None:
    """Records generated texts ({"prompt", "completion"} each) at `step`."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": "samples", "samples": samples}) + "\n")
    if self.tensorboard:
      self._add_samples(step, samples)
      self._tb.flush()

  def _add_samples(self, step: int, samples: list[dict[str, str]]) -> None:
    text = "\n\n".join(f"**prompt** {s['prompt']!r}\n\n**completion** {s['completion']!r}"
                       for s in samples)
    self._tb.add_text("samples", text, int(step))

  def close(self) -> None:
    if self._tb_writer is not None:
      self._tb_writer.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Returns the records of a run's `metrics.jsonl` (without a last line that a kill cut
  short: each record is appended whole, ending with a newline)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


class Progress:
  """Formats 'step/total, loss, lr, steps/s, examples/s, ETA' lines."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def line(self, step: int, metrics: dict[str, float]) -> str:
    """Returns the progress line for `step`; rates are measured since the last call."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    return (f"step {step}/{self.total_steps} {values} {rate:.2f} steps/s "
            f"{rate * self.batch_size:.1f} examples/s ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def log_line(text: str) -> None:
  """Logs `text` and prints it on process 0 (absl logging is not shown by default
  outside launchers; the processes of a multi-process run print each line once)."""
  logging.info("%s", text)
  if jax.process_index() == 0:
    print(text, flush=True)

"""What a run was made with: code version, packages, devices, seed (`run_info.json`).

Written by process 0 into the workdir when a run starts (and again when it
resumes: each start is appended to `starts`), next to the resolved
`config.json`, `metrics.jsonl`, the TensorBoard events and, at the end,
`final_metrics.json`, so a run folder says everything needed to compare or
repeat it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ftjax import nested

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
             "ml-collections", "tensorflow-datasets", "transformers", "tokenizers")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO_FILE = "run_info.json"


def package_versions() -> dict[str, str | None]:
  """Installed versions of the packages a run's numbers depend on (None: not installed)."""
  versions: dict[str, str | None] = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def git_state(path: str = _REPO) -> dict[str, Any]:
  """{"commit", "dirty"} of the checkout holding `path`; commit None outside a git checkout."""
  def git(*args: str) -> str | None:
    try:
      out = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                           timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no") if commit else None
  return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {"platform": devices[0].platform, "kind": devices[0].device_kind,
          "count": len(devices), "local_count": jax.local_device_count(),
          "process_count": jax.process_count()}


def run_info(seed: int) -> dict[str, Any]:
  """This start of a run: when, where, with what code, packages and devices."""
  return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
          "argv": sys.argv, "seed": seed, "git": git_state(), "packages": package_versions(),
          "devices": device_info()}


def facts(workdir: str) -> dict[str, Any]:
  """The facts of `workdir`'s run_info.json (its first start), flattened: "git.commit",
  "packages.jax", "devices.kind", ...; lists as text."""
  record = _read_info(os.path.join(workdir, INFO_FILE)) or {}
  flat = nested.leaves({k: v for k, v in record.items() if k != "starts"})
  return {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in flat.items()}


def _read_info(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:  # a half-written file from a killed start: begin it again
    return None


def _write_info(path: str, record: dict[str, Any]) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(temporary, path)


class RunClock:
  """The time a run has cost, over all its starts, killed ones included.

  Each start's entry in `run_info.json` holds its `seconds` so far, brought up to
  date by `update()` (the trainer calls it at every logged step and at the end),
  so a start that is killed leaves its share up to its last update.
  """

  def __init__(self, path: str, record: dict[str, Any] | None, started: float,
               earlier_seconds: float):
    """`record`: the run_info.json this process wrote, this start last (None: not process
    0, which alone writes)."""
    self._path = path
    self._record = record
    self._started = started
    self.earlier_seconds = earlier_seconds

  def update(self) -> float:
    """Writes this start's seconds so far into its `run_info.json` entry (process 0);
    returns the seconds of every start of the run, this one up to now."""
    seconds = time.perf_counter() - self._started
    if self._record is not None:
      self._record["starts"][-1]["seconds"] = round(seconds, 3)
      _write_info(self._path, self._record)
    return self.earlier_seconds + seconds


def record_start(workdir: str, seed: int, started: float) -> RunClock:
  """Appends this start to `workdir/run_info.json` (process 0 only); returns its clock.

  The first start's fields are kept at the top level; every start, the first
  included, is listed under "starts", so a resumed run shows each machine and
  code version it ran on, and how long each start ran.

  Args:
    workdir: the run folder.
    seed: the run's seed.
    started: `time.perf_counter()` when this start began.
  """
  info = run_info(seed)
  path = os.path.join(workdir, INFO_FILE)
  earlier, record = 0.0, None
  if jax.process_index() == 0:
    record = _read_info(path) or dict(info)
    earlier = sum(start.get("seconds", 0.0) for start in record.get("starts", []))
    this_start = {**info, "seconds": round(time.perf_counter() - started, 3)}
    record["starts"] = [*record.get("starts", []), this_start]
    _write_info(path, record)
  if jax.process_count() > 1:  # every process returns the same total
    earlier = float(multihost_utils.broadcast_one_to_all(np.float32(earlier)))
  return RunClock(path, record, started, earlier)

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


def record_start(workdir: str, seed: int) -> dict[str, Any]:
  """Appends this start to `workdir/run_info.json` (process 0 only) and returns it.

  The first start's fields are kept at the top level; every start, the first
  included, is listed under "starts", so a resumed run shows each machine and
  code version it ran on.
  """
  info = run_info(seed)
  if jax.process_index() != 0:
    return info
  path = os.path.join(workdir, INFO_FILE)
  record = dict(info)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        record = json.load(f)
    except ValueError:  # a half-written file from a killed start: begin it again
      record = dict(info)
  record["starts"] = [*record.get("starts", []), info]
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(temporary, path)
  return info

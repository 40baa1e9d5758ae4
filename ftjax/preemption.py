"""SIGTERM as a preemption notice: finish the step, checkpoint, exit with `EXIT_CODE`.

Cloud TPU maintenance events, spot/preemptible VMs, Kubernetes and SLURM
(`scancel`, the end of a job's time limit with `--signal`) send SIGTERM some
seconds before they kill a process. While `handling()` is active, SIGTERM only
sets a flag; the trainer checks it after every step (`requested()`; on a
multi-process run the processes agree, so all of them stop at the same step),
writes a checkpoint of that step and raises `Preempted`, and `launch/train.py`
exits with `EXIT_CODE` (75, EX_TEMPFAIL: "try again"). Starting the same
command again resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from ftjax.errors import FtjaxError

EXIT_CODE = 75
_requested = threading.Event()


class Preempted(FtjaxError):
  """Training stopped on SIGTERM after writing a checkpoint."""

  def __init__(self, step: int):
    super().__init__(f"preempted (SIGTERM) after step {step}; its checkpoint is written")
    self.step = step


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """SIGTERM sets the preemption flag instead of killing the process (main thread only;
  elsewhere nothing changes)."""
  _requested.clear()
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _requested.set())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def requested() -> bool:
  """Whether SIGTERM arrived (on any process of the run)."""
  flag = _requested.is_set()
  if jax.process_count() == 1:
    return flag
  with jax.transfer_guard("allow"):
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))

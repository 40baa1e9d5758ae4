"""Several processes train one model: the same result as one process; a dead process stops all.

Each test starts real processes on 127.0.0.1 that join through jax.distributed,
each with 4 CPU devices, and train the MiniLM debug config for 4 steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import minilm_sentiment
from ftjax import distributed, trainer

from conftest import REPO

LOCAL = os.path.join(REPO, "launch", "local.py")
TRAIN = os.path.join(REPO, "launch", "train.py")
DEBUG = "configs/minilm_sentiment.py:debug"
STEPS = 4
EVAL_EXAMPLES = 64
# Float32 sums taken in another order (all-reduces across processes vs within one)
# differ in the last bits; the largest difference measured over the whole state
# (parameters and Adam moments) is 1.2e-7.
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
METRIC_RTOL = 1e-5
# The survivor's last line: its supervisor's (when jax or gloo aborted it) or its own
# (when the lost peer surfaced as a Python error).
PEER_LOST = re.compile(r"error: process 0 of 2 (was stopped by SIGABRT|failed): .*another "
                       r"process of the run stopped")


def _env() -> dict[str, str]:
  """The test environment, importing ftjax from this checkout."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  return env


def _overrides(data_dir: str) -> list[str]:
  return [f"--config.data.data_dir={data_dir}", f"--config.total_steps={STEPS}",
          f"--config.data.max_eval_examples={EVAL_EXAMPLES}"]


def _read_jsonl(path) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def _restore(path, like: Any = None) -> Any:
  """A checkpointed pytree as numpy arrays, in the structure of `like` if given.

  A checkpoint written by several processes names devices this process lacks, so
  it is restored into `like`'s shapes on this process's first device.
  """
  target = None
  if like is not None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          like)
  return jax.tree.map(np.asarray,
                      ocp.StandardCheckpointer().restore(os.path.abspath(path), target))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
  """1 process x 8 devices (this one)."""
  workdir = tmp_path_factory.mktemp("one_process")
  config = minilm_sentiment.get_config("debug")
  config.unlock()
  config.data.data_dir = data_dir
  config.total_steps = STEPS
  config.data.max_eval_examples = EVAL_EXAMPLES
  config.lock()
  assert jax.process_count() == 1 and jax.device_count() == 8
  trainer.run(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_dir, one_process):  # one_process prepares the data
  """2 processes x 4 devices, started by launch/local.py."""
  del one_process
  workdir = tmp_path_factory.mktemp("two_processes")
  started = time.monotonic()
  result = subprocess.run(
      [sys.executable, LOCAL, "--num_processes=2", "--devices_per_process=4",
       f"--config={DEBUG}", f"--workdir={workdir}", *_overrides(data_dir)],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  print(f"2 processes x 4 devices: {time.monotonic() - started:.0f} s")
  return workdir, result.stdout


def test_two_processes_train_like_one(one_process, two_processes):
  workdir, stdout = two_processes
  for i in range(2):
    assert f"[process {i}] process {i} of 2 " in stdout
  assert "4 local / 8 global cpu device(s)" in stdout
  # Progress lines come once, from process 0.
  assert f"[process 0] {STEPS} steps" in stdout and f"[process 1] {STEPS} steps" not in stdout
  assert "all 2 processes finished" in stdout

  # Process 0 alone writes the records; they match the single process's.
  records, expected = _read_jsonl(workdir / "metrics.jsonl"), _read_jsonl(
      one_process / "metrics.jsonl")
  assert [(r["step"], r["split"]) for r in records] == [
      (r["step"], r["split"]) for r in expected]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
  for record, reference in zip(records, expected):
    assert record.keys() == reference.keys()
    for key, value in reference.items():
      if isinstance(value, float):
        np.testing.assert_allclose(record[key], value, rtol=METRIC_RTOL, err_msg=key)
      else:
        assert record[key] == value, key

  # The cooperatively written checkpoints hold the single process's state.
  assert os.listdir(workdir / "checkpoints") == os.listdir(one_process / "checkpoints")
  reference = _restore(one_process / "checkpoints" / str(STEPS) / "state")
  state = _restore(workdir / "checkpoints" / str(STEPS) / "state", reference)
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  for leaf, expected_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_allclose(leaf, expected_leaf, rtol=PARAM_RTOL, atol=PARAM_ATOL)
  reference = _restore(one_process / "best" / str(STEPS) / "default")
  best = _restore(workdir / "best" / str(STEPS) / "default", reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=PARAM_RTOL,
                                                      atol=PARAM_ATOL), best, reference)
  final = json.loads((workdir / "final_metrics.json").read_text())
  expected_final = json.loads((one_process / "final_metrics.json").read_text())
  assert final["best_step"] == expected_final["best_step"] == STEPS
  for split in ("validation", "test"):
    assert final[split]["count"] == expected_final[split]["count"] == EVAL_EXAMPLES
    np.testing.assert_allclose(final[split]["loss"], expected_final[split]["loss"],
                               rtol=METRIC_RTOL)
    assert final[split]["accuracy"] == expected_final[split]["accuracy"]


def _wait_for_training(workdir, processes, timeout: float = 300) -> None:
  """Waits until process 0 has logged a training step."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for i, process in enumerate(processes):
      assert process.poll() is None, f"process {i} ended before training started"
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line)["split"] == "train" for line in f if line.endswith("\n")):
          return
    time.sleep(0.1)
  raise TimeoutError(f"no training step logged in {timeout} s")


class _Processes:
  """Two launch/train.py processes joined on 127.0.0.1, each with 4 CPU devices."""

  def __init__(self, folder, data_dir: str, extra: tuple[list[str], list[str]] = ([], [])):
    address = f"127.0.0.1:{distributed.free_port()}"
    env = {**_env(), **distributed.cpu_process_env(4)}
    self.workdir = folder / "run"
    self.logs = [folder / f"process_{i}.log" for i in range(2)]
    self.processes = []
    for i in range(2):
      with open(self.logs[i], "w") as log:
        self.processes.append(subprocess.Popen(
            [sys.executable, TRAIN, f"--config={DEBUG}", f"--workdir={self.workdir}",
             *_overrides(data_dir), "--config.total_steps=1000",
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
             *extra[i]], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def wait(self, i: int, timeout: float) -> tuple[int, float]:
    """(exit code, seconds waited) of process i."""
    started = time.monotonic()
    code = self.processes[i].wait(timeout=timeout)
    return code, time.monotonic() - started

  def close(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def test_killed_process_stops_the_others(tmp_path, data_dir, one_process):
  """SIGKILL of process 1: process 0 exits non-zero within 60 s, saying why.

  The signal goes to process 1's supervisor, and its training child follows it.
  Process 0 hosts the coordination service, so it learns of the death from the
  missed heartbeats (or from its collectives), not from a lost connection.
  """
  del one_process  # prepares the data
  run = _Processes(tmp_path, data_dir)
  try:
    _wait_for_training(run.workdir, run.processes)
    run.processes[1].send_signal(signal.SIGKILL)
    code, elapsed = run.wait(0, timeout=90)
  finally:
    run.close()
  output = run.output(0)
  print(f"process 0 exited {elapsed:.1f} s after process 1 was killed (code {code})")
  assert code != 0
  assert elapsed < 60, output[-3000:]
  assert PEER_LOST.search(output), output[-3000:]


def test_process_that_raises_leaves_at_once_and_stops_the_others(tmp_path, data_dir,
                                                                  one_process):
  """Process 1 alone fails (an unusable data dir): it exits at once, without waiting
  for process 0 at the shutdown barrier, and the missed heartbeats end process 0."""
  del one_process  # prepares the data
  fast = ["--heartbeat_timeout=10"]
  run = _Processes(tmp_path, data_dir, (fast, [*fast, "--config.data.data_dir=/dev/null/x"]))
  try:
    code_1, elapsed_1 = run.wait(1, timeout=120)
    code_0, elapsed_0 = run.wait(0, timeout=60)
  finally:
    run.close()
  print(f"process 1 failed after {elapsed_1:.0f} s; process 0 ended {elapsed_0:.1f} s later")
  assert code_1 == 1
  assert re.search(r"error: process 1 of 2 failed: .*/dev/null/x.*exiting without waiting",
                   run.output(1)), run.output(1)[-3000:]
  assert code_0 != 0 and elapsed_0 < 30
  assert re.search(r"error: process 0 of 2 (was stopped by SIGABRT|failed): ",
                   run.output(0)), run.output(0)[-3000:]

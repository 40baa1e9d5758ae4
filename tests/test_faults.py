"""Faults during training: SIGKILL at random points (also during checkpoint writes),
preemption (SIGTERM), unreadable or mismatched checkpoints, NaN and infinite losses."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ONE_DEVICE, REPO, debug_launch_command, launch_debug_run, with_overrides
from ftjax import trainer
from ftjax.errors import CheckpointError, TrainingError
from ftjax.preemption import EXIT_CODE

def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  return {key: final[key] for key in ("best_step", "validation", "test")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted debug run through the launcher (checkpoints at steps 4, 8, 12)."""
  workdir = tmp_path_factory.mktemp("reference")
  launch_debug_run(workdir, data_dir)
  return workdir


def _wait_for_logged_step(workdir, step, process, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, "the run ended before the signal"
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line)["step"] >= step for line in f if line.endswith("\n")):
          return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not logged in {timeout}s")


def test_sigterm_checkpoints_exits_75_and_resumes_to_the_same_run(reference, tmp_path, data_dir):
  workdir = tmp_path / "preempted"
  process = subprocess.Popen(debug_launch_command(workdir, data_dir), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_logged_step(workdir, 2, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == EXIT_CODE, stderr[-3000:]
  assert f"exiting with code {EXIT_CODE}" in stderr and "preempted: checkpoint of step" in stdout
  step = int(stdout.split("preempted: checkpoint of step ")[1].split()[0])
  assert 2 <= step < 12 and str(step) in os.listdir(workdir / "checkpoints")
  assert not (workdir / "final_metrics.json").exists()
  result = subprocess.run(debug_launch_command(workdir, data_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {step}" in result.stdout
  assert _records(workdir) == _records(reference)
  assert _final(workdir) == _final(reference)


def test_an_unreadable_latest_checkpoint_is_set_aside_for_the_one_before(
    reference, tmp_path, data_dir):
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference, workdir)
  os.remove(workdir / "final_metrics.json")
  state = workdir / "checkpoints" / "12" / "state"
  for root, _, files in os.walk(state):  # truncate every file of the newest state
    for name in files:
      if name != "_CHECKPOINT_METADATA":
        open(os.path.join(root, name), "w").close()
  # Resumed as the reference ran, through the launcher: an in-process run on one of this
  # process's 8 fake devices can differ from a one-device process in the last bits.
  result = launch_debug_run(workdir, data_dir)
  out = result.stdout + result.stderr
  assert "checkpoints/12 cannot be restored" in out and "resumed from step 8" in out
  assert [name.split("-")[0] for name in os.listdir(workdir / "unreadable_checkpoints")] == ["12"]
  assert _final(workdir) == _final(reference)
  assert _records(workdir) == _records(reference)


def test_a_checkpoint_of_another_model_is_refused_and_left_alone(reference, debug_config,
                                                                 tmp_path):
  workdir = tmp_path / "other"
  shutil.copytree(reference, workdir)
  before = sorted(os.listdir(workdir / "checkpoints"))
  config = with_overrides(debug_config, **{"peft.method": "lora"})
  with pytest.raises(CheckpointError, match=r"checkpoints/12 cannot be restored into this "
                     r"run's state.*lora.*\(and 1 older checkpoint\(s\)"):
    trainer.run(config, str(workdir), devices=ONE_DEVICE)
  assert sorted(os.listdir(workdir / "checkpoints")) == before
  assert not (workdir / "unreadable_checkpoints").exists()


@pytest.mark.parametrize("policy, skips, stopped_at", [("stop", 0, 1), ("skip", 2, 3)])
def test_a_non_finite_update_stops_training_and_keeps_the_checkpoints(
    debug_config, tmp_path, policy, skips, stopped_at):
  # A learning rate of 1e38 overflows every update to infinity from step 1 on.
  config = with_overrides(debug_config, **{
      "optimizer.lr": 1e38, "optimizer.warmup_steps": 0, "on_nonfinite": policy,
      "max_nonfinite_skips": skips})
  with pytest.raises(TrainingError, match=rf"non-finite loss or gradient norm at step "
                     rf"{stopped_at}: the update was not applied; no checkpoint was written "
                     rf"yet; training stopped \(on_nonfinite='{policy}', "
                     rf"{skips} step\(s\) skipped before"):
    trainer.run(config, str(tmp_path), devices=ONE_DEVICE)
  assert not os.listdir(tmp_path / "checkpoints")
  assert not (tmp_path / "final_metrics.json").exists()


def _kill_at_random_point(workdir, data_dir, rng, during_write):
  """Starts the run in `workdir` and SIGKILLs it after a random logged step, or while an
  asynchronous checkpoint write is in progress. Returns what happened."""
  checkpoints = os.path.join(workdir, "checkpoints")
  step = int(rng.integers(1, 12))
  process = subprocess.Popen(debug_launch_command(workdir, data_dir), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
      if during_write:  # orbax writes into "<step>.orbax-checkpoint-tmp-..." and renames it
        if os.path.isdir(checkpoints) and any("tmp" in n for n in os.listdir(checkpoints)):
          process.send_signal(signal.SIGKILL)
          return "killed during a checkpoint write"
      elif any(r["step"] >= step for r in _records_so_far(workdir)):
        process.send_signal(signal.SIGKILL)
        return f"killed after step {step}"
      time.sleep(0.002)
    return "finished before the kill"
  finally:
    if process.poll() is None:
      process.kill()
    process.wait()


def _records_so_far(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _kill_and_resume(reference, workdir, data_dir, kills, seed, first_kill=0):
  """Kills the run `kills` times at random points (kills first_kill, first_kill + 2, ...
  after a random step, the others during a checkpoint write), then lets it finish; its
  results must equal the uninterrupted run's bitwise."""
  rng = np.random.default_rng(seed)
  events = [_kill_at_random_point(workdir, data_dir, rng, during_write=bool((i + first_kill) % 2))
            for i in range(kills)]
  result = subprocess.run(debug_launch_command(workdir, data_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, (events, result.stderr[-3000:])
  assert _records(workdir) == _records(reference), events
  assert _final(workdir) == _final(reference), events
  _assert_trees_equal(_restore(workdir / "checkpoints" / "12" / "state"),
                      _restore(reference / "checkpoints" / "12" / "state"))
  best = os.listdir(reference / "best")
  assert os.listdir(workdir / "best") == best, events
  _assert_trees_equal(_restore(workdir / "best" / best[0] / "default"),
                      _restore(reference / "best" / best[0] / "default"))
  return events


def _restore(path):
  """A checkpointed pytree as numpy arrays, without a target structure."""
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(os.path.abspath(path)))


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_sigkill_during_a_checkpoint_write_and_resume_equals_uninterrupted(
    reference, tmp_path, data_dir):
  _kill_and_resume(reference, tmp_path / "killed", data_dir, kills=1, seed=0, first_kill=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_many_sigkills_and_resumes_equal_uninterrupted(reference, tmp_path, data_dir, seed):
  events = _kill_and_resume(reference, tmp_path / "killed", data_dir, kills=3, seed=seed)
  print(f"trial {seed}: {events}")

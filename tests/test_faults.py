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

from conftest import (ONE_DEVICE, REPO, debug_launch_command, launch_debug_run,
                      tensorboard_scalars, with_overrides)
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
def reference_run(tmp_path_factory, data_dir):
  """An uninterrupted debug run through the launcher (checkpoints at steps 4, 8, 12):
  its folder and how many seconds it took from start to exit."""
  workdir = tmp_path_factory.mktemp("reference")
  started = time.time()
  launch_debug_run(workdir, data_dir)
  return workdir, time.time() - started


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run[0]


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


LAST_STEP = 12  # of the debug config


def _kill_once(workdir, data_dir, rng, moment, run_seconds):
  """Starts the run in `workdir` and SIGKILLs it at `moment`:

  "step": after a random logged training step; "write": while an asynchronous
  checkpoint write is in progress; "test": once the end of the run has logged its
  test evaluation; "end": at a random time after the last training step is logged;
  "any": at a random time between the start and `run_seconds` (how long a whole run
  takes). Returns the phase the run was in when it was killed.
  """
  step = int(rng.integers(1, LAST_STEP))
  delay = float(rng.uniform(0, {"end": 2.0, "any": run_seconds}.get(moment, 0.0)))
  before = _Progress(workdir)  # what earlier starts left: not this start's progress
  started = time.time()
  process = subprocess.Popen(debug_launch_command(workdir, data_dir), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  due = None  # the time to kill, once known
  try:
    while time.time() < started + 300 and process.poll() is None:
      now = _Progress(workdir, before, started)
      if moment == "write" and now.writing:
        due = time.time()
      elif moment == "step" and any(r["step"] >= step for r in now.records):
        due = time.time()
      elif moment == "test" and any(r["split"] == "test" for r in now.records):
        due = time.time()
      elif moment == "end" and due is None and now.past_last_step:
        due = time.time() + delay
      elif moment == "any":
        due = started + delay
      if due is not None and time.time() >= due:
        process.send_signal(signal.SIGKILL)
        return now.phase
      time.sleep(0.002)
    return "finished before the kill"
  finally:
    if process.poll() is None:
      process.kill()
    process.wait()


class _Progress:
  """How far the start of a run got, from its workdir, leaving out what the starts
  before it left (`before`, taken when this start was launched at time `since`): their
  checkpoint folders, their metrics log (which a start replaces, a new inode, before
  it logs) and their final metrics."""

  def __init__(self, workdir, before=None, since=0.0):
    checkpoints = os.path.join(workdir, "checkpoints")
    path = os.path.join(workdir, "metrics.jsonl")
    final = os.path.join(workdir, "final_metrics.json")
    # orbax writes into "<step>.orbax-checkpoint-tmp-..." and renames it when complete
    self.writes = {n for n in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else ())
                   if "tmp" in n}
    self.log = os.stat(path).st_ino if os.path.exists(path) else None
    stale = before is not None and self.log == before.log
    self.records = [] if stale or self.log is None else _records_so_far(workdir)
    self.writing = bool(self.writes - (before.writes if before else set()))
    self.final = os.path.exists(final) and os.stat(final).st_mtime >= since
    self.past_last_step = any(r["split"] == "train" and r["step"] == LAST_STEP
                              for r in self.records)

  @property
  def phase(self):
    if self.writing:
      return "during a checkpoint write"
    if self.final:
      return "after the final metrics"
    if self.past_last_step:
      return "after the last step"
    return "training" if self.records else "before the first step"


def _records_so_far(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _kill_and_resume(reference_run, workdir, data_dir, moments, seed):
  """Kills the run once at each of `moments` (see `_kill_once`), then lets it finish;
  its log, TensorBoard scalars, final metrics and checkpoints must equal the
  uninterrupted run's bitwise. Returns the phase of each kill."""
  reference, run_seconds = reference_run
  rng = np.random.default_rng(seed)
  phases = [_kill_once(workdir, data_dir, rng, moment, run_seconds)
            for moment in moments]
  result = subprocess.run(debug_launch_command(workdir, data_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, (phases, result.stderr[-3000:])
  assert _records(workdir) == _records(reference), phases
  assert tensorboard_scalars(workdir) == tensorboard_scalars(reference), phases
  assert _final(workdir) == _final(reference), phases
  _assert_trees_equal(_restore(workdir / "checkpoints" / str(LAST_STEP) / "state"),
                      _restore(reference / "checkpoints" / str(LAST_STEP) / "state"))
  best = os.listdir(reference / "best")
  assert os.listdir(workdir / "best") == best, phases
  _assert_trees_equal(_restore(workdir / "best" / best[0] / "default"),
                      _restore(reference / "best" / best[0] / "default"))
  _assert_time_counts_every_start(workdir)
  return phases


def _assert_time_counts_every_start(workdir):
  with open(workdir / "run_info.json") as f:
    starts = json.load(f)["starts"]
  with open(workdir / "final_metrics.json") as f:
    train_seconds = json.load(f)["train_seconds"]
  assert all(start["seconds"] > 0 for start in starts), starts
  assert train_seconds == pytest.approx(sum(start["seconds"] for start in starts), abs=0.01)


def _restore(path):
  """A checkpointed pytree as numpy arrays, without a target structure."""
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(os.path.abspath(path)))


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_sigkills_during_a_checkpoint_write_and_after_the_test_resume_to_the_same_run(
    reference_run, tmp_path, data_dir, record_property):
  phases = _kill_and_resume(reference_run, tmp_path / "killed", data_dir, ["write", "test"],
                            seed=0)
  record_property("sigkill_phases", phases)
  assert phases[0] == "during a checkpoint write" and phases[1].startswith("after the"), phases
  with open(tmp_path / "killed" / "run_info.json") as f:
    assert len(json.load(f)["starts"]) == 3  # each start's time is counted


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_many_sigkills_and_resumes_equal_uninterrupted(reference_run, tmp_path, data_dir, seed,
                                                       record_property):
  # A write first: a later start may find the run finished, with nothing left to write.
  moments = ["write", "any", "end"] if seed % 2 else ["write", "step", "any"]
  phases = _kill_and_resume(reference_run, tmp_path / "killed", data_dir, moments, seed=seed)
  record_property("sigkill_phases", phases)
  print(f"trial {seed}: {list(zip(moments, phases))}")

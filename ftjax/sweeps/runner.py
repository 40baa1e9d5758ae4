"""Runs a study's runs on this machine, N at a time, or prints their launch commands.

Each run is `launch/train.py --config=... --workdir=<sweep>/<name>
--config.key=value ...` in a child process whose output goes to
`<sweep>/<name>/train.log`. A run whose workdir holds `final_metrics.json` is
finished and not run again; one with checkpoints but no final metrics resumes
from its latest checkpoint. So a sweep stopped at any point continues where it
was when started again. A workdir made with another config (the study file was
changed since) is refused, naming the keys that differ, rather than reused.
The runs share JAX's persistent compilation cache (`<sweep>/jax_cache`, unless
JAX_COMPILATION_CACHE_DIR names another): runs of one model compile their steps
once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Iterator, Sequence

from ftjax.errors import ConfigError
from ftjax.sweeps import study as study_lib
from ftjax.sweeps.results import flatten_config

LAUNCHERS = {"local": "launch/train.py", "slurm": "launch/slurm.py",
             "tpu_pod": "launch/tpu_pod.py"}
FINISHED = "final_metrics.json"
COMPILATION_CACHE = "jax_cache"


def train_args(run: study_lib.Run, sweep_dir: str) -> list[str]:
  """The flags of `launch/train.py` (and of the SLURM and TPU-pod launchers) for `run`.

  The config path is the study's, relative to the repository root where it is.
  """
  return [f"--config={run.config}", f"--workdir={study_lib.run_dir(sweep_dir, run.name)}",
          *(f"--config.{key}={study_lib.flag_value(value)}"
            for key, value in run.resolved_overrides(sweep_dir).items())]


def launch_command(run: study_lib.Run, sweep_dir: str, launcher: str = "local",
                   launcher_flags: Sequence[str] = (), python: str = "python") -> str:
  """A shell command that runs `run` with one of the launchers (`LAUNCHERS`)."""
  if launcher not in LAUNCHERS:
    raise ConfigError(f"launcher {launcher!r}: choose one of {sorted(LAUNCHERS)}")
  extra = list(launcher_flags)
  if launcher == "slurm" and not any(flag.startswith("--job_name") for flag in extra):
    extra.append(f"--job_name={run.name}")
  return shlex.join([python, LAUNCHERS[launcher], *train_args(run, sweep_dir), *extra])


def is_finished(sweep_dir: str, name: str) -> bool:
  """Whether run `name` wrote its final metrics."""
  return os.path.isfile(os.path.join(study_lib.run_dir(sweep_dir, name), FINISHED))


# Config values that mean "the run's data says": the run writes what it found.
_FROM_THE_DATA = {"model.num_classes": 0}


def check_workdir(run: study_lib.Run, sweep_dir: str) -> None:
  """Raises ConfigError when the run's workdir was made with a different config."""
  path = os.path.join(study_lib.run_dir(sweep_dir, run.name), "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    try:
      existing = flatten_config(json.load(f))
    except ValueError as e:
      raise ConfigError(f"{path}: not valid JSON ({e}); delete the run's folder to run it "
                        "again") from e
  expected = flatten_config(json.loads(study_lib.resolve(run, sweep_dir).to_json()))
  # Keys on one side only come from another ftjax version (a key added since): not a change.
  # A value a run takes from its data (num_classes 0) is written resolved: not a change.
  differ = sorted(key for key in set(existing) & set(expected)
                  if existing[key] != expected[key]
                  and not (key in _FROM_THE_DATA and expected[key] == _FROM_THE_DATA[key]))
  if differ:
    shown = ", ".join(f"{key}: {existing[key]!r} there, {expected[key]!r} now"
                      for key in differ[:5])
    raise ConfigError(f"run {run.name!r}: {os.path.dirname(path)} was made with another config "
                      f"({len(differ)} key(s) differ: {shown}); delete that folder or give "
                      "the run another name")


def write_manifest(study: study_lib.Study, sweep_dir: str) -> None:
  """`<sweep>/sweep.json`: the study file and every run's config, overrides and params."""
  runs = [{"name": run.name, "config": run.config, "params": run.params,
           "overrides": run.resolved_overrides(sweep_dir), "after": list(run.after)}
          for run in study.runs]
  with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
    json.dump({"study": study.path, "runs": runs}, f, indent=2, default=str)


def log(text: str) -> None:
  print(f"[sweep {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Child:
  """A run's training process."""

  def __init__(self, run: study_lib.Run, sweep_dir: str, python: str, shared: bool):
    self.run = run
    workdir = study_lib.run_dir(sweep_dir, run.name)
    os.makedirs(workdir, exist_ok=True)
    self.log_path = os.path.join(workdir, "train.log")
    self.started = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(sweep_dir, COMPILATION_CACHE))
    if shared:  # runs side by side on one accelerator: allocate as needed, not 75% each
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with open(self.log_path, "a") as log:
      self.process = subprocess.Popen(
          [python, os.path.join(study_lib.REPO, LAUNCHERS["local"]),
           *train_args(run, sweep_dir)],
          cwd=study_lib.REPO, stdout=log, stderr=subprocess.STDOUT, env=env)

  def stop(self) -> None:
    """Asks the run to stop (it resumes from its latest checkpoint next time)."""
    self.process.terminate()
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


@contextlib.contextmanager
def sweep_lock(sweep_dir: str) -> Iterator[None]:
  """One sweep process per folder: two would train the same runs into the same workdirs."""
  with open(os.path.join(sweep_dir, ".lock"), "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise ConfigError(f"{sweep_dir}: another launch/sweep.py is running in this folder") from e
    yield


def _raise_on_sigterm(signum: int, frame: Any) -> None:
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
  """SIGTERM raises KeyboardInterrupt meanwhile, so the children are stopped too."""
  previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def run_all(study: study_lib.Study, sweep_dir: str, parallel: int = 1,
            python: str = sys.executable, poll_seconds: float = 1.0) -> dict[str, str]:
  """Runs every unfinished run of `study`, at most `parallel` at once, in study order.

  A run waits for the runs it names (`Run.after`); when one of those fails it is
  not started.

  Returns:
    Run name -> "finished" (now or before), "failed" (see its train.log) or
    "skipped" (a run it needs failed).

  Raises:
    ConfigError: before anything starts, when `parallel` < 1, a run's workdir
      was made with another config, or another sweep runs in `sweep_dir`.
  """
  if parallel < 1:
    raise ConfigError(f"--parallel={parallel}: must be >= 1")
  os.makedirs(sweep_dir, exist_ok=True)
  with sweep_lock(sweep_dir):
    for run in study.runs:
      check_workdir(run, sweep_dir)
    write_manifest(study, sweep_dir)
    with sigterm_as_interrupt():
      return _run_pending(study, sweep_dir, parallel, python, poll_seconds)


def _run_pending(study: study_lib.Study, sweep_dir: str, parallel: int, python: str,
                 poll_seconds: float) -> dict[str, str]:
  outcome = {run.name: "finished" for run in study.runs if is_finished(sweep_dir, run.name)}
  pending = [run for run in study.runs if run.name not in outcome]
  log(f"{study.name}: {len(study.runs)} runs, {len(outcome)} already finished, "
       f"{len(pending)} to run, {parallel} at a time, in {sweep_dir}")
  running: list[Child] = []
  try:
    while pending or running:
      for child in list(running):
        code = child.process.poll()
        if code is None:
          continue
        running.remove(child)
        seconds = time.perf_counter() - child.started
        ok = code == 0 and is_finished(sweep_dir, child.run.name)
        outcome[child.run.name] = "finished" if ok else "failed"
        log(f"{child.run.name}: finished in {seconds:.0f} s" if ok else
             f"{child.run.name}: FAILED (exit code {code}) after {seconds:.0f} s; see "
             f"{child.log_path}")
      for run in list(pending):
        if len(running) >= parallel:
          break
        states = [outcome.get(name) for name in run.after]
        if any(state in ("failed", "skipped") for state in states):
          pending.remove(run)
          outcome[run.name] = "skipped"
          log(f"{run.name}: skipped, it needs {', '.join(run.after)}, which did not finish")
        elif all(state == "finished" for state in states):
          pending.remove(run)
          running.append(Child(run, sweep_dir, python, shared=parallel > 1))
          done = sum(state == "finished" for state in outcome.values())
          log(f"{run.name}: started ({done} of {len(study.runs)} finished)")
      if running:
        time.sleep(poll_seconds)
  finally:  # Ctrl-C or SIGTERM: the children stop too
    for child in running:
      child.stop()
  return outcome


def commands(study: study_lib.Study, sweep_dir: str, launcher: str,
             launcher_flags: Sequence[str] = ()) -> list[str]:
  """One shell line per run, in study order; runs that need others say so in a comment."""
  lines = []
  for run in study.runs:
    if run.after:
      lines.append(f"# after {', '.join(run.after)} finished:")
    lines.append(launch_command(run, sweep_dir, launcher, launcher_flags))
  return lines

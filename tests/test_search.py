"""Hyperparameter search with Optuna through launch/sweep.py: pruning stops a trial through
its preemption path, the report lists every trial's state, a stopped search continues."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from ftjax.errors import ConfigError
from ftjax.sweeps import optuna_search, study as study_lib

TICKETS = [{"body": f"Ticket {i}: my {word} has a problem, please help with the {word}.",
            "queue": queue}
           for i, (queue, word) in enumerate(
               [("billing", "invoice"), ("tech", "crash"), ("sales", "quote"),
                ("billing", "refund"), ("tech", "login"), ("sales", "pricing")] * 40)]


def _study(tmp_path, space='{"optimizer.lr": search.choice([5e-4, 1e-9])}',
           enqueue='[{"optimizer.lr": 5e-4}] * 3 + [{"optimizer.lr": 1e-9}]'):
  """A search of 4 debug trials on separable tickets: three of a learning rate that
  learns them by step 6, then one that cannot learn (pruned at its step-6 evaluation)."""
  with open(tmp_path / "tickets.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ["body", "queue"])
    writer.writeheader()
    writer.writerows(TICKETS)
  path = tmp_path / "search_study.py"
  path.write_text(textwrap.dedent(f'''
      """A tiny search."""
      from ftjax.sweeps import search

      SEARCH = dict(
          config="configs/minilm_sentiment.py:debug,data=csv",
          space={space},
          enqueue={enqueue},
          trials=4, metric=("validation/accuracy", "max"), sampler="random",
          pruner="median",
          overrides={{"data.files.train": {str(tmp_path / "tickets.csv")!r},
                     "data.columns.text": "body", "data.columns.label": "queue",
                     "data.data_dir": {str(tmp_path / "tfds")!r}}})
      '''))
  return str(path)


def _sweep(study, workdir):
  return subprocess.Popen([sys.executable, "launch/sweep.py", f"--study={study}",
                           f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _states(workdir):
  with open(os.path.join(workdir, "results.csv")) as f:
    return {row["name"]: row["state"] for row in csv.DictReader(f)}


@pytest.mark.slow
def test_a_stopped_search_continues_where_it_was_prunes_and_reports_every_trial(tmp_path):
  """A search stopped mid-trial continues where it was; its hopeless trial is pruned; the
  report and plots cover every trial; started again, it has nothing to run."""
  study, workdir = _study(tmp_path), str(tmp_path / "sweep")
  first = _sweep(study, workdir)
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(workdir, "trial_001", "checkpoints", "4")):
    assert time.time() < deadline and first.poll() is None
    time.sleep(0.5)
  first.send_signal(signal.SIGTERM)  # the sweep stops, and its running trial with it
  out, _ = first.communicate(timeout=300)
  assert "stopped; start the same command again to continue the search" in out
  resumed, _ = _sweep(study, workdir).communicate(timeout=900)
  assert "1 ended, 1 to resume" in resumed, resumed[-3000:]
  assert _states(workdir) == {"trial_000": "complete", "trial_001": "complete",
                              "trial_002": "complete", "trial_003": "pruned"}
  with open(os.path.join(workdir, "trial_001", "train.log")) as f:
    assert "resumed from step" in f.read()
  # The hopeless trial was pruned through the preemption path: a checkpoint of the step
  # it reached, exit 75.
  with open(os.path.join(workdir, "trial_003", "train.log")) as f:
    log = f.read()
  assert "preempted (SIGTERM) after step" in log and "exiting with code 75" in log
  assert not os.path.exists(os.path.join(workdir, "trial_003", "final_metrics.json"))
  assert "trial_003: pruned after" in resumed
  with open(os.path.join(workdir, "results.md")) as f:
    report = f.read()
  assert "4 ended (3 complete, 1 pruned)" in report
  assert "| 3 | pruned | 1e-09 | 0.6667 | 6 |" in report  # 2 of 3 classes wrong: all "billing"
  assert "Best trial 0: validation/accuracy=1.0000" in report
  for plot in ("optimization_history.png", "param_importances.png"):
    assert os.path.getsize(os.path.join(workdir, "plots", plot)) > 1000
  again, _ = _sweep(study, workdir).communicate(timeout=300)  # nothing left to run
  assert "4 ended, 0 to resume" in again and "started" not in again


def test_a_bad_search_space_fails_before_any_trial(tmp_path):
  study = study_lib.load(_study(tmp_path, space='{"optimizer.lrr": search.log_uniform(1e-5, '
                                                '1e-3)}', enqueue="()"))
  with pytest.raises(ConfigError, match=r"override optimizer.lrr=1e-05: unknown config key"):
    optuna_search.from_study(study.search, study.path)
  with pytest.raises(ConfigError, match=r"log_uniform\(-1.0, 1.0\): the range must be "
                     r"positive"):
    study_lib.load(_study(tmp_path, space='{"optimizer.lr": search.log_uniform(-1.0, 1.0)}'))
  study = study_lib.load(_study(tmp_path))
  with pytest.raises(ConfigError, match=r"SEARCH pruner='asha': one of \['median', "):
    optuna_search.from_study({**study.search, "pruner": "asha"}, study.path)

r"""Runs a study: `python launch/sweep.py --study=experiments/x.py --workdir=DIR`.

Every run of the study file's `sweep(add)` (see `ftjax.sweeps.study`) trains in
its own folder `DIR/<run name>`, `--parallel` at a time; runs already finished
there are skipped, so a stopped sweep continues when started again. Then every
finished run's final metrics go into `results.csv`, `results.md` (mean +- std
over seeds, the best configuration) and PNG plots under `--report_dir`
(default: DIR).

`--print=local|slurm|tpu_pod` prints one launch command per run instead of
running anything (`--launcher_flags` are appended, e.g.
`--launcher_flags="--nodes=2 --partition=gpu --submit"` for launch/slurm.py);
`--report_only` only writes the report of the runs finished so far. Every run's
config is resolved and checked first: a duplicate run name or an override of
an unknown key stops the sweep before anything starts.

A study that sets `SEARCH` instead (see `ftjax.sweeps.optuna_search`) runs an
Optuna search: trials sampled one after another, bad ones pruned at their
evaluations, the storage in DIR/optuna.journal so a stopped search continues.
"""

import os
import shlex
import sys

from absl import app, flags

from ftjax import cli
from ftjax.errors import ConfigError
from ftjax.sweeps import optuna_search, results, runner, study as study_lib

_STUDY = flags.DEFINE_string("study", None, "The study file, e.g. experiments/freeze_blocks.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder: one workdir per run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs trained at the same time.")
_PRINT = flags.DEFINE_enum("print", None, sorted(runner.LAUNCHERS), "Print the launch "
                           "commands for this launcher and run nothing.")
_LAUNCHER_FLAGS = flags.DEFINE_string("launcher_flags", "", "With --print: flags appended to "
                                      "every command (one shell-quoted string).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report of the finished "
                                 "runs; train nothing.")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where results.csv, results.md and "
                                  "plots/ go (default: --workdir).")
flags.mark_flags_as_required(["study", "workdir"])


def _search(study: study_lib.Study, sweep_dir: str) -> None:
  """A study that sets SEARCH: trials sampled and pruned by Optuna, then its report."""
  spec = optuna_search.from_study(study.search, study.path)
  if _PRINT.value:
    raise ConfigError(f"--print={_PRINT.value}: a search samples each trial from the ones "
                      "before, so there are no commands to print ahead; run this command on "
                      "a node of the cluster with --workdir on the shared filesystem")
  outcome = {}
  if not _REPORT_ONLY.value:
    try:
      outcome = optuna_search.run_search(spec, study.name, sweep_dir, _PARALLEL.value)
    except KeyboardInterrupt:
      sys.exit(f"stopped; start the same command again to continue the search in {sweep_dir}")
  report_dir = _REPORT_DIR.value or sweep_dir
  print(optuna_search.write_report(spec, study.name, study.title, sweep_dir, report_dir))
  print(f"report of the search in {report_dir}")
  failed = sorted(name for name, state in outcome.items() if state == "fail")
  if failed:
    sys.exit(f"error: {len(failed)} trial(s) failed: {', '.join(failed)}")


def _sweep() -> None:
  study = study_lib.load(_STUDY.value)
  sweep_dir = os.path.abspath(_WORKDIR.value)
  if study.search is not None:
    _search(study, sweep_dir)
    return
  if _PRINT.value:
    print("\n".join(runner.commands(study, sweep_dir, _PRINT.value,
                                    shlex.split(_LAUNCHER_FLAGS.value))))
    return
  outcome = {}
  if not _REPORT_ONLY.value:
    try:
      outcome = runner.run_all(study, sweep_dir, _PARALLEL.value)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runs stopped with it
      sys.exit(f"stopped; start the same command again to continue the sweep in {sweep_dir}")
  report_dir = _REPORT_DIR.value or sweep_dir
  finished = [result for run in study.runs if (result := results.load_result(
      run.name, run.params, study_lib.run_dir(sweep_dir, run.name))) is not None]
  if finished:
    text = results.write_report(finished, report_dir, title=study.title,
                                metrics=study.metrics, select=study.select,
                                plots=study.plots, curves=study.curves)
    print(text)
    print(f"report of {len(finished)} of {len(study.runs)} runs in {report_dir}")
  else:
    print(f"no run of {study.name} has finished in {sweep_dir} yet")
  failed = sorted(name for name, state in outcome.items() if state != "finished")
  if failed:
    sys.exit(f"error: {len(failed)} run(s) did not finish: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(cli.main(_sweep))

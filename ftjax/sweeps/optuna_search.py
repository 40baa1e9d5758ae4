"""A study that searches instead of listing runs: Optuna samples, ftjax trains, bad trials stop early.

A study file sets `SEARCH` instead of defining `sweep(add)`:

  SEARCH = dict(
      config="configs/minilm_sentiment.py:short,peft=lora",
      space={"optimizer.lr": search.log_uniform(1e-5, 1e-3),
             "peft.rank": search.choice([4, 8, 16])},
      trials=20, metric=("validation/accuracy", "max"),
      sampler="tpe", pruner="median", seed=0,
      overrides={"optimizer.warmup_steps": 15},   # the same for every trial
      enqueue=[{"optimizer.lr": 5e-5, "peft.rank": 8}])   # tried first (known points)

Every trial is a run like a listed study's (`launch/train.py` in a child
process, its folder `<sweep>/trial_<number>`, the same resume). While a trial
trains, each of its evaluations (`metrics.jsonl` records of the metric's split)
is reported to Optuna; when the pruner says so the trial is stopped through its
preemption path (SIGTERM: it finishes its step, checkpoints and exits) and
recorded as pruned, with what it ran. A finished trial's value is the metric
in its `final_metrics.json` (for "validation/accuracy": the best evaluation's).
The Optuna storage is a journal file in the sweep folder (`optuna.journal`), so
a stopped search continues where it was: trials that were running resume from
their checkpoints, and sampling goes on until `trials` trials have ended.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import optuna

from ftjax import metrics as metrics_lib
from ftjax.errors import ConfigError
from ftjax.sweeps import results as results_lib
from ftjax.sweeps import runner, search, study as study_lib

JOURNAL = "optuna.journal"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "hyperband", None)
_KEYS = ("config", "space", "trials", "metric", "sampler", "pruner", "seed", "overrides",
         "enqueue")


@dataclasses.dataclass(frozen=True)
class Search:
  """A study file's `SEARCH` (see the module docstring), checked."""

  config: str
  space: dict[str, search.Distribution]
  trials: int
  metric: tuple[str, str]
  sampler: str = "tpe"
  pruner: str | None = "median"
  seed: int = 0
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  enqueue: tuple[dict[str, Any], ...] = ()

  @property
  def split(self) -> str:
    """The split whose evaluations are reported while a trial trains."""
    return self.metric[0].split("/")[0]

  @property
  def key(self) -> str:
    """The metric within its split's records (e.g. "accuracy")."""
    return self.metric[0].split("/", 1)[1]


def from_study(value: Any, path: str) -> Search:
  """The `SEARCH` of the study file `path`, checked: every key known, the space's keys
  config keys (a trial of each range's ends is resolved and validated), sampler and
  pruner known.

  Raises:
    ConfigError: naming the study file and what is wrong, before any trial starts.
  """
  if not isinstance(value, dict) or set(value) - set(_KEYS):
    raise ConfigError(f"{path}: SEARCH must be a dict with the keys {list(_KEYS)}; got "
                      f"{sorted(value) if isinstance(value, dict) else value!r}")
  try:
    spec = Search(**value)
  except TypeError as e:
    raise ConfigError(f"{path}: SEARCH: {e}") from e
  if not isinstance(spec.trials, int) or spec.trials < 1:
    raise ConfigError(f"{path}: SEARCH trials={spec.trials!r}: a count >= 1")
  metric, mode = spec.metric if len(spec.metric) == 2 else (None, None)
  if not isinstance(metric, str) or "/" not in metric or mode not in ("max", "min"):
    raise ConfigError(f"{path}: SEARCH metric={spec.metric!r}: expected ('<split>/<metric>', "
                      "'max' or 'min'), e.g. ('validation/accuracy', 'max')")
  if spec.sampler not in SAMPLERS:
    raise ConfigError(f"{path}: SEARCH sampler={spec.sampler!r}: one of {list(SAMPLERS)}")
  if spec.pruner not in PRUNERS:
    raise ConfigError(f"{path}: SEARCH pruner={spec.pruner!r}: one of {list(PRUNERS)}")
  if not spec.space:
    raise ConfigError(f"{path}: SEARCH space is empty")
  for key, distribution in spec.space.items():
    if not isinstance(distribution, search.Distribution):
      raise ConfigError(f"{path}: SEARCH space {key!r}: expected search.uniform(), "
                        "log_uniform(), int_uniform() or choice(), got {distribution!r}")
  for point in spec.enqueue:
    if not isinstance(point, dict) or set(point) - set(spec.space):
      raise ConfigError(f"{path}: SEARCH enqueue: {point!r}: a dict of keys of the space "
                        f"{sorted(spec.space)}")
  for end in (0, -1):  # every range's low ends, then its high ends
    params = {key: _end(distribution, end) for key, distribution in spec.space.items()}
    study_lib.resolve(trial_run(spec, f"trial_{'low' if end == 0 else 'high'}", params),
                      "/sweep")
  return spec


def _end(distribution: search.Distribution, end: int) -> Any:
  if distribution.kind == "choice":
    return distribution.values[end]
  value = (distribution.low, distribution.high)[end]
  return int(value) if distribution.kind == "int_uniform" else float(value)


def _distribution(distribution: search.Distribution) -> optuna.distributions.BaseDistribution:
  if distribution.kind == "choice":
    return optuna.distributions.CategoricalDistribution(distribution.values)
  if distribution.kind == "int_uniform":
    return optuna.distributions.IntDistribution(int(distribution.low), int(distribution.high))
  return optuna.distributions.FloatDistribution(distribution.low, distribution.high,
                                                log=distribution.kind == "log_uniform")


def trial_run(spec: Search, name: str, params: dict[str, Any]) -> study_lib.Run:
  """The run of a trial with sampled `params` (config keys -> values)."""
  overrides = {**spec.overrides, **params}
  seed = overrides.pop("seed", spec.seed)
  return study_lib.Run(name, spec.config, {**overrides, "seed": seed},
                       {**params, "seed": seed})


def trial_name(number: int) -> str:
  return f"trial_{number:03d}"


def open_study(spec: Search, name: str, sweep_dir: str) -> optuna.Study:
  """The Optuna study in `sweep_dir`'s journal (created, or loaded to continue)."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(os.path.join(sweep_dir, JOURNAL)))
  sampler = (optuna.samplers.TPESampler(seed=spec.seed) if spec.sampler == "tpe"
             else optuna.samplers.RandomSampler(seed=spec.seed))
  pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=3),
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner(),
            "hyperband": optuna.pruners.HyperbandPruner(),
            None: optuna.pruners.NopPruner()}[spec.pruner]
  return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                             direction="maximize" if spec.metric[1] == "max" else "minimize",
                             load_if_exists=True)


class _Trial:
  """A running trial: its Optuna trial, its child process and the evaluations seen."""

  def __init__(self, spec: Search, trial: optuna.Trial, sweep_dir: str, python: str,
               shared: bool):
    self.spec, self.trial = spec, trial
    self.run = trial_run(spec, trial_name(trial.number), trial.params)
    runner.check_workdir(self.run, sweep_dir)
    self.workdir = study_lib.run_dir(sweep_dir, self.run.name)
    self.child = runner.Child(self.run, sweep_dir, python, shared)
    self.pruned = False

  def report_evaluations(self) -> None:
    """Reports the evaluations logged since the last call; stops the trial (SIGTERM)
    when the pruner says so."""
    if self.pruned or not os.path.exists(os.path.join(self.workdir, "metrics.jsonl")):
      return
    records = metrics_lib.read_metrics(self.workdir)
    reported = self.trial.storage.get_trial(self.trial._trial_id).intermediate_values
    for record in records:
      if (record["split"] == self.spec.split and self.spec.key in record
          and record["step"] not in reported):
        self.trial.report(float(record[self.spec.key]), record["step"])
        if self.trial.should_prune():
          self.pruned = True
          self.child.process.send_signal(signal.SIGTERM)  # checkpoints, then exits
          return


def run_search(spec: Search, name: str, sweep_dir: str, parallel: int = 1,
               python: str = sys.executable, poll_seconds: float = 1.0
               ) -> dict[str, str]:
  """Runs the search until `spec.trials` trials have ended (see the module docstring).

  Returns:
    Trial run name -> "complete", "pruned" or "failed".
  """
  if parallel < 1:
    raise ConfigError(f"--parallel={parallel}: must be >= 1")
  os.makedirs(sweep_dir, exist_ok=True)
  with runner.sweep_lock(sweep_dir):
    study = open_study(spec, name, sweep_dir)
    space = {key: _distribution(d) for key, d in spec.space.items()}
    if not study.trials:  # a new search: the known points first
      for point in spec.enqueue:
        study.enqueue_trial(dict(point))
    # Trials left running by a stopped search: continued from their checkpoints.
    waiting = [optuna.trial.Trial(study, t._trial_id) for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    running: list[_Trial] = []
    ended = lambda: len(study.get_trials(deepcopy=False, states=(
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL)))
    runner.log(f"{name}: search of {spec.trials} trials ({spec.sampler}, pruner "
               f"{spec.pruner}), {ended()} ended, {len(waiting)} to resume, {parallel} at a "
               f"time, in {sweep_dir}")
    try:
      with runner.sigterm_as_interrupt():
        while waiting or running or ended() + len(running) < spec.trials:
          while len(running) < parallel and (waiting or ended() + len(running) < spec.trials):
            trial = waiting.pop(0) if waiting else study.ask(space)
            running.append(_Trial(spec, trial, sweep_dir, python, shared=parallel > 1))
            runner.log(f"{trial_name(trial.number)}: started {trial.params}")
          for item in list(running):
            item.report_evaluations()
            code = item.child.process.poll()
            if code is not None:
              running.remove(item)
              _tell(study, item, code, sweep_dir)
          time.sleep(poll_seconds)
    finally:  # Ctrl-C or SIGTERM: the trials stop too, and resume with the search
      for item in running:
        item.child.stop()
  return {trial_name(t.number): t.state.name.lower() for t in study.trials}


def _tell(study: optuna.Study, item: _Trial, code: int, sweep_dir: str) -> None:
  """Records how a trial's child ended: pruned, complete with its value, or failed."""
  name, seconds = item.run.name, time.perf_counter() - item.child.started
  if item.pruned:
    study.tell(item.trial, state=optuna.trial.TrialState.PRUNED)
    runner.log(f"{name}: pruned after {seconds:.0f} s")
    return
  final_path = os.path.join(study_lib.run_dir(sweep_dir, name), runner.FINISHED)
  if code == 0 and os.path.isfile(final_path):
    with open(final_path) as f:
      value = results_lib.flatten(json.load(f)).get(item.spec.metric[0])
    if value is not None:
      study.tell(item.trial, float(value))
      runner.log(f"{name}: {item.spec.metric[0]}={value:.4g} in {seconds:.0f} s")
      return
  study.tell(item.trial, state=optuna.trial.TrialState.FAIL)
  runner.log(f"{name}: FAILED (exit code {code}) after {seconds:.0f} s; see "
             f"{item.child.log_path}")


def trial_results(spec: Search, study: optuna.Study, sweep_dir: str
                  ) -> tuple[list[results_lib.RunResult], dict[str, str]]:
  """(each ended trial's results, trial name -> state). A finished trial's are its final
  metrics; a pruned one's its last evaluation of the metric's split (`last/<split>/...`)
  and its last step (`last/step`)."""
  found, states = [], {}
  for trial in study.get_trials(deepcopy=False):
    if trial.state == optuna.trial.TrialState.RUNNING:
      continue
    name = trial_name(trial.number)
    params = trial_run(spec, name, trial.params).params
    workdir = study_lib.run_dir(sweep_dir, name)
    states[name] = trial.state.name.lower()
    result = results_lib.load_result(name, params, workdir)
    if result is None:  # pruned or failed: what it logged
      path = os.path.join(workdir, "metrics.jsonl")
      records = metrics_lib.read_metrics(workdir) if os.path.exists(path) else []
      evaluations = [r for r in records if r["split"] == spec.split]
      final = results_lib.flatten({"last": {spec.split: evaluations[-1]}}) if evaluations else {}
      final.pop(f"last/{spec.split}/step", None)
      if records:
        final["last/step"] = float(records[-1]["step"])
      result = results_lib.RunResult(name, params, workdir, final, records)
    found.append(result)
  return found, states


def write_report(spec: Search, name: str, title: str, sweep_dir: str, out_dir: str) -> str:
  """The search's report: the finished trials as a study's (`results.write_report`),
  every ended trial's state in `results.csv` and a table in `results.md`, the best
  trial, and Optuna's optimisation history and parameter importances in `plots/`."""
  study = open_study(spec, name, sweep_dir)
  found, states = trial_results(spec, study, sweep_dir)
  complete = [r for r in found if states[r.name] == "complete"]
  text = results_lib.write_report(complete, out_dir, title=title,
                                  metrics=[spec.metric[0], "test/accuracy", "train_seconds"],
                                  select=spec.metric)
  results_lib.write_csv(found, os.path.join(out_dir, "results.csv"), states)
  counts = {state: list(states.values()).count(state) for state in dict.fromkeys(
      states.values())}
  lines = ["", "## Trials", "",
           f"{len(found)} ended ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
           f"{spec.sampler} sampler, pruner {spec.pruner}, metric {spec.metric[0]} "
           f"({spec.metric[1]}).", ""]
  steps = sum(r.final.get("last/step", r.records[-1]["step"] if r.records else 0)
              for r in found)
  lines += [f"Training steps of every trial together (pruned ones: as far as they ran): "
            f"{int(steps):,}.", ""]
  keys = list(spec.space)
  rows = []
  for trial in study.get_trials(deepcopy=False):
    if trial.state == optuna.trial.TrialState.RUNNING:
      continue
    value = trial.value if trial.value is not None else (
        max(trial.intermediate_values.values()) if trial.intermediate_values else None)
    rows.append([str(trial.number), trial.state.name.lower(),
                 *(f"{v:.4g}" if isinstance(v := trial.params.get(k), float) else f"{v}"
                   for k in keys),
                 "" if value is None else f"{value:.4f}",
                 str(max(trial.intermediate_values, default=""))])
  header = ["trial", "state", *keys, spec.metric[0], "last evaluated step"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
  if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
    best = study.best_trial
    lines += [f"Best trial {best.number}: {spec.metric[0]}={best.value:.4f} with "
              f"{best.params}.", ""]
  lines += _optuna_plots(study, out_dir)
  text += "\n".join(lines)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  return text


def _optuna_plots(study: optuna.Study, out_dir: str) -> list[str]:
  """Optuna's optimisation history and parameter importances (matplotlib) as PNG files."""
  import warnings  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as optuna_plots  # pylint: disable=g-import-not-at-top
  plt = results_lib.pyplot()
  os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
  lines = []
  for file, caption, draw in (
      ("plots/optimization_history.png", "optimisation history",
       optuna_plots.plot_optimization_history),
      ("plots/param_importances.png", "parameter importances",
       optuna_plots.plot_param_importances)):
    try:
      with warnings.catch_warnings():  # these plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = draw(study)
      axes.figure.savefig(os.path.join(out_dir, file), dpi=100, bbox_inches="tight")
      plt.close(axes.figure)
      lines += [f"![{caption}]({file})", ""]
    except (ValueError, RuntimeError) as e:  # too few finished trials
      lines += [f"(no plot of the {caption}: {e})", ""]
  return lines

"""A sweep's results: its runs' final metrics and learning curves as tables and plots.

A run workdir holds `config.json`, `metrics.jsonl` (one JSON record per line),
`final_metrics.json` (written when the run finished) and possibly
`run_info.json`. A sweep is a folder of such workdirs; runs that differ only in
"seed" form a group, whose metrics are reported as mean ± std over the seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
import statistics
from typing import Any, Sequence

from ftjax import nested
from ftjax.errors import ConfigError, DataError

SEED = "seed"
DEFAULT_COMPARE_METRICS = ("test/accuracy", "validation/accuracy", "train_seconds")
UNFINISHED = "running/unfinished"


@dataclasses.dataclass
class RunResult:
  """One finished run of a sweep.

  Attributes:
    name: the run's name in the sweep.
    params: the swept parameters (may include "seed").
    workdir: the run's workdir.
    final: the run's `final_metrics.json`, flattened (see `flatten`).
    records: the run's `metrics.jsonl` records, without the "samples" ones.
  """
  name: str
  params: dict[str, Any]
  workdir: str
  final: dict[str, float]
  records: list[dict[str, Any]]


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numbers of a nested dict under "a/b/c" keys.

  Args:
    tree: e.g. a run's final metrics, {"validation": {"accuracy": 0.8}, ...}.
    prefix: put before every key ("prefix/a/b").

  Returns:
    {"validation/accuracy": 0.8, ...}: ints and floats only (booleans, strings
    and lists are left out).
  """
  return {key: float(value) for key, value in nested.leaves(tree, prefix, "/").items()
          if _is_number(value)}


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
  """A nested config (as in `config.json`) under dotted keys: {"optimizer.lr": 5e-5, ...}."""
  return nested.leaves(config)


def _read_json(path: str) -> Any:
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path} line {e.lineno}: not valid JSON: {e.msg}") from e


def _read_json_object(path: str) -> dict[str, Any]:
  value = _read_json(path)
  if not isinstance(value, dict):
    raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _read_records(path: str) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` file, "samples" records left out."""
  records = []
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path} line {line_number}: not valid JSON: {e.msg}") from e
      if not isinstance(record, dict):
        raise DataError(f"{path} line {line_number}: expected a JSON object")
      if record.get("split") != "samples":
        records.append(record)
  return records


def load_result(name: str, params: dict[str, Any], workdir: str) -> RunResult | None:
  """Reads a run's results from its workdir.

  Args:
    name: the run's name in the sweep.
    params: the run's swept parameters.
    workdir: the run's workdir.

  Returns:
    The run's results; None when it has not finished (no `final_metrics.json`).

  Raises:
    DataError: `final_metrics.json` or `metrics.jsonl` is not valid JSON (the
      message names the file and line).
  """
  final_path = os.path.join(workdir, "final_metrics.json")
  if not os.path.isfile(final_path):
    return None
  final = flatten(_read_json_object(final_path))
  records_path = os.path.join(workdir, "metrics.jsonl")
  records = _read_records(records_path) if os.path.isfile(records_path) else []
  return RunResult(name=name, params=dict(params), workdir=workdir, final=final,
                   records=records)


def _without_seed(params: dict[str, Any]) -> dict[str, Any]:
  return {key: value for key, value in params.items() if key != SEED}


def _union(dicts: Sequence[dict[str, Any]]) -> list[str]:
  """The keys of `dicts`, in first-seen order."""
  return list(dict.fromkeys(key for d in dicts for key in d))


def write_csv(results: Sequence[RunResult], path: str,
              states: dict[str, str] | None = None) -> None:
  """Writes one row per run: its name, parameters and final metrics.

  Columns: "name", with `states` "state", the parameters (in first-seen order,
  "seed" last), then the final metrics (sorted). A value a run lacks is left empty.

  Args:
    results: the runs.
    path: the CSV file to write.
    states: run name -> its state (a search's trials: complete, pruned, failed).
  """
  params = _union([r.params for r in results])
  if SEED in params:
    params.remove(SEED)
    params.append(SEED)
  metrics = sorted(_union([r.final for r in results]))
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", *(["state"] if states else []), *params, *metrics])
    for r in results:
      writer.writerow([r.name, *([states.get(r.name, "")] if states else []),
                       *(r.params.get(p, "") for p in params),
                       *(r.final.get(m, "") for m in metrics)])


def group(results: Sequence[RunResult]) -> list[tuple[dict[str, Any], list[RunResult]]]:
  """Groups the runs that differ only in their seed.

  Returns:
    (parameters without "seed", the group's runs) per group, in first-seen order.
  """
  groups: list[tuple[dict[str, Any], list[RunResult]]] = []
  for r in results:
    params = _without_seed(r.params)
    for group_params, runs in groups:
      if group_params == params:
        runs.append(r)
        break
    else:
      groups.append((params, [r]))
  return groups


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0.0 for a single value)."""
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _stats(runs: Sequence[RunResult], metric: str) -> tuple[float, float, int] | None:
  values = [r.final[metric] for r in runs if metric in r.final]
  if not values:
    return None
  return (*_mean_std(values), len(values))


def _varying_keys(params: Sequence[dict[str, Any]]) -> list[str]:
  """The keys whose values are not the same in every dict (all keys when none differ)."""
  keys = _union(params)
  missing = object()
  varying = [key for key in keys
             if any(p.get(key, missing) != params[0].get(key, missing) for p in params)]
  return varying or keys


def _cell(value: Any) -> str:
  """A markdown table cell ("|" escaped)."""
  return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _mean_pm_std(mean: float, std: float, n: int) -> str:
  return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def summary_table(results: Sequence[RunResult], metrics: Sequence[str]) -> str:
  """A markdown table of the groups' final metrics, mean ± std over their seeds.

  One row per group (see `group`): its parameters, `n` (its number of runs) and,
  per metric, "mean ± std" (sample standard deviation) with 4 decimals, or the
  mean alone when the group has one run. Parameters with the same value in every
  group are left out, unless no parameter differs (then all are shown).

  Args:
    results: the runs.
    metrics: flattened final metric names, e.g. "test/accuracy".

  Returns:
    The markdown table.
  """
  groups = group(results)
  keys = _varying_keys([params for params, _ in groups]) if groups else []
  rows = []
  for params, runs in groups:
    cells = [params.get(key, "") for key in keys] + [len(runs)]
    for metric in metrics:
      stats = _stats(runs, metric)
      cells.append("" if stats is None else _mean_pm_std(*stats))
    rows.append(cells)
  return _table([*keys, "n", *metrics], rows)


def best(results: Sequence[RunResult], metric: str,
         mode: str = "max") -> tuple[dict[str, Any], float, float, int]:
  """The group (see `group`) with the best mean of a final metric.

  Args:
    results: the runs.
    metric: a flattened final metric name, e.g. "validation/accuracy".
    mode: "max" or "min": whether higher or lower is better. Ties go to the
      group seen first.

  Returns:
    (the group's parameters without "seed", mean, sample std (0.0 for one run),
    number of runs with the metric).

  Raises:
    ConfigError: `mode` is not "max" or "min", or no run has `metric`.
  """
  if mode not in ("max", "min"):
    raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
  found = None
  for params, runs in group(results):
    stats = _stats(runs, metric)
    if stats is None:
      continue
    if found is None or (stats[0] > found[1] if mode == "max" else stats[0] < found[1]):
      found = (params, *stats)
  if found is None:
    raise ConfigError(f"no finished run has the final metric {metric!r}; they have "
                      f"{sorted(_union([r.final for r in results]))}")
  return found


def _label(params: dict[str, Any], keys: Sequence[str]) -> str:
  return ", ".join(f"{key}={params[key]}" for key in keys if key in params)


def _save(fig: Any, ax: Any, path: str, xlabel: str, ylabel: str, title: str) -> None:
  """Labels, grid and legend on `ax`; writes `fig` to the PNG file `path`."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def pyplot():
  """matplotlib's pyplot, drawing to files (the Agg backend)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_metric(results: Sequence[RunResult], x: str, metric: str, path: str) -> None:
  """Plots a final metric against a swept parameter, mean ± std over seeds.

  One line per combination of the other parameters (without "seed"), with error
  bars where a point has more than one run. Numeric `x` values are sorted and
  drawn on a log scale when all are positive and span a factor of 20 or more;
  other values are categories in first-seen order.

  Args:
    results: the runs.
    x: the parameter on the x axis.
    metric: a flattened final metric name, e.g. "test/accuracy".
    path: the PNG file to write.

  Raises:
    ConfigError: no run has both the parameter `x` and the metric.
  """
  series: list[tuple[dict[str, Any], list[tuple[Any, float, float]]]] = []
  for params, runs in group(results):
    stats = _stats(runs, metric)
    if x not in params or stats is None:
      continue
    others = {key: value for key, value in params.items() if key != x}
    for other, points in series:
      if other == others:
        points.append((params[x], stats[0], stats[1]))
        break
    else:
      series.append((others, [(params[x], stats[0], stats[1])]))
  if not series:
    raise ConfigError(f"no finished run has both the parameter {x!r} and the metric {metric!r}")
  xs = [point[0] for _, points in series for point in points]
  numeric = all(_is_number(value) for value in xs)
  categories = list(dict.fromkeys(xs))
  keys = _varying_keys([others for others, _ in series])
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  try:
    for others, points in series:
      if numeric:
        points = sorted(points, key=lambda point: point[0])
      positions = [p[0] if numeric else categories.index(p[0]) for p in points]
      ax.errorbar(positions, [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                  capsize=3, label=_label(others, keys) or metric)
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 20:
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    _save(fig, ax, path, x, metric, f"{metric} vs {x} (mean ± std over seeds)")
  finally:
    plt.close(fig)


def _curve(runs: Sequence[RunResult], metric: str,
           split: str) -> tuple[list[int], list[float], list[float]]:
  """(steps, mean, std) of a metric over the runs' records of `split`."""
  by_step: dict[int, list[float]] = {}
  for r in runs:
    for record in r.records:
      if record.get("split") == split and _is_number(record.get(metric)):
        by_step.setdefault(record["step"], []).append(float(record[metric]))
  steps = sorted(by_step)
  stats = [_mean_std(by_step[step]) for step in steps]
  return steps, [mean for mean, _ in stats], [std for _, std in stats]


def plot_curves(results: Sequence[RunResult], metric: str, split: str, path: str) -> None:
  """Plots a metric's learning curve per group (see `group`), mean over its seeds.

  The band around a group's line is ± one std over its seeds (groups with more
  than one run only).

  Args:
    results: the runs.
    metric: a metric of the records, e.g. "loss".
    split: the records' split, e.g. "train" or "validation".
    path: the PNG file to write.

  Raises:
    ConfigError: no run has a `split` record with `metric`.
  """
  groups = group(results)
  keys = _varying_keys([params for params, _ in groups]) if groups else []
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  try:
    drawn = False
    for params, runs in groups:
      steps, mean, std = _curve(runs, metric, split)
      if not steps:
        continue
      drawn = True
      (line,) = ax.plot(steps, mean, label=_label(params, keys) or metric)
      if len(runs) > 1:
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
    if not drawn:
      raise ConfigError(f"no finished run has {split!r} records with the metric {metric!r}")
    _save(fig, ax, path, "step", f"{split} {metric}", f"{split} {metric} (mean over seeds)")
  finally:
    plt.close(fig)


def _safe(name: str) -> str:
  """`name` usable in a file name ("test/accuracy" -> "test_accuracy")."""
  return re.sub(r"[^\w.-]+", "_", name).strip("_") or "_"


def write_report(results: Sequence[RunResult], out_dir: str, *, title: str,
                 metrics: Sequence[str], select: tuple[str, str] | None = None,
                 plots: Sequence[tuple[str, str]] = (),
                 curves: Sequence[tuple[str, str]] = ()) -> str:
  """Writes a sweep's report: `results.csv`, `results.md` and plots in `plots/`.

  Args:
    results: the finished runs.
    out_dir: the folder to write to (created if missing).
    title: the report's title.
    metrics: the final metrics of the summary table (see `summary_table`).
    select: (metric, mode): report the best group by this final metric's mean
      (see `best`).
    plots: (parameter, metric) pairs: `plots/<metric>_vs_<parameter>.png` (see
      `plot_metric`).
    curves: (split, metric) pairs: `plots/curve_<split>_<metric>.png` (see
      `plot_curves`).

  Returns:
    The markdown text written to `results.md`.

  A `select`, plot or curve that the finished runs cannot give (a metric none of
  them has yet) is left out, with a line saying why, so a partial sweep still
  gets its report.
  """
  os.makedirs(out_dir, exist_ok=True)
  write_csv(results, os.path.join(out_dir, "results.csv"))
  lines = [f"# {title}", "",
           f"{len(results)} finished runs in {len(group(results))} configurations; "
           "mean ± std over seeds.", "", summary_table(results, metrics), ""]
  if select is not None:
    metric, mode = select
    try:
      params, mean, std, n = best(results, metric, mode)
      described = (", ".join(f"{key}={value}" for key, value in params.items())
                   or "(no parameters)")
      lines += [f"Best configuration by {metric} ({mode}): {described}: "
                f"{_mean_pm_std(mean, std, n)} over {n} seed{'s' if n > 1 else ''}", ""]
    except ConfigError as e:
      lines += [f"No best configuration by {metric}: {e}", ""]
  images = []
  if plots or curves:
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
  drawings = [(f"plots/{_safe(metric)}_vs_{_safe(x)}.png", f"{metric} vs {x}",
               functools.partial(plot_metric, results, x, metric)) for x, metric in plots]
  drawings += [(f"plots/curve_{_safe(split)}_{_safe(metric)}.png", f"{split} {metric}",
                functools.partial(plot_curves, results, metric, split))
               for split, metric in curves]
  for name, caption, draw in drawings:
    try:
      draw(os.path.join(out_dir, name))
      images.append(f"![{caption}]({name})")
    except ConfigError as e:
      images.append(f"(no plot of {caption}: {e})")
  if images:
    lines += ["## Plots", ""] + [line for image in images for line in (image, "")]
  text = "\n".join(lines)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  return text


def run_workdirs(paths: Sequence[str]) -> list[str]:
  """The run workdirs named by `paths`.

  A path with a `config.json` is a run workdir; a folder without one (e.g. a
  sweep's) stands for the run workdirs directly inside it, sorted by name.

  Args:
    paths: run workdirs or folders of them.

  Returns:
    The run workdirs, in the order given.

  Raises:
    ConfigError: a path does not exist, or is neither a run workdir nor holds one.
  """
  workdirs = []
  for path in paths:
    if not os.path.exists(path):
      raise ConfigError(f"{path} not found: expected a run workdir or a folder of them")
    if not os.path.isdir(path):
      raise ConfigError(f"{path} is not a folder: expected a run workdir or a folder of them")
    if os.path.isfile(os.path.join(path, "config.json")):
      workdirs.append(path)
      continue
    inside = sorted(os.path.join(path, name) for name in os.listdir(path)
                    if os.path.isfile(os.path.join(path, name, "config.json")))
    if not inside:
      raise ConfigError(f"{path} has no config.json and no run workdirs in it: is it a "
                        "training workdir?")
    workdirs.extend(inside)
  return workdirs


def _commit(workdir: str) -> str:
  """The git commit in `run_info.json`: its first 10 characters, "(dirty)" after it
  when the checkout had uncommitted changes; "" without a file or commit."""
  path = os.path.join(workdir, "run_info.json")
  if not os.path.isfile(path):
    return ""
  git = _read_json_object(path).get("git")
  if not isinstance(git, dict) or not isinstance(git.get("commit"), str):
    return ""
  return git["commit"][:10] + (" (dirty)" if git.get("dirty") else "")


def _config_value(value: Any) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def _number(value: float) -> str:
  return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4f}"


def compare_table(paths: Sequence[str], metrics: Sequence[str] | None = None,
                  all_keys: bool = False) -> str:
  """A markdown table comparing runs: their differing config keys and final metrics.

  One row per run (see `run_workdirs`): its path relative to the runs' common
  parent folder, the config keys (flattened with ".") whose values differ between
  the runs, the final metrics (flattened with "/"; "running/unfinished" for a run
  without `final_metrics.json`) and the git commit from `run_info.json` (its "git"
  entry) when a run has one.

  Args:
    paths: run workdirs or folders of them.
    metrics: the final metrics to show; by default those of
      `DEFAULT_COMPARE_METRICS` that some run has.
    all_keys: show every config key, not only those that differ.

  Returns:
    The markdown table.

  Raises:
    ConfigError: a path does not exist or is not a run workdir (nor holds one).
    DataError: a run's JSON file is not valid JSON.
  """
  workdirs = [os.path.abspath(w) for w in run_workdirs(paths)]
  configs = [flatten_config(_read_json_object(os.path.join(w, "config.json")))
             for w in workdirs]
  finals = []
  for w in workdirs:
    path = os.path.join(w, "final_metrics.json")
    finals.append(flatten(_read_json_object(path)) if os.path.isfile(path) else None)
  keys = _union(configs)
  if not all_keys:
    keys = [key for key in keys
            if len({_config_value(c[key]) if key in c else None for c in configs}) > 1]
  if metrics is None:
    metrics = [m for m in DEFAULT_COMPARE_METRICS
               if any(final is not None and m in final for final in finals)]
  commits = [_commit(w) for w in workdirs]
  parent = os.path.commonpath([os.path.dirname(w) for w in workdirs])
  rows = []
  for workdir, config, final, commit in zip(workdirs, configs, finals, commits):
    row = [os.path.relpath(workdir, parent)]
    row += [_config_value(config[key]) if key in config else "" for key in keys]
    for metric in metrics:
      if final is None:
        row.append(UNFINISHED)
      else:
        row.append(_number(final[metric]) if metric in final else "")
    if any(commits):
      row.append(commit)
    rows.append(row)
  header = ["run", *keys, *metrics] + (["commit"] if any(commits) else [])
  return _table(header, rows)

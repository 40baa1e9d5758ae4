"""A study: a Python file whose `sweep(add)` declares its runs, checked before any starts.

A study file (`experiments/<study>.py`) defines

  def sweep(add):
    for blocks in (0, 2, 4):
      for seed in range(3):
        add(config="configs/minilm_sentiment.py:max_length=32", seed=seed,
            freeze_blocks=blocks)

and may set what its report shows:

  METRICS = ["test/accuracy", "validation/accuracy"]   # table columns
  SELECT = ("validation/accuracy", "max")              # the best configuration
  PLOTS = [("freeze_blocks", "test/accuracy")]         # metric against a parameter
  CURVES = [("validation", "accuracy")]                # learning curves

`add(config, seed=0, name=None, **overrides)` takes a config file with its
optional `:arg`, the seed (`config.seed`) and overrides of config keys, dotted
(`**{"optimizer.lr": 1e-4}`) or with `__` for the dots (`optimizer__lr=1e-4`).
A run's parameters (the columns its results are grouped by) are the `key=value`
items of the config arg, the overrides and the seed; its name, unless given,
is made of them. `add` returns the run; a later run may name it as an override
value (e.g. `init_from=stage_a`), which becomes the earlier run's workdir and
makes the later run wait for it.

`load(path)` imports the study, calls `sweep(add)`, and resolves every run's
config in this process: a duplicate run name, a config arg or override naming
an unknown key, a value of the wrong type, or a value `ftjax.config.validate`
rejects raises `ConfigError` naming the run, before anything starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from typing import Any, Callable

import ml_collections

from ftjax.config import validate
from ftjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Value types `--config.key=value` flags can set (ml_collections' config_flags).
_FLAG_TYPES = (bool, int, float, str, tuple)


@dataclasses.dataclass
class Run:
  """One training run of a study.

  Attributes:
    name: unique within the study; the run's folder under the sweep workdir.
    config: config file path (relative to the repository or absolute) and `:arg`.
    overrides: dotted config key -> value (the seed included, as "seed"); a
      value may be another `Run`, standing for that run's workdir.
    params: what the run's results are grouped and plotted by.
    after: names of the runs whose workdirs it uses.
  """

  name: str
  config: str
  overrides: dict[str, Any]
  params: dict[str, Any]
  after: tuple[str, ...] = ()

  def resolved_overrides(self, sweep_dir: str) -> dict[str, Any]:
    """The overrides with every earlier run replaced by its workdir under `sweep_dir`."""
    return {key: run_dir(sweep_dir, value.name) if isinstance(value, Run) else value
            for key, value in self.overrides.items()}


@dataclasses.dataclass
class Study:
  """A loaded study file: its runs and what its report shows."""

  path: str
  name: str
  title: str
  runs: list[Run]
  metrics: list[str]
  select: tuple[str, str] | None
  plots: list[tuple[str, str]]
  curves: list[tuple[str, str]]
  # A search's `SEARCH` (see `ftjax.sweeps.optuna_search`) instead of listed runs.
  search: dict[str, Any] | None = None


def run_dir(sweep_dir: str, name: str) -> str:
  """The workdir of run `name` of the sweep in `sweep_dir`."""
  return os.path.join(os.path.abspath(sweep_dir), name)


def _parse_arg_items(arg: str) -> dict[str, Any]:
  """`key=value` items of a config arg, values read as Python literals where they are."""
  items = {}
  for item in filter(None, (part.strip() for part in arg.split(","))):
    key, has_value, text = item.partition("=")
    if has_value:
      try:
        items[key.strip()] = json.loads(text.strip())
      except ValueError:
        items[key.strip()] = text.strip()
    else:
      items[key.strip()] = True
  return items


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, tuple):
    return "-".join(_format_value(item) for item in value)
  return str(value)


def default_name(params: dict[str, Any]) -> str:
  """A folder name from the parameters, e.g. `freeze_blocks=2,seed=0`."""
  text = ",".join(f"{key}={_format_value(value)}" for key, value in params.items())
  return re.sub(r"[^\w.,=+-]+", "_", text) or "default"


class _Collector:
  """The `add` function handed to a study's `sweep`."""

  def __init__(self, study_path: str):
    self.study_path = study_path
    self.runs: list[Run] = []
    self._names: dict[str, int] = {}

  def __call__(self, config: str, seed: int = 0, name: str | None = None,
               **overrides: Any) -> Run:
    if not isinstance(config, str) or not config:
      raise ConfigError(f"{self.study_path}: add(config=...) needs a config file path "
                        f"with an optional ':arg', got {config!r}")
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    dotted["seed"] = seed
    _, _, arg = config.partition(":")
    params = {**_parse_arg_items(arg), **{k: v.name if isinstance(v, Run) else v
                                          for k, v in dotted.items() if k != "seed"},
              "seed": seed}
    name = name or default_name(params)
    if not re.fullmatch(r"[\w.,=+-]{1,200}", name):
      raise ConfigError(f"{self.study_path}: run name {name!r}: use at most 200 letters, "
                        "digits and . , = + - _ (it names the run's folder)")
    if name in self._names:
      first = self.runs[self._names[name]]
      raise ConfigError(
          f"{self.study_path}: two runs named {name!r} (runs {self._names[name] + 1} and "
          f"{len(self.runs) + 1}: {first.config} {first.params} and {config} {params}); "
          "give one of them another name= or different parameters")
    after = []
    for key, value in dotted.items():
      if isinstance(value, Run):
        if value.name not in self._names:
          raise ConfigError(f"{self.study_path}: run {name!r}: {key}= names run "
                            f"{value.name!r}, which is not part of this study")
        after.append(value.name)
    self._names[name] = len(self.runs)
    self.runs.append(Run(name, config, dotted, params, tuple(after)))
    return self.runs[-1]


def _import(path: str) -> Any:
  if not os.path.isfile(path):
    raise ConfigError(f"study file {path} not found")
  module_name = "ftjax_study_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_path(config: str) -> tuple[str, str | None]:
  """(absolute config file path, arg or None) of a `path[:arg]` config string."""
  path, has_arg, arg = config.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(REPO, path)
  return path, (arg if has_arg else None)


_CONFIG_MODULES: dict[str, Any] = {}


def base_config(config: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a `path[:arg]` config string, as `launch/train.py` builds it."""
  path, arg = config_path(config)
  if path not in _CONFIG_MODULES:
    _CONFIG_MODULES[path] = _import(path)
  module = _CONFIG_MODULES[path]
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  return module.get_config(arg) if arg is not None else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides set, checked as the flag parser would.

  Raises:
    ConfigError: for an unknown key, a value of another type, or a key whose
      type the `--config.key=value` flags cannot set (lists, dicts).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.lock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"{where}: override {key}={value!r}: config has no section "
                          f"{'.'.join(parents[:depth + 1])!r}")
      node = node[part]
    if leaf not in node:
      known = ", ".join(sorted(node.keys()))
      raise ConfigError(f"{where}: override {key}={value!r}: unknown config key; keys here: "
                        f"{known}")
    current = node[leaf]
    if not isinstance(current, _FLAG_TYPES):
      raise ConfigError(f"{where}: override {key}={value!r}: config.{key} is a "
                        f"{type(current).__name__}, which --config.{key}= flags cannot set; "
                        "change it in the config file or through its arg")
    if isinstance(value, tuple) and not isinstance(current, tuple):
      raise ConfigError(f"{where}: override {key}={value!r}: config.{key} is a "
                        f"{type(current).__name__}, not a tuple")
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{where}: override {key}={value!r}: config.{key} is "
                        f"{type(current).__name__} ({current!r}): {e}") from e
  return config


def flag_value(value: Any) -> str:
  """How a `--config.key=` flag spells `value`."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def _check_report_settings(study: Study) -> None:
  if study.select is not None:
    if (not isinstance(study.select, tuple) or len(study.select) != 2
        or study.select[1] not in ("max", "min")):
      raise ConfigError(f"{study.path}: SELECT={study.select!r}: expected (metric, 'max' or "
                        "'min')")
  param_names = {key for run in study.runs for key in run.params}
  for x, _ in study.plots:
    if x not in param_names:
      raise ConfigError(f"{study.path}: PLOTS names parameter {x!r}, which no run sets; "
                        f"parameters: {sorted(param_names)}")


def load(path: str) -> Study:
  """Imports a study file, collects its runs and resolves (checks) each run's config.

  Raises:
    ConfigError: the study defines no sweep or no runs, two runs share a name, or
      a run's config or overrides are wrong; the message names the run.
  """
  module = _import(path)
  sweep: Callable[[Callable[..., Run]], None] | None = getattr(module, "sweep", None)
  search = getattr(module, "SEARCH", None)
  if callable(sweep) == (search is not None):
    raise ConfigError(f"{path}: a study file defines sweep(add) or sets SEARCH (one of them)")
  collect = _Collector(path)
  if search is None:
    sweep(collect)
    if not collect.runs:
      raise ConfigError(f"{path}: sweep(add) added no runs")
  for run in collect.runs:
    resolve(run, "/sweep")
  doc = (module.__doc__ or "").strip()
  name = os.path.splitext(os.path.basename(path))[0]
  study = Study(path=os.path.abspath(path), name=name,
                title=getattr(module, "TITLE", doc.splitlines()[0] if doc else name),
                runs=collect.runs,
                metrics=list(getattr(module, "METRICS", ["test/accuracy",
                                                         "validation/accuracy"])),
                select=getattr(module, "SELECT", None),
                plots=list(getattr(module, "PLOTS", [])),
                curves=list(getattr(module, "CURVES", [])), search=search)
  if search is None:
    _check_report_settings(study)
  return study


def resolve(run: Run, sweep_dir: str) -> ml_collections.ConfigDict:
  """The config `launch/train.py` will run for `run`, checked.

  Raises:
    ConfigError: naming the run and what is wrong.
  """
  where = f"run {run.name!r} ({run.config})"
  try:
    config = base_config(run.config)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from e
  config = apply_overrides(config, run.resolved_overrides(sweep_dir), where)
  try:
    validate(config)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from e
  return config

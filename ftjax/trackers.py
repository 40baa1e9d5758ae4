"""Where a run's metrics go: `metrics.jsonl` and TensorBoard, and the trackers users run.

`config.trackers` lists them: "jsonl" (always: resume and the sweep reports read
it), "tensorboard", "wandb" (Weights & Biases) and "mlflow". Each tracker of a
run gets the resolved config as parameters, `run_info.json`'s facts as tags,
every training and evaluation metric at its step, and at the end the final
metrics and where the best parameters are. Only process 0 writes.

`config.tracking.<tracker>` holds a tracker's settings; an empty one leaves it
to the library and its own environment variables (`WANDB_MODE`, `WANDB_DIR`,
`WANDB_PROJECT`, `WANDB_ENTITY`, `MLFLOW_TRACKING_URI`,
`MLFLOW_EXPERIMENT_NAME`, ...), which work as their users expect. Defaults where
neither says: W&B project "ftjax"; MLflow tracking URI a SQLite store
`mlflow.db` in the workdir's parent folder (the sweep folder for a sweep's
runs), experiment "ftjax"; the run named after the workdir.

A resumed run continues the same tracker run: its id is kept in the workdir
(`trackers.json`) with the last step of each split sent. A resumed run
repeats the steps after its checkpoint with bitwise the same metrics, so the
records a tracker already holds are not sent again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import ml_collections

from ftjax import nested, schema, tracking
from ftjax.errors import ConfigError

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")
STATE_FILE = "trackers.json"
# What a tracker needs installed: (module, pip extra).
_PACKAGES = {"wandb": ("wandb", "ftjax[wandb]"), "mlflow": ("mlflow", "ftjax[mlflow]")}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown tracker, a list without "jsonl", or a tracker
  whose package is not installed (naming the pip extra that installs it)."""
  names = list(config.trackers)
  unknown = [name for name in names if name not in TRACKERS]
  if unknown or len(set(names)) != len(names):
    raise ConfigError(f"config.trackers={tuple(names)!r}: each once, from {list(TRACKERS)}")
  if "jsonl" not in names:
    raise ConfigError(f"config.trackers={tuple(names)!r}: needs 'jsonl' (metrics.jsonl, "
                      "which resume and the sweep reports read)")
  for name in names:
    if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name][0]) is None:
      raise ConfigError(f"config.trackers: {name!r} needs the package {_PACKAGES[name][0]}: "
                        f"pip install '{_PACKAGES[name][1]}'")


SCHEMA = schema.Section("", "Where metrics go besides metrics.jsonl, and each tracker's "
                        "settings (empty: the library's default or environment variable).", {
    "trackers": schema.Key(("jsonl", "tensorboard"), "metrics.jsonl (always), "
                           f"TensorBoard, W&B, MLflow: from {list(TRACKERS)}"),
    "tracking": {
        "wandb": {
            "project": schema.Key("", "W&B project (default: ftjax)"),
            "entity": schema.Key("", "W&B entity"),
            "name": schema.Key("", "W&B run name (default: the workdir's name)"),
            "group": schema.Key("", "W&B group"),
            "tags": schema.Key((), "W&B tags"),
            "mode": schema.Key("", "online, offline or disabled",
                               choices=("", "online", "offline", "disabled")),
        },
        "mlflow": {
            "tracking_uri": schema.Key("", "MLflow tracking URI (default: SQLite mlflow.db "
                                       "in the workdir's parent)"),
            "experiment": schema.Key("", "MLflow experiment (default: ftjax)"),
            "run_name": schema.Key("", "MLflow run name (default: the workdir's name)"),
        },
    },
}, check=check)


class _Wandb:
  """A W&B run (`wandb.init` with the run's id, resumed when it has one)."""

  name = "wandb"

  def __init__(self, settings: ml_collections.ConfigDict, workdir: str, run_id: str | None,
               params: dict[str, Any], tags: dict[str, Any]):
    import wandb  # pylint: disable=g-import-not-at-top
    given = lambda key, env: settings[key] or os.environ.get(env) or None
    try:
      self.run = wandb.init(
          project=given("project", "WANDB_PROJECT") or "ftjax",
          entity=given("entity", "WANDB_ENTITY"), group=given("group", "WANDB_RUN_GROUP"),
          name=settings.name or os.path.basename(os.path.abspath(workdir)),
          tags=list(settings.tags) or None, mode=settings.mode or None,
          id=run_id, resume="allow", config=params,
          settings=wandb.Settings(silent=True, console="off"))
    except Exception as e:  # wandb raises many kinds for a bad login, project or mode
      raise ConfigError(f"config.trackers: wandb could not start a run: {e} (offline: "
                        "--config.tracking.wandb.mode=offline or WANDB_MODE=offline)") from e
    self.run.summary.update({f"run_info/{k}": v for k, v in tags.items()})
    self.id = self.run.id

  def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
    self.run.log({f"{split}/{key}": value for key, value in metrics.items()}, step=step)

  def finish(self, final: dict[str, Any], best_dir: str) -> None:
    self.run.summary.update({**nested.leaves(final, "final", "/"), "best_parameters": best_dir})
    self.close()

  def close(self) -> None:
    self.run.finish()


class _Mlflow:
  """An MLflow run through `MlflowClient` (no global state)."""

  name = "mlflow"

  def __init__(self, settings: ml_collections.ConfigDict, workdir: str, run_id: str | None,
               params: dict[str, Any], tags: dict[str, Any]):
    from mlflow.entities import Param, RunTag  # pylint: disable=g-import-not-at-top
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
    parent = os.path.dirname(os.path.abspath(workdir))
    uri = (settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{os.path.join(parent, 'mlflow.db')}")
    try:
      self.client = MlflowClient(tracking_uri=uri)
      if run_id is not None:
        self.client.update_run(run_id, status="RUNNING")
        self.id = run_id
        return
      name = (settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ftjax")
      experiment = self.client.get_experiment_by_name(name)
      experiment_id = (experiment.experiment_id if experiment is not None
                       else self.client.create_experiment(name))
      self.id = self.client.create_run(
          experiment_id, run_name=settings.run_name or os.path.basename(
              os.path.abspath(workdir))).info.run_id
      # MLflow caps a parameter's value at 6,000 characters.
      self.client.log_batch(self.id, params=[Param(k, str(v)[:6000]) for k, v in
                                             params.items()],
                            tags=[RunTag(f"run_info.{k}", str(v)) for k, v in tags.items()])
    except Exception as e:  # a bad URI, store or permission
      raise ConfigError(f"config.trackers: mlflow could not start a run at {uri}: {e}") from e

  def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    now = int(time.time() * 1000)
    self.client.log_batch(self.id, metrics=[
        Metric(f"{split}/{key}", float(value), now, step) for key, value in metrics.items()])

  def finish(self, final: dict[str, Any], best_dir: str) -> None:
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    now = int(time.time() * 1000)
    numbers = {k: v for k, v in nested.leaves(final, "final", "/").items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, 0)
                                            for k, v in numbers.items()])
    self.client.set_tag(self.id, "best_parameters", best_dir)
    self.client.set_terminated(self.id, status="FINISHED")

  def close(self) -> None:
    self.client.set_terminated(self.id, status="KILLED")


_CLASSES = {"wandb": _Wandb, "mlflow": _Mlflow}


class Trackers:
  """The run's external trackers (W&B, MLflow), on process 0; nothing elsewhere."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, enabled: bool):
    self.names = [name for name in config.trackers if name in _CLASSES] if enabled else []
    self._settings = config.tracking
    self._config = config
    self._path = os.path.join(workdir, STATE_FILE)
    self._workdir = workdir
    self._open: dict[str, Any] = {}
    self._state: dict[str, dict[str, Any]] = {}

  def start(self) -> None:
    """Starts (or resumes, by the id kept in the workdir) each tracker's run, tagged with
    the facts of the workdir's run_info.json."""
    if not self.names:
      return
    tags = tracking.facts(self._workdir)
    if os.path.exists(self._path):
      with open(self._path) as f:
        self._state = json.load(f)
    params = nested.leaves(json.loads(self._config.to_json()))
    for name in self.names:
      state = self._state.setdefault(name, {"run_id": None, "sent": {}})
      tracker = _CLASSES[name](self._settings[name], self._workdir, state["run_id"], params,
                               tags)
      state["run_id"] = tracker.id
      self._open[name] = tracker
    self._save()

  def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Sends the scalar metrics of `split` at `step` to each tracker that lacks them."""
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    sent_any = False
    for name, tracker in self._open.items():
      sent = self._state[name]["sent"]
      if step <= sent.get(split, -1):  # sent before a resume: the same values again
        continue
      tracker.log(step, split, scalars)
      sent[split] = step
      sent_any = True
    if sent_any:
      self._save()

  def finish(self, final: dict[str, Any], best_dir: str) -> None:
    """Sends the final metrics and the best parameters' folder; ends each run."""
    for tracker in self._open.values():
      tracker.finish(final, best_dir)
    self._open = {}

  def close(self) -> None:
    """Ends each run still open (a failed or preempted start; a resume continues it)."""
    for tracker in self._open.values():
      tracker.close()
    self._open = {}

  def _save(self) -> None:
    temporary = self._path + ".tmp"
    with open(temporary, "w") as f:
      json.dump(self._state, f, indent=2)
    os.replace(temporary, self._path)

"""W&B and MLflow trackers, read back with the libraries' own readers: what a run sends,
and a resumed run continuing the same tracker run without sending a step twice."""

import glob
import importlib.util
import json
import os
import struct

import pytest

from conftest import ONE_DEVICE, with_overrides
from ftjax import metrics, trackers, trainer
from ftjax.errors import ConfigError


class _Stop(Exception):
  pass


def _wandb_records(folder):
  """The records of every offline W&B run file below `folder`, in file order (the
  files are LevelDB-style logs of 32 KiB blocks after a 7-byte W&B header)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  records = []
  for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))):
    with open(path, "rb") as f:
      data = f.read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
      if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: padding
        pos += 32768 - pos % 32768
        continue
      _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
      pending += data[pos + 7:pos + 7 + length]
      pos += 7 + length
      if kind in (1, 4):  # a whole record, or the last piece of one
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
  return records


def _wandb_history(records):
  """{(step, "split/metric"): value} of the history records."""
  history = {}
  for record in records:
    if record.WhichOneof("record_type") == "history":
      items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
      step = items.pop("_step")
      history.update({(step, key): value for key, value in items.items()
                      if not key.startswith("_")})
  return history


def _expected(workdir):
  """{(step, "split/metric"): value} of the run's metrics.jsonl (scalars)."""
  return {(r["step"], f"{r['split']}/{k}"): v for r in metrics.read_metrics(workdir)
          for k, v in r.items() if k not in ("step", "split") and isinstance(v, (int, float))}


@pytest.mark.skipif(not importlib.util.find_spec("mlflow") or not importlib.util.find_spec(
    "wandb"), reason="the test extras install mlflow and wandb")
def test_a_resumed_run_continues_its_wandb_and_mlflow_runs(tmp_path, debug_config, data_dir,
                                                          monkeypatch):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  config = with_overrides(debug_config, **{
      "data.data_dir": data_dir, "trackers": ("jsonl", "tensorboard", "wandb", "mlflow"),
      "tracking.wandb.tags": ("smoke",)})
  workdir = str(tmp_path / "runs" / "a")

  def stop_at_6(step):
    if step == 6:
      raise _Stop()

  with pytest.raises(_Stop):  # killed after step 6 was logged; checkpoint at step 4
    trainer.run(config, workdir, on_step=stop_at_6, devices=ONE_DEVICE)
  final = trainer.run(config, workdir, devices=ONE_DEVICE)
  expected = _expected(workdir)
  assert (12, "test/accuracy") in expected

  # MLflow: one run in the default store (the workdir's parent), every metric once.
  client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
  runs = client.search_runs([client.get_experiment_by_name("ftjax").experiment_id])
  assert len(runs) == 1 and runs[0].info.status == "FINISHED"
  run = runs[0]
  assert run.info.run_name == "a"
  assert run.data.params["optimizer.lr"] == str(config.optimizer.lr)
  assert run.data.tags["best_parameters"] == os.path.join(workdir, "best")
  assert run.data.tags["run_info.seed"] == "0"
  got = {}
  for key in {key for _, key in expected}:
    history = client.get_metric_history(run.info.run_id, key)
    assert len({m.step for m in history}) == len(history), key  # no step sent twice
    got.update({(m.step, key): m.value for m in history})
  assert got == pytest.approx(expected)
  assert run.data.metrics["final/test/accuracy"] == pytest.approx(final["test"]["accuracy"])

  # W&B: two offline run folders of one run id (sync uploads them as one run).
  records = _wandb_records(str(tmp_path / "wandb_dir"))
  ids = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
  with open(os.path.join(workdir, trackers.STATE_FILE)) as f:
    state = json.load(f)
  assert ids == {state["wandb"]["run_id"]}
  assert len(glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*"))) == 2
  assert _wandb_history(records) == pytest.approx(expected)
  runs_with_tags = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert list(runs_with_tags[0].tags) == ["smoke"] and runs_with_tags[0].display_name == "a"


@pytest.mark.parametrize("trackers_, message", [
    (("jsonl", "comet"), r"config.trackers=\('jsonl', 'comet'\): each once, from"),
    (("tensorboard",), r"needs 'jsonl' \(metrics.jsonl, which resume and the sweep reports "
     r"read\)"),
])
def test_bad_tracker_lists_are_refused(debug_config, trackers_, message):
  with pytest.raises(ConfigError, match=message):
    trackers.check(with_overrides(debug_config, trackers=trackers_))


def test_a_missing_tracker_package_names_the_extra(debug_config, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
  with pytest.raises(ConfigError, match=r"config.trackers: 'mlflow' needs the package "
                     r"mlflow: pip install 'ftjax\[mlflow\]'"):
    trackers.check(with_overrides(debug_config, trackers=("jsonl", "mlflow")))


def test_without_tensorboard_no_events_are_written(tmp_path, debug_config, data_dir):
  config = with_overrides(debug_config, **{"data.data_dir": data_dir, "trackers": ("jsonl",),
                                           "total_steps": 2, "eval_every": 2})
  trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert not os.path.exists(tmp_path / "run" / "tensorboard")
  assert metrics.read_metrics(str(tmp_path / "run"))

"""Sweep results: loading run workdirs, CSV, summary tables, best groups, plots, reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from ftjax.errors import ConfigError, DataError
from ftjax.sweeps import results

from conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (lr, seed) -> (test/accuracy, validation/loss); every run has rank 4.
RUNS = {
    (0.001, 0): (0.80, 0.5), (0.001, 1): (0.82, 0.4), (0.001, 2): (0.84, 0.3),
    (0.01, 0): (0.70, 0.6), (0.01, 1): (0.75, 0.8),
    (0.1, 0): (0.60, 0.9),
}


def _write_run(workdir, lr: float, seed: int, final: dict | None,
               run_info: dict | None = None) -> None:
  """A run workdir as training writes it (`final=None`: the run has not finished)."""
  workdir.mkdir(parents=True)
  config = {"seed": seed, "model": {"name": "bert"}, "peft": {"rank": 4},
            "optimizer": {"lr": lr, "b1": 0.9, "lr_mults": [[".*", 1.0]]}}
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  records = [{"step": 10, "split": "train", "loss": 1.0 + lr + seed},
             {"step": 20, "split": "train", "loss": 0.5 + lr + seed},
             {"step": 20, "split": "samples", "samples": [{"prompt": "a", "completion": "b"}]},
             {"step": 20, "split": "validation", "loss": 0.7, "accuracy": 0.6}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if final is not None:
    (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2))
  if run_info is not None:
    (workdir / "run_info.json").write_text(json.dumps(run_info))


def _final(accuracy: float, loss: float) -> dict:
  return {"best_step": 20, "stopped_early": False,
          "validation": {"loss": loss, "accuracy": 0.5, "count": 100.0},
          "test": {"accuracy": accuracy, "count": 100.0}, "train_seconds": 12.5}


@pytest.fixture
def sweep(tmp_path):
  """A sweep folder of finished runs (three groups over seeds) and one unfinished run."""
  folder = tmp_path / "sweep"
  for (lr, seed), (accuracy, loss) in RUNS.items():
    final = _final(accuracy, loss)
    if (lr, seed) == (0.1, 0):
      final["forgetting"] = {"rotten_tomatoes": 0.05}
    _write_run(folder / f"lr{lr}_s{seed}", lr, seed, final)
  _write_run(folder / "lr1.0_s0", 1.0, 0, None)
  return folder


def _load(folder) -> list[results.RunResult]:
  loaded = [results.load_result(f"lr{lr}_s{seed}", {"seed": seed, "lr": lr, "rank": 4},
                                str(folder / f"lr{lr}_s{seed}")) for lr, seed in RUNS]
  assert all(r is not None for r in loaded)
  return loaded


def test_flatten_keeps_numbers_under_slash_keys():
  tree = {"best_step": 320, "stopped_early": False, "name": "x", "values": [1, 2],
          "validation": {"loss": 0.4, "rotten_tomatoes/accuracy": 0.8, "deep": {"n": 3}}}
  assert results.flatten(tree) == {"best_step": 320.0, "validation/loss": 0.4,
                                   "validation/rotten_tomatoes/accuracy": 0.8,
                                   "validation/deep/n": 3.0}
  assert results.flatten({"a": {"b": 1}}, prefix="final") == {"final/a/b": 1.0}


def test_load_result(sweep):
  result = results.load_result("a", {"lr": 0.001, "seed": 0}, str(sweep / "lr0.001_s0"))
  assert result.name == "a" and result.params == {"lr": 0.001, "seed": 0}
  assert result.final == {"best_step": 20.0, "validation/loss": 0.5, "validation/accuracy": 0.5,
                          "validation/count": 100.0, "test/accuracy": 0.8,
                          "test/count": 100.0, "train_seconds": 12.5}
  assert [r["split"] for r in result.records] == ["train", "train", "validation"]
  assert results.load_result("b", {"lr": 1.0}, str(sweep / "lr1.0_s0")) is None


def test_load_result_names_broken_json(sweep):
  workdir = sweep / "lr0.01_s0"
  (workdir / "final_metrics.json").write_text('{"test": {"accuracy": 0.8,}}')
  with pytest.raises(DataError, match=r"final_metrics\.json line 1"):
    results.load_result("a", {}, str(workdir))
  workdir = sweep / "lr0.01_s1"
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "split": "train", "loss": \n')
  with pytest.raises(DataError, match=r"metrics\.jsonl line 5"):
    results.load_result("a", {}, str(workdir))


def test_write_csv(sweep, tmp_path):
  path = tmp_path / "results.csv"
  results.write_csv(_load(sweep), str(path))
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["name", "lr", "rank", "seed", "best_step", "forgetting/rotten_tomatoes",
                     "test/accuracy", "test/count", "train_seconds", "validation/accuracy",
                     "validation/count", "validation/loss"]
  assert len(rows) == 1 + len(RUNS)
  assert rows[1] == ["lr0.001_s0", "0.001", "4", "0", "20.0", "", "0.8", "100.0", "12.5", "0.5",
                     "100.0", "0.5"]
  assert rows[-1][:6] == ["lr0.1_s0", "0.1", "4", "0", "20.0", "0.05"]


def test_group_and_summary_table(sweep):
  loaded = _load(sweep)
  groups = results.group(loaded)
  assert [params for params, _ in groups] == [{"lr": 0.001, "rank": 4}, {"lr": 0.01, "rank": 4},
                                              {"lr": 0.1, "rank": 4}]
  assert [len(runs) for _, runs in groups] == [3, 2, 1]
  table = results.summary_table(loaded, ["test/accuracy", "validation/loss"])
  # accuracy: mean(.80, .82, .84) = .82, std = sqrt((.02² + 0 + .02²) / 2) = .02;
  # mean(.70, .75) = .725, std = sqrt(2 * .025²) = .03536. loss: std(.5, .4, .3) = .1,
  # mean(.6, .8) = .7, std = sqrt(2 * .1²) = .14142. rank is 4 everywhere: no column.
  assert table.splitlines() == [
      "| lr | n | test/accuracy | validation/loss |",
      "|---|---|---|---|",
      "| 0.001 | 3 | 0.8200 ± 0.0200 | 0.4000 ± 0.1000 |",
      "| 0.01 | 2 | 0.7250 ± 0.0354 | 0.7000 ± 0.1414 |",
      "| 0.1 | 1 | 0.6000 | 0.9000 |"]
  one_group = results.summary_table(loaded[:2], ["test/accuracy"])
  assert one_group.splitlines()[0] == "| lr | rank | n | test/accuracy |"
  assert one_group.splitlines()[2] == "| 0.001 | 4 | 2 | 0.8100 ± 0.0141 |"


def test_best(sweep):
  loaded = _load(sweep)
  params, mean, std, n = results.best(loaded, "test/accuracy")
  assert params == {"lr": 0.001, "rank": 4} and n == 3
  assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)
  assert results.best(loaded, "test/accuracy", "min") == ({"lr": 0.1, "rank": 4}, 0.6, 0.0, 1)
  params, mean, std, n = results.best(loaded, "validation/loss", "min")
  assert params["lr"] == 0.001 and mean == pytest.approx(0.4)
  with pytest.raises(ValueError, match="'max' or 'min'"):
    results.best(loaded, "test/accuracy", "maximum")
  with pytest.raises(ConfigError, match="test/f1"):
    results.best(loaded, "test/f1")


def _assert_png(path) -> None:
  data = path.read_bytes()
  assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_plots(sweep, tmp_path):
  loaded = _load(sweep)
  results.plot_metric(loaded, "lr", "test/accuracy", str(tmp_path / "numeric.png"))
  _assert_png(tmp_path / "numeric.png")
  for r in loaded:  # categorical x, two lines
    r.params["optimizer"] = "adamw" if r.params["seed"] else "sgd"
  results.plot_metric(loaded, "optimizer", "test/accuracy", str(tmp_path / "categories.png"))
  _assert_png(tmp_path / "categories.png")
  results.plot_curves(loaded, "loss", "train", str(tmp_path / "curves.png"))
  _assert_png(tmp_path / "curves.png")
  with pytest.raises(ConfigError, match="batch_size"):
    results.plot_metric(loaded, "batch_size", "test/accuracy", str(tmp_path / "none.png"))


def test_write_report(sweep, tmp_path):
  out = tmp_path / "report"
  text = results.write_report(_load(sweep), str(out), title="Learning rates",
                              metrics=["test/accuracy"], select=("test/accuracy", "max"),
                              plots=[("lr", "test/accuracy")], curves=[("train", "loss")])
  assert (out / "results.md").read_text() == text
  assert text.startswith("# Learning rates\n")
  assert "| 0.001 | 3 | 0.8200 ± 0.0200 |" in text
  assert ("Best configuration by test/accuracy (max): lr=0.001, rank=4: 0.8200 ± 0.0200 "
          "over 3 seeds") in text
  assert "![test/accuracy vs lr](plots/test_accuracy_vs_lr.png)" in text
  assert "![train loss](plots/curve_train_loss.png)" in text
  for name in ("test_accuracy_vs_lr.png", "curve_train_loss.png"):
    _assert_png(out / "plots" / name)
  assert (out / "results.csv").read_text().startswith("name,lr,rank,seed,")


def test_compare_table(sweep):
  (sweep / "lr0.001_s0" / "run_info.json").write_text(
      json.dumps({"git": {"commit": "0123456789abcdef", "dirty": False}, "seed": 0}))
  (sweep / "lr0.001_s1" / "run_info.json").write_text(
      json.dumps({"git": {"commit": "fedcba9876543210", "dirty": True}, "seed": 1}))
  lines = results.compare_table([str(sweep)]).splitlines()
  assert lines[0] == ("| run | seed | optimizer.lr | test/accuracy | validation/accuracy "
                      "| train_seconds | commit |")
  assert lines[2] == "| lr0.001_s0 | 0 | 0.001 | 0.8000 | 0.5000 | 12.5000 | 0123456789 |"
  assert lines[3] == "| lr0.001_s1 | 1 | 0.001 | 0.8200 | 0.5000 | 12.5000 | fedcba9876 (dirty) |"
  assert lines[7] == "| lr0.1_s0 | 0 | 0.1 | 0.6000 | 0.5000 | 12.5000 |  |"
  unfinished = "running/unfinished"
  assert lines[-1] == f"| lr1.0_s0 | 0 | 1.0 | {unfinished} | {unfinished} | {unfinished} |  |"

  two = results.compare_table([str(sweep / "lr0.01_s0"), str(sweep / "lr0.01_s1")],
                              metrics=["validation/loss", "best_step"])
  assert two.splitlines() == ["| run | seed | validation/loss | best_step |", "|---|---|---|---|",
                              "| lr0.01_s0 | 0 | 0.6000 | 20 |",
                              "| lr0.01_s1 | 1 | 0.8000 | 20 |"]
  every = results.compare_table([str(sweep / "lr0.01_s0")], all_keys=True).splitlines()[0]
  assert every == ("| run | seed | model.name | peft.rank | optimizer.lr | optimizer.b1 "
                   "| optimizer.lr_mults | test/accuracy | validation/accuracy "
                   "| train_seconds |")


def test_compare_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match="empty has no config.json"):
    results.compare_table([str(tmp_path / "empty")])
  missing = str(tmp_path / "missing")
  done = subprocess.run([sys.executable, os.path.join("launch", "compare.py"), missing],
                        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode != 0
  assert done.stderr.strip() == (f"error: {missing} not found: expected a run workdir or a "
                                 "folder of them")

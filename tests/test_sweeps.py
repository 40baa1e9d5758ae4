"""Studies, search spaces, the sweep runner and launch/sweep.py."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ftjax.errors import ConfigError
from ftjax.sweeps import runner, search, study as study_lib

from conftest import ONE_DEVICE, REPO

DEBUG = "configs/minilm_sentiment.py:debug"


def _study(tmp_path, body, header=""):
  path = tmp_path / "a_study.py"
  path.write_text(textwrap.dedent(header) + "\n\ndef sweep(add):\n"
                  + textwrap.indent(textwrap.dedent(body), "  "))
  return str(path)


def test_study_collects_runs_params_and_names(tmp_path):
  path = _study(tmp_path, f"""
      for lr in (1e-4, 3e-4):
        for seed in range(2):
          add(config="{DEBUG},rank=4", seed=seed, optimizer__lr=lr)
      add(config="{DEBUG}", name="probe", **{{"freeze": "all_but_head"}})
      """, header='"""Title line."""\nMETRICS = ["test/accuracy"]\n'
                  'SELECT = ("validation/accuracy", "max")\n')
  study = study_lib.load(path)
  assert study.title == "Title line." and study.metrics == ["test/accuracy"]
  assert [run.name for run in study.runs] == [
      "debug=True,rank=4,optimizer.lr=0.0001,seed=0",
      "debug=True,rank=4,optimizer.lr=0.0001,seed=1",
      "debug=True,rank=4,optimizer.lr=0.0003,seed=0",
      "debug=True,rank=4,optimizer.lr=0.0003,seed=1",
      "probe"]
  first = study.runs[0]
  assert first.params == {"debug": True, "rank": 4, "optimizer.lr": 1e-4, "seed": 0}
  assert first.overrides == {"optimizer.lr": 1e-4, "seed": 0}
  config = study_lib.resolve(first, str(tmp_path))
  assert config.optimizer.lr == 1e-4 and config.peft.rank == 4 and config.seed == 0
  assert study_lib.resolve(study.runs[-1], str(tmp_path)).freeze == "all_but_head"


@pytest.mark.parametrize("body, message", [
    (f'add(config="{DEBUG}", seed=0)\nadd(config="{DEBUG}", seed=0)',
     "two runs named 'debug=True,seed=0' (runs 1 and 2"),
    (f'add(config="{DEBUG}", optimizer__lrr=1e-4)',
     "override optimizer.lrr=0.0001: unknown config key; keys here: b1, b2"),
    (f'add(config="{DEBUG}", optimiser__lr=1e-4)', "config has no section 'optimiser'"),
    (f'add(config="{DEBUG}", batch_size="big")',
     "override batch_size='big': config.batch_size is int"),
    (f'add(config="{DEBUG}", model__arch=(("hidden_size", 8),))',
     "config.model.arch is a ConfigDict, which --config.model.arch= flags cannot set"),
    (f'add(config="{DEBUG}", trainable=(("head", "yes"),))',
     "config.trainable: ('head', 'yes') is not a (regex, True | None) rule"),
    (f'add(config="{DEBUG},lrr=1")', "unknown config arg 'lrr'"),
    (f'add(config="{DEBUG}", batch_size=-8)', "config.batch_size=-8: must be a positive integer"),
    ('add(config="configs/nope.py")', "configs/nope.py not found"),
    ("pass", "sweep(add) added no runs"),
])
def test_bad_studies_fail_before_anything_runs(tmp_path, body, message):
  path = _study(tmp_path, body)
  with pytest.raises(ConfigError) as error:
    study_lib.load(path)
  assert message in str(error.value)


def test_a_study_without_sweep_and_a_plot_of_an_unknown_parameter(tmp_path):
  path = tmp_path / "empty.py"
  path.write_text("X = 1\n")
  with pytest.raises(ConfigError, match="defines sweep"):
    study_lib.load(str(path))
  path = _study(tmp_path, f'add(config="{DEBUG}")', header='PLOTS = [("lr", "test/accuracy")]')
  with pytest.raises(ConfigError, match="PLOTS names parameter 'lr', which no run sets"):
    study_lib.load(path)


def test_grid_and_random_search():
  assert search.grid(a=[1, 2], b=["x", "y"]) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  space = {"lr": search.log_uniform(1e-5, 1e-3), "rank": search.choice([4, 8]),
           "warmup": search.int_uniform(0, 10), "dropout": search.uniform(0.0, 0.5)}
  points = search.random(200, seed=3, **space)
  assert points == search.random(200, seed=3, **space) != search.random(200, seed=4, **space)
  lrs = np.array([p["lr"] for p in points])
  assert lrs.min() >= 1e-5 and lrs.max() <= 1e-3
  # log-uniform: each decade about half the points
  assert 0.35 < np.mean(lrs < 1e-4) < 0.65
  assert {p["rank"] for p in points} == {4, 8}
  assert {p["warmup"] for p in points} == set(range(11))
  assert all(0 <= p["dropout"] <= 0.5 for p in points)
  for bad in (lambda: search.grid(a=[]), lambda: search.log_uniform(0, 1),
              lambda: search.uniform(2, 1), lambda: search.random(0, lr=search.choice([1])),
              lambda: search.random(2, lr=[1e-4])):
    with pytest.raises(ValueError):
      bad()


def test_launch_commands(tmp_path):
  two = f"{DEBUG},data=rotten_tomatoes+tweets"
  path = _study(tmp_path, f"""
      first = add(config="{two}", name="a", **{{"data.mixing": "weights",
                                                 "data.weights": (1.0, 0.0)}})
      add(config="{DEBUG}", name="b", init_from=first, checkpoint__use_async=False)
      """)
  study = study_lib.load(path)
  sweep_dir = str(tmp_path / "sweep")
  assert study.runs[1].after == ("a",) and study.runs[1].params["init_from"] == "a"
  lines = runner.commands(study, sweep_dir, "slurm", ["--nodes=2"])
  assert lines == [
      f"python launch/slurm.py --config={two} --workdir={sweep_dir}/a "
      "--config.data.mixing=weights '--config.data.weights=(1.0, 0.0)' --config.seed=0 "
      "--nodes=2 --job_name=a",
      "# after a finished:",
      f"python launch/slurm.py --config={DEBUG} --workdir={sweep_dir}/b "
      f"--config.init_from={sweep_dir}/a --config.checkpoint.use_async=false --config.seed=0 "
      "--nodes=2 --job_name=b"]
  assert runner.commands(study, sweep_dir, "tpu_pod")[0].startswith("python launch/tpu_pod.py")
  with pytest.raises(ConfigError, match="launcher 'k8s'"):
    runner.commands(study, sweep_dir, "k8s")


def test_a_run_made_with_another_config_is_refused(tmp_path):
  path = _study(tmp_path, f'add(config="{DEBUG}", name="a")')
  study = study_lib.load(path)
  workdir = tmp_path / "sweep" / "a"
  workdir.mkdir(parents=True)
  config = json.loads(study_lib.resolve(study.runs[0], str(tmp_path / "sweep")).to_json())
  config["optimizer"]["lr"] = 1.0
  del config["batch_size"]  # a key only on one side (another version): not a difference
  (workdir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=r"made with another config \(1 key\(s\) differ: "
                     r"optimizer.lr: 1.0 there, 5e-05 now"):
    runner.run_all(study, str(tmp_path / "sweep"))


def _folder_with_classes(tmp_path, config_arg, num_classes, files=""):
  """A sweep's run "a" of `config_arg` (with `files`: the add() arguments naming them), and
  its folder's config.json with `num_classes`."""
  study = study_lib.load(_study(tmp_path, f'add(config="{config_arg}", name="a", {files})'))
  workdir = tmp_path / "sweep" / "a"
  workdir.mkdir(parents=True, exist_ok=True)
  config = json.loads(study_lib.resolve(study.runs[0], str(tmp_path / "sweep")).to_json())
  config["model"]["num_classes"] = num_classes
  (workdir / "config.json").write_text(json.dumps(config))
  return study.runs[0]


def test_a_class_count_taken_from_the_data_is_not_a_changed_config(tmp_path):
  run = _folder_with_classes(tmp_path, f"{DEBUG},data=csv", 3,  # 0 in the config: the data's
                             files="**{'data.files.train': 'tickets.csv'}")
  runner.check_workdir(run, str(tmp_path / "sweep"))
  run = _folder_with_classes(tmp_path, DEBUG, 3)  # the preset's 2 classes
  with pytest.raises(ConfigError, match=r"model.num_classes: 3 there, 2 now"):
    runner.check_workdir(run, str(tmp_path / "sweep"))


def _sweep(*args, env=None):
  return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def continual_sweep(tmp_path_factory, data_dir):
  """A two-stage continual study of debug runs (multi-task model, EWC in stage B),
  run through launch/sweep.py."""
  root = tmp_path_factory.mktemp("continual")
  config = f"{DEBUG},data=rotten_tomatoes+tweets"
  study = root / "continual.py"
  study.write_text(textwrap.dedent(f'''
      """Two stages."""
      METRICS = ["test/rotten_tomatoes/accuracy", "forgetting/rotten_tomatoes"]
      CURVES = [("validation", "accuracy")]
      COMMON = {{"data.data_dir": {data_dir!r}, "data.mixing": "weights"}}

      def sweep(add):
        a = add(config="{config}", name="A", **COMMON, **{{"data.weights": (1.0, 0.0)}})
        add(config="{config},regularizer=ewc,strength=0.5", name="B", init_from=a,
            **COMMON, **{{"data.weights": (0.0, 1.0), "regularizer.fisher_examples": 16}})
      '''))
  sweep_dir = root / "sweep"
  # Without the suite's compilation cache: the runs share the sweep's own.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  result = _sweep(f"--study={study}", f"--workdir={sweep_dir}", "--parallel=2", env=env)
  return study, sweep_dir, result


@pytest.mark.slow  # its sweep (about 3 minutes) is shared with the resume check below
def test_continual_sweep_runs_in_order_and_reports(continual_sweep):
  study, sweep_dir, result = continual_sweep
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  log = result.stdout
  assert log.index("A: finished") < log.index("B: started")
  final_a = json.loads((sweep_dir / "A" / "final_metrics.json").read_text())
  final_b = json.loads((sweep_dir / "B" / "final_metrics.json").read_text())
  # Stage B starts from stage A's best weights: its test at start is A's final test.
  assert final_b["test_at_start"]["rotten_tomatoes/accuracy"] == pytest.approx(
      final_a["test"]["rotten_tomatoes/accuracy"])
  assert final_b["forgetting"]["rotten_tomatoes"] == pytest.approx(
      final_b["test_at_start"]["rotten_tomatoes/accuracy"]
      - final_b["test"]["rotten_tomatoes/accuracy"])
  records = [json.loads(line) for line in (sweep_dir / "B" / "metrics.jsonl").open()]
  assert all("penalty" in r for r in records if r["split"] == "train")
  info = json.loads((sweep_dir / "B" / "run_info.json").read_text())
  assert info["seed"] == 0 and info["devices"]["count"] == 1
  assert info["packages"]["jax"] and info["git"]["commit"] and len(info["starts"]) == 1
  report = (sweep_dir / "results.md").read_text()
  assert "Run(" not in report and "forgetting/rotten_tomatoes" in report
  assert (sweep_dir / "results.csv").read_text().splitlines()[0].startswith("name,")
  assert (sweep_dir / "plots" / "curve_validation_accuracy.png").read_bytes()[:4] == b"\x89PNG"
  assert os.listdir(sweep_dir / runner.COMPILATION_CACHE)  # the compiled steps
  manifest = json.loads((sweep_dir / "sweep.json").read_text())
  assert [r["name"] for r in manifest["runs"]] == ["A", "B"]
  assert manifest["runs"][1]["overrides"]["init_from"] == str(sweep_dir / "A")
  # Started again: everything is finished, nothing runs.
  again = _sweep(f"--study={study}", f"--workdir={sweep_dir}")
  assert again.returncode == 0 and "2 already finished, 0 to run" in again.stdout


@pytest.mark.slow  # reads a run of the continual sweep, which the slow checks build anyway
def test_init_from_a_different_model_names_the_mismatch(continual_sweep, debug_config, tmp_path):
  from conftest import with_overrides  # pylint: disable=g-import-not-at-top
  from ftjax import trainer  # pylint: disable=g-import-not-at-top
  _, sweep_dir, _ = continual_sweep
  config = with_overrides(debug_config, init_from=str(sweep_dir / "A"))  # 2 classes, not 5
  with pytest.raises(ConfigError, match=r"that run's model does not match this one's .*"
                     r"head/kernel: shape \(384, 5\) there, \(384, 2\) here"):
    trainer.run(config, str(tmp_path / "run"))
  with pytest.raises(ConfigError, match="not a folder"):
    trainer.run(with_overrides(debug_config, init_from=str(tmp_path / "nothing")),
                str(tmp_path / "run2"))


def test_sweep_launcher_errors(tmp_path):
  study = _study(tmp_path, f'add(config="{DEBUG}", optimizer__lrr=1)')
  result = _sweep(f"--study={study}", f"--workdir={tmp_path / 'sweep'}")
  assert result.returncode == 1
  assert "error: run 'debug=True,optimizer.lrr=1,seed=0'" in result.stderr
  assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_an_interrupted_ewc_stage_resumes_to_the_same_run(continual_sweep, debug_config, tmp_path):
  """The Fisher weights and the test-at-start metrics come back from the checkpoint."""
  from conftest import with_overrides  # pylint: disable=g-import-not-at-top
  from configs import minilm_sentiment  # pylint: disable=g-import-not-at-top
  from ftjax import trainer  # pylint: disable=g-import-not-at-top
  _, sweep_dir, _ = continual_sweep
  config = with_overrides(
      minilm_sentiment.get_config("debug,data=rotten_tomatoes+tweets,regularizer=ewc,strength=0.5"),
      **{"data.data_dir": debug_config.data.data_dir, "init_from": str(sweep_dir / "A"),
         "data.mixing": "weights", "data.weights": (0.0, 1.0),
         "regularizer.fisher_examples": 16, "checkpoint.use_async": False})

  def interrupt(step):
    if step == 6:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    trainer.run(config, str(tmp_path / "resumed"), on_step=interrupt, devices=ONE_DEVICE)
  resumed = trainer.run(config, str(tmp_path / "resumed"), devices=ONE_DEVICE)
  whole = trainer.run(config, str(tmp_path / "whole"), devices=ONE_DEVICE)
  assert resumed["test_at_start"] == whole["test_at_start"]
  assert resumed["test"] == whole["test"] and resumed["forgetting"] == whole["forgetting"]
  records = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()
                          if json.loads(line)["split"] == "train"]
  assert records("resumed") == records("whole")

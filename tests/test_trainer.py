"""The fine-tuning loop end to end: launcher, early stopping, compiles (faults and resumes:
test_faults.py)."""

import json
import logging
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from ftjax import compile_cache, trainer
from ftjax.data import buckets as data_buckets

from conftest import ONE_DEVICE, REPO, launch_debug_run

def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  """A debug run through the launcher, as a user starts it."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = launch_debug_run(workdir, data_dir)
  return workdir, result.stdout


# A program compiled with the cache in `directory`: (the compilation cache's summary, the
# program's output).
_CACHED_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from ftjax import compile_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
usage = compile_cache.enable(sys.argv[1])
out = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))(jnp.arange(12.0).reshape(3, 4) / 7)
print(usage.summary())
print(out.tolist())
"""


def _cached_program(directory):
  result = subprocess.run([sys.executable, "-c", _CACHED_PROGRAM, str(directory)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  summary, output = result.stdout.strip().splitlines()[-2:]
  match = re.fullmatch(r"compilation cache (.*): (\d+) compiled program\(s\) read back "
                       r"\((\d+\.\d) s of compiling saved\), (\d+) written", summary)
  assert match, summary
  return (match.group(1), int(match.group(2)), int(match.group(4))), output


def test_a_second_process_reads_its_compiled_programs_from_the_cache(tmp_path):
  (directory, read, written), output = _cached_program(tmp_path / "xla")
  assert directory == str(tmp_path / "xla") and read == 0 and written >= 1
  assert len(os.listdir(tmp_path / "xla")) == written
  (_, read_again, written_again), output_again = _cached_program(tmp_path / "xla")
  assert (read_again, written_again) == (written, 0)
  assert output_again == output  # the program read back computes what the compiled one did


def test_the_compile_cache_folder_setting(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/jax")
  assert compile_cache.directory_of(None) == "/somewhere/jax"
  assert compile_cache.directory_of("~/cache") == os.path.expanduser("~/cache")
  assert compile_cache.directory_of("off") is None and compile_cache.directory_of("") is None
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.directory_of(None) == os.path.expanduser("~/.cache/ftjax/xla")


def test_debug_run_end_to_end(uninterrupted):
  workdir, stdout = uninterrupted
  assert "test accuracy" in stdout and "examples/s" in stdout and "ETA" in stdout
  # The launcher keeps its compiled steps in the cache the environment names (the suite's,
  # unless it was turned off).
  cache = compile_cache.directory_of(None)
  assert (cache is None) == (re.search(rf"^compilation cache {re.escape(cache or '')}: \d+ "
                                       r"compiled program", stdout, re.MULTILINE) is None)
  config = json.loads((workdir / "config.json").read_text())
  assert config["total_steps"] == 12 and config["model"]["pretrained"] == "minilm-l6"
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["validation"]["count"] == 128 and final["test"]["count"] == 128
  records = _read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
  assert [r["step"] for r in records if r["split"] == "validation"] == [6, 12]
  best = [r for r in records if r["split"] == "validation" and r["step"] == final["best_step"]]
  assert final["validation"] == {k: v for k, v in best[0].items() if k not in ("step", "split")}
  # It learns: the new head starts at zero (every example's loss is ln 2) and 12 steps at
  # the debug learning rate lower the training loss of the later batches a little, on
  # average by 0.0006 to 0.0019 (seeds 0 to 2); with nothing learned (a learning rate of
  # 1e-12) it stays ln 2. (Validation loss and accuracy barely move in so few steps.)
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
  later = losses[len(losses) // 2:]
  assert sum(later) / len(later) < math.log(2) - 2e-4, losses
  assert {"loss", "accuracy", "grad_norm", "lr"} <= set(records[0])
  assert os.listdir(workdir / "tensorboard")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "8"]  # max_to_keep=2


def test_early_stopping_stops_and_restores_best(debug_config, tmp_path):
  config = debug_config
  config.unlock()
  config.total_steps = 40
  config.eval_every = 4
  config.checkpoint.every = 100
  config.early_stopping.patience = 1
  config.early_stopping.min_delta = 1.0  # nothing beats the first evaluation by 1.0
  config.lock()
  steps = []
  final = trainer.run(config, str(tmp_path), on_step=steps.append, devices=ONE_DEVICE)
  assert final["stopped_early"] and final["best_step"] == 4
  assert steps == list(range(1, 9))  # stopped after the second evaluation
  assert os.listdir(tmp_path / "checkpoints") == ["8"]  # the state at the stop is kept
  validation = [r for r in _read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "validation"]
  assert [r["step"] for r in validation] == [4, 8]
  first = {k: v for k, v in validation[0].items() if k not in ("step", "split")}
  assert final["validation"] == first  # reported from the best evaluation, not recomputed
  # ... and the restored best parameters reproduce it.
  run = trainer._Run(config, str(tmp_path), ONE_DEVICE)  # pylint: disable=protected-access
  try:
    best = run.checkpointer.restore_best(run.built.state.params, run.built.state.stats)
    assert run.evaluate(best, "validation") == pytest.approx(first, rel=1e-6)
  finally:
    run.writer.close()
    run.checkpointer.close()


def test_train_and_eval_steps_compile_once(debug_config, tmp_path, caplog):
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      trainer.run(debug_config, str(tmp_path), devices=ONE_DEVICE)
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  # At most once per bucket length (config.data.buckets), each shape once.
  buckets = len(data_buckets.lengths(debug_config.data.buckets, debug_config.data.max_length))
  for step in ("train_step", "eval_step"):
    shapes = [m for m in compiles if step in m]
    assert 1 <= len(shapes) <= buckets and len(set(shapes)) == len(shapes), compiles

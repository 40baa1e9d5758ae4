"""Bad input, case by case: each ends in an error that says what is wrong and where, and
leaves existing runs (checkpoints, metrics, config) and prepared data as they were.

Cases that target a run use one finished debug run of a small random encoder
(`finished`); the files of its workdir and of the prepared Rotten Tomatoes data are
compared (names, sizes, modification times) before and after each such case. A few cases
go through launch/train.py to check the exit code and the one-line message.
"""

import bz2
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Iterator

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import REPO, with_overrides
from configs import minilm_sentiment
from ftjax import checkpoint, data, models, param_groups, trainer
from ftjax.config import validate
from ftjax.data import images, sources
from ftjax.errors import CheckpointError, ConfigError, DataError, WeightsError
from ftjax.hub import assets
from ftjax.hub import bert as bert_hub
from ftjax.models import bert

RT_HEADER = "category,text,movie_name,has_plot_and_reviews\n"
TWEETS_HEADER = "sentiment,confidence,text\n"
TOKENIZER = os.path.join(assets.model_dir("minilm-l6"), "tokenizer.json")


def _rt_rows(count: int) -> str:
  return "".join(f"{'fresh' if i % 2 else 'rotten'},Review number {i}.,film_{i},False\n"
                 for i in range(count))


def _tweet_rows(count: int) -> str:
  names = ("negative", "neutral", "positive")
  return "".join(f"{names[i % 3]},1.0,Tweet number {i}\n" for i in range(count))


def _write(path: Any, content: str | bytes) -> str:
  """Writes `content` (UTF-8 for text), bz2-compressed when the name ends in .bz2."""
  raw = content.encode() if isinstance(content, str) else content
  with open(path, "wb") as f:
    f.write(bz2.compress(raw) if str(path).endswith(".bz2") else raw)
  return str(path)


def _snapshot(folder: Any) -> dict[str, tuple[int, int]]:
  """{relative path: (size, modification time)} of every file and folder under `folder`."""
  entries = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      entries[os.path.relpath(path, folder)] = (stat.st_size if name in files else 0,
                                                stat.st_mtime_ns)
  return entries


@contextlib.contextmanager
def _left_as_it_was(*folders: Any) -> Iterator[None]:
  """Asserts that nothing under `folders` is added, removed or rewritten by the block."""
  before = [_snapshot(folder) for folder in folders]
  yield
  assert [_snapshot(folder) for folder in folders] == before


@dataclasses.dataclass
class Finished:
  """A finished debug run and the prepared data it read."""

  config: ml_collections.ConfigDict
  workdir: str
  prepared: str  # the prepared Rotten Tomatoes data set


# A small encoder with MiniLM's vocabulary, for the finished run.
_RUN_ARCH = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Finished:
  """The debug config on a small encoder: 12 steps, checkpoints at steps 4, 8 and 12 (the
  last two kept), evaluations at steps 6 and 12."""
  model_dir = tmp_path_factory.mktemp("small_encoder")
  _write_checkpoint(model_dir, _RUN_ARCH)
  shutil.copy(TOKENIZER, model_dir / "tokenizer.json")
  config = minilm_sentiment.get_config("debug")
  config.unlock()
  config.data.data_dir = data_dir
  config.model.pretrained = str(model_dir)
  config.lock()
  workdir = str(tmp_path_factory.mktemp("finished"))
  trainer.run(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "8"]
  return Finished(config, workdir, os.path.join(data_dir, "rotten_tomatoes", "default"))


def _hf_names(num_layers: int) -> list[str]:
  """The tensor names of a BERT encoder checkpoint in Hugging Face's naming."""
  names = [f"embeddings.{name}" for name in ("word_embeddings.weight",
                                             "position_embeddings.weight",
                                             "token_type_embeddings.weight",
                                             "LayerNorm.weight", "LayerNorm.bias")]
  for layer in (f"encoder.layer.{i}" for i in range(num_layers)):
    for part in ("query", "key", "value"):
      names += [f"{layer}.attention.self.{part}.weight", f"{layer}.attention.self.{part}.bias"]
    for prefix in ("attention.output", "intermediate", "output"):
      names += [f"{layer}.{prefix}.dense.weight", f"{layer}.{prefix}.dense.bias"]
    for prefix in ("attention.output", "output"):
      names += [f"{layer}.{prefix}.LayerNorm.weight", f"{layer}.{prefix}.LayerNorm.bias"]
  return names


def _write_checkpoint(folder: Any, arch: dict[str, int], drop: tuple[str, ...] = (),
                      reshape: dict[str, tuple[int, ...]] | None = None,
                      file_name: str = "model.safetensors") -> None:
  """Writes a random BERT encoder of `arch` in Hugging Face's format to `folder`
  (config.json and the tensors in `file_name`), less the tensors in `drop`, with those
  in `reshape` of other shapes."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  (folder / "config.json").write_text(json.dumps({**arch, "model_type": "bert"}))
  _, abstract = nnx.split(nnx.eval_shape(lambda: bert.SequenceClassifier(
      bert.BertConfig(**arch), num_classes=2, rngs=nnx.Rngs(0))))
  shapes = param_groups.flatten(nnx.to_pure_dict(abstract))
  rng = np.random.default_rng(0)
  tensors = {}
  for name in _hf_names(arch["num_hidden_layers"]):
    path, transform = bert_hub.hf_name_to_path(name)
    shape = shapes[path].shape
    value = (np.ones(shape, np.float32) if name.endswith("LayerNorm.weight")
             else rng.normal(0.0, 0.02, shape).astype(np.float32))
    tensors[name] = np.ascontiguousarray(transform(value))
  for name, shape in (reshape or {}).items():
    tensors[name] = np.zeros(shape, np.float32)
  save_file({name: value for name, value in tensors.items() if name not in drop},
            str(folder / file_name))


# --- Config arg strings (`configs/minilm_sentiment.py:...`) -----------------------------

@pytest.mark.parametrize("arg, match", [
    pytest.param("debug,lrr=1e-4", r"unknown config arg 'lrr' in 'debug,lrr=1e-4'; valid keys: "
                 r"batch_size, data, debug", id="unknown_key"),
    pytest.param("=3", r"unknown config arg '' in '=3'", id="empty_key"),
    pytest.param("debug,epochs", r"config arg 'epochs' needs a value \(epochs=\.\.\.\)",
                 id="value_missing"),
    pytest.param("lr=1e-4,lr=2e-4", r"config arg 'lr' given twice", id="key_twice"),
    pytest.param("data=imdb", r"config arg data='imdb': \['imdb'\] not text classification "
                 r"data; choose from \['rotten_tomatoes', 'tweets'\], a file format \['csv', "
                 r"'tsv', 'json', 'parquet', 'hf_disk', 'imagefolder'\] or '<format>:<files>'",
                 id="unknown_data_set"),
    pytest.param("data=rotten_tomatoes+imdb", r"\['imdb'\] not text classification data",
                 id="unknown_task_of_a_mixture"),
    pytest.param("data=tweets+tweets", r"config.data.name='tweets\+tweets': expected data set "
                 r"names joined by '\+', each once", id="task_twice"),
])
def test_config_arg_is_refused(arg, match):
  with pytest.raises(ConfigError, match=match):
    minilm_sentiment.get_config(arg)


@pytest.mark.parametrize("arg, match", [
    pytest.param("epochs=1.5", r"config arg epochs='1.5': expected an integer", id="int_as_float"),
    pytest.param("batch_size=eight", r"config arg batch_size='eight': expected an integer",
                 id="int_as_word"),
    pytest.param("lr=fast", r"config arg lr='fast': expected a number", id="number_as_word"),
    pytest.param("debug=maybe", r"config arg debug='maybe': expected a boolean",
                 id="bool_as_word"),
])
def test_config_arg_of_the_wrong_type(arg, match):
  with pytest.raises(ConfigError, match=match):
    minilm_sentiment.get_config(arg)


# --- Values `validate` rejects --------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    pytest.param({"batch_size": -8}, r"config.batch_size=-8: must be a positive integer",
                 id="negative_batch_size"),
    pytest.param({"eval_batch_size": 0}, r"config.eval_batch_size=0: must be a positive",
                 id="zero_eval_batch_size"),
    pytest.param({"grad_accum_steps": 0}, r"config.grad_accum_steps=0: must be a positive",
                 id="zero_grad_accum_steps"),
    pytest.param({"optimizer.lr": 0.0}, r"config.optimizer.lr=0.0: must be a positive number",
                 id="zero_lr"),
    pytest.param({"optimizer.lr": -1e-4}, r"config.optimizer.lr=-0.0001: must be a positive",
                 id="negative_lr"),
    pytest.param({"compute_dtype": "float16"}, r"config.compute_dtype='float16': must be one "
                 r"of \['float32', 'bfloat16'\]", id="unknown_compute_dtype"),
    pytest.param({"early_stopping.mode": "maximize"}, r"config.early_stopping.mode='maximize': "
                 r"must be one of \['max', 'min'\]", id="unknown_early_stopping_mode"),
    pytest.param({"on_nonfinite": "ignore"}, r"config.on_nonfinite='ignore': must be one of "
                 r"\['stop', 'skip'\]", id="unknown_on_nonfinite"),
    pytest.param({"max_nonfinite_skips": -1}, r"config.max_nonfinite_skips=-1: must be an "
                 r"integer >= 0", id="negative_max_nonfinite_skips"),
    pytest.param({"regularizer.kind": "l3"}, r"config.regularizer.kind='l3': must be one of "
                 r"\['none', 'l2sp', 'ewc'\]", id="unknown_regularizer_kind"),
    pytest.param({"regularizer.kind": "l2sp"}, r"config.regularizer.strength=0.0: must be > 0 "
                 r"for regularizer.kind='l2sp'", id="regularizer_without_strength"),
    pytest.param({"regularizer.kind": "ewc", "regularizer.strength": 1.0},
                 r"regularizer.kind='ewc' needs config.init_from", id="ewc_without_init_from"),
    pytest.param({"data.max_length": 0}, r"config.data.max_length=0: must be a positive",
                 id="zero_max_length"),
    pytest.param({"model.num_classes": -2}, r"config.model.num_classes=-2: must be a "
                 r"positive integer, or 0 to take the data's class count",
                 id="negative_num_classes"),
    pytest.param({"checkpoint.every": 0}, r"config.checkpoint.every=0: must be a positive",
                 id="zero_checkpoint_every"),
    pytest.param({"total_steps": 0, "num_epochs": 0}, r"config.num_epochs=0: must be a "
                 r"positive integer", id="no_steps_at_all"),
    pytest.param({"batch_size": None}, r"config.batch_size=None: must be a positive integer",
                 id="batch_size_none"),
    pytest.param({"optimizer.lr": None}, r"config.optimizer.lr=None: must be a positive number",
                 id="lr_none"),
    pytest.param({"total_steps": None}, r"config.total_steps=None: must be an integer",
                 id="total_steps_none"),
    pytest.param({"regularizer.kind": "l2sp", "regularizer.strength": None},
                 r"config.regularizer.strength=None: must be a number >= 0", id="strength_none"),
])
def test_validate_names_the_bad_value(overrides, match):  # wrong types included
  config = with_overrides(minilm_sentiment.get_config("debug"), **overrides)
  with pytest.raises(ConfigError, match=match):
    validate(config)


@pytest.mark.parametrize("section, key, value, error, match", [
    pytest.param("optimizer", "lrr", 1e-4, AttributeError,
                 r'Key "lrr" does not exist and cannot be added since the config is locked',
                 id="mistyped_key"),
    pytest.param("", "batch_size", "8", TypeError, r"Could not override field 'batch_size'",
                 id="string_for_int"),
    pytest.param("optimizer", "lr", "fast", TypeError, r"Could not override field 'lr'",
                 id="string_for_float"),
])
def test_locked_config_refuses_keys_and_types(section, key, value, error, match):
  config = minilm_sentiment.get_config("debug")
  with pytest.raises(error, match=match):
    setattr(config[section] if section else config, key, value)


# --- Through the launcher: exit code 1 and one line -------------------------------------

@pytest.mark.parametrize("args, expected", [
    pytest.param(["--config.optimizer.lrr=1"], "FATAL Flags parsing error: unknown config key "
                 "in ['--config.data.data_dir', '--config.optimizer.lrr']: 'lrr' Did you mean "
                 "\"lr\" instead of \"lrr\"?",
                 id="unknown_override_key"),
    pytest.param(["--config.batch_size=abc"], "FATAL Flags parsing error: flag "
                 "--config.batch_size=abc: invalid literal for int() with base 10: 'abc'",
                 id="override_of_the_wrong_type"),
    pytest.param(["--config.early_stopping.mode=maximum"], "error: "
                 "config.early_stopping.mode='maximum': must be one of ['max', 'min']",
                 id="bad_enum_value"),
    pytest.param(["--config.data.source_path=/nonexistent/reviews.csv"],
                 "error: /nonexistent/reviews.csv: file not found", id="missing_data_file"),
])
def test_launcher_exits_with_one_line(finished, args, expected):
  command = [sys.executable, os.path.join(REPO, "launch", "train.py"),
             "--config=configs/minilm_sentiment.py:debug",
             f"--config.data.data_dir={finished.config.data.data_dir}",
             f"--workdir={finished.workdir}", *args]
  with _left_as_it_was(finished.workdir, finished.prepared):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
  _assert_one_line(result, expected)


def test_launcher_names_a_missing_config_file(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "train.py"),
       "--config=configs/minilm_sentimnet.py:debug", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  _assert_one_line(result, "FATAL Flags parsing error: --config: Failed loading config file "
                   "config_config Attempted [Relative path]: configs/minilm_sentimnet.py "
                   "[Errno 2] No such file or directory: 'configs/minilm_sentimnet.py'")
  assert not (tmp_path / "run").exists()


def test_launcher_names_a_workdir_that_is_a_file(tmp_path, data_dir):
  workdir = _write(tmp_path / "notes.txt", "not a run\n")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "train.py"),
       "--config=configs/minilm_sentiment.py:debug", f"--config.data.data_dir={data_dir}",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=120,
      check=False)
  _assert_one_line(result, f"error: workdir {workdir}: not a folder")
  assert open(workdir).read() == "not a run\n"


def _assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
  """Exit code 1, no traceback, and the error as the one line of stderr that says it."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert [line for line in lines if line.startswith(("error:", "FATAL"))] == [expected]
  assert lines[-1] == expected


# --- A run started on a finished run's workdir with a bad config ----------------------------

@pytest.mark.parametrize("overrides, error, match", [
    pytest.param({"batch_size": 12}, ConfigError, r"config.batch_size=12 is not divisible by "
                 r"the batch-parallel size \(8 = the product of mesh axes \('data', 'fsdp'\)",
                 id="batch_not_divisible_by_the_mesh"),
    pytest.param({"eval_batch_size": 60}, ConfigError, r"config.eval_batch_size=60 is not "
                 r"divisible by the batch-parallel size \(8", id="eval_batch_not_divisible"),
    pytest.param({"grad_accum_steps": 3}, ConfigError, r"config.batch_size=8 is not divisible "
                 r"by config.grad_accum_steps=3", id="batch_not_divisible_by_accumulation"),
    pytest.param({"mesh.data": 3}, ConfigError, r"config.mesh \(data=3 x fsdp=1 x tensor=1\) "
                 r"has 3 devices, but the run has 8", id="mesh_of_other_size"),
    pytest.param({"optimizer.warmup_steps": 100}, ConfigError, r"config.optimizer.warmup_steps="
                 r"100: more than config.total_steps=12", id="warmup_longer_than_the_run"),
    pytest.param({"optimizer.decay": "exponential"}, ConfigError, r"config.optimizer.decay="
                 r"'exponential': must be one of \['linear', 'cosine', 'constant'\]",
                 id="unknown_decay"),
    pytest.param({"data.name": "imdb"}, ConfigError, r"config.data.name='imdb': unknown data "
                 r"set; known: \['chat', 'fashion_mnist'", id="unknown_data_set"),
    pytest.param({"data.name": "chat"}, ConfigError, r"config.data.name='chat' is chat data, "
                 r"scored by task 'causal_lm', but config.task='classification'",
                 id="chat_data_for_classification"),
    pytest.param({"task": "causal_lm"}, ConfigError, r"config.data.name='rotten_tomatoes' is "
                 r"classification data, scored by task 'classification', but "
                 r"config.task='causal_lm'", id="text_classification_data_for_causal_lm"),
    pytest.param({"data.name": "fashion_mnist"}, ConfigError, r"config.data.name="
                 r"'fashion_mnist' is image data, but config.model.name='bert_classifier' reads "
                 r"text; models for it: \['convnext', 'efficientnet_lite0', 'mobilenet_v2', 'resnet', "
                 r"'vit'\]", id="image_data_for_a_text_config"),
    pytest.param({"task": "regression"}, ConfigError, r"config.task='regression': must be one "
                 r"of \['classification', 'causal_lm', 'preference', 'reward'\]",
                 id="unknown_task"),
    pytest.param({"model.name": "bert"}, ConfigError, r"config.model.name='bert': must be "
                 r"one of \['bert_classifier'", id="unknown_model"),
    pytest.param({"model.pretrained": "minilm-l12"}, ConfigError, r"model 'minilm-l12': not a "
                 r"folder and not a packaged model; packaged models: \['gemma3-270m', 'minilm-l6'",
                 id="unknown_pretrained_model"),
    pytest.param({"peft.method": "lorra"}, ConfigError, r"config.peft.method='lorra': must be "
                 r"one of \['full', 'lora'", id="unknown_peft_method"),
    pytest.param({"early_stopping.metric": "acc"}, ConfigError, r"config.early_stopping.metric="
                 r"'acc': not an evaluation metric; choose from \['accuracy', 'count', 'loss', "
                 r"'macro_f1'\]", id="unknown_early_stopping_metric"),
    pytest.param({"init_from": "/nonexistent/run"}, ConfigError, r"config.init_from="
                 r"'/nonexistent/run': not a folder", id="init_from_missing"),
    pytest.param({"peft.method": "lora"}, CheckpointError, r"checkpoints/12 cannot be restored "
                 r"into this run's state: .*lora.*\(and 1 older checkpoint\(s\) could not be "
                 r"restored either\)", id="checkpoints_of_another_model"),
])
def test_run_refuses_and_leaves_the_run_untouched(finished, overrides, error, match):
  config = with_overrides(finished.config, **overrides)
  with _left_as_it_was(finished.workdir, finished.prepared):
    with pytest.raises(error, match=match):
      trainer.run(config, finished.workdir)


def test_init_from_a_folder_that_is_not_a_run(finished, tmp_path):
  config = with_overrides(finished.config, init_from=str(tmp_path))
  with _left_as_it_was(finished.workdir, finished.prepared):
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json not found: is {tmp_path} a "
                       "training workdir?"):
      trainer.run(config, finished.workdir)


def test_pretrained_folder_without_a_model(finished, tmp_path):
  config = with_overrides(finished.config, **{"model.pretrained": str(tmp_path),
                                              "data.tokenizer": TOKENIZER})
  with _left_as_it_was(finished.workdir, finished.prepared):
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json not found: {tmp_path} is not "
                       "a Hugging Face model folder"):
      trainer.run(config, finished.workdir)


@pytest.mark.parametrize("content, error, match", [
    pytest.param(None, DataError, r"reviews.csv: file not found", id="missing"),
    pytest.param(RT_HEADER + _rt_rows(3), DataError, r"reviews.csv: 3 labelled examples leave "
                 r"the validation split empty; a stratified 80/10/10 split needs about 10",
                 id="too_few_rows_to_split"),
    pytest.param(RT_HEADER + _rt_rows(40), ConfigError, r"train split of 32 examples is "
                 r"smaller than config.batch_size=64", id="train_split_smaller_than_a_batch"),
])
def test_run_on_a_bad_data_file_leaves_the_run_untouched(finished, tmp_path, content, error,
                                                         match):
  path = str(tmp_path / "reviews.csv")
  if content is not None:
    _write(path, content)
  config = with_overrides(finished.config, batch_size=64, **{"data.source_path": path})
  with _left_as_it_was(finished.workdir, finished.prepared):
    with pytest.raises(error, match=match):
      trainer.run(config, finished.workdir)


# --- Workdirs that cannot be written ------------------------------------------------------

def test_workdir_that_is_a_file(finished, tmp_path):
  workdir = _write(tmp_path / "run", "a file\n")
  with pytest.raises(ConfigError, match=f"workdir {workdir}: not a folder"):
    trainer.run(finished.config, workdir)


def test_workdir_under_a_file(finished, tmp_path):
  workdir = os.path.join(_write(tmp_path / "notes.txt", "a file\n"), "run")
  with pytest.raises(ConfigError, match=f"workdir {workdir}: cannot create it: Not a directory"):
    trainer.run(finished.config, workdir)


def _as_a_user_without_write_permission(monkeypatch, folder: str) -> None:
  """Makes `folder` read-only; as root, who may write anyway, the refusals a user would
  meet are simulated."""
  os.chmod(folder, 0o555)
  if os.geteuid() != 0:
    return
  makedirs, access = os.makedirs, os.access

  def refusing_makedirs(path, *args, **kwargs):
    if os.path.dirname(os.path.abspath(path)) == folder:
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return makedirs(path, *args, **kwargs)

  monkeypatch.setattr(os, "makedirs", refusing_makedirs)
  monkeypatch.setattr(os, "access", lambda path, mode: (
      False if os.path.abspath(path) == folder and mode & os.W_OK else access(path, mode)))


def test_workdir_under_a_read_only_folder(finished, tmp_path, monkeypatch):
  folder = str(tmp_path / "read_only")
  os.mkdir(folder)
  _as_a_user_without_write_permission(monkeypatch, folder)
  with pytest.raises(ConfigError, match=f"workdir {folder}/run: cannot create it: Permission "
                     "denied"):
    trainer.run(finished.config, os.path.join(folder, "run"))


def test_read_only_workdir(finished, tmp_path, monkeypatch):
  workdir = str(tmp_path / "read_only")
  shutil.copytree(finished.workdir, workdir)
  with _left_as_it_was(workdir):
    _as_a_user_without_write_permission(monkeypatch, workdir)
    with pytest.raises(ConfigError, match=f"workdir {workdir}: not writable"):
      trainer.run(finished.config, workdir)


# --- A full disk while checkpointing ------------------------------------------------------

async def _disk_full(self, item, directory):
  """orbax's JSON writer on a full disk."""
  del self, item
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))


def _latest_step(workdir: str, config: ml_collections.ConfigDict) -> int | None:
  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def test_disk_full_while_training_keeps_the_checkpoints_before(finished, tmp_path,
                                                                 monkeypatch):
  # The run resumes from step 8 and fails to write the checkpoint of step 12.
  workdir = str(tmp_path / "run")
  shutil.copytree(finished.workdir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  os.remove(os.path.join(workdir, "final_metrics.json"))
  step_8 = os.path.join(workdir, "checkpoints", "8")
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _disk_full)
  with _left_as_it_was(step_8):
    with pytest.raises(CheckpointError, match=rf"cannot write a checkpoint in {workdir}: "
                       r"\[Errno 28\] No space left on device: .*checkpoints/12.*; the "
                       r"checkpoints written before \(steps \[8\]\) are intact"):
      trainer.run(finished.config, workdir)
  monkeypatch.undo()
  assert _latest_step(workdir, finished.config) == 8
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))


def test_disk_full_when_saving_asynchronously(finished, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished.workdir, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _disk_full)
  checkpointer = checkpoint.Checkpointer(workdir, finished.config.checkpoint)
  with _left_as_it_was(os.path.join(checkpoints, "8"), os.path.join(checkpoints, "12")):
    checkpointer.save(16, {"w": np.ones(4, np.float32)}, {"data_iterator": {}})
    with pytest.raises(CheckpointError, match=r"\[Errno 28\] No space left on device: "
                       r".*checkpoints/16.*; the checkpoints written before \(steps \[8, 12\]\) "
                       r"are intact"):
      checkpointer.wait()
  checkpointer.close()
  assert _latest_step(workdir, finished.config) == 12


def test_disk_full_when_saving_the_best_parameters(finished, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished.workdir, workdir)

  def full(self, step, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.directory}/{step}")

  checkpointer = checkpoint.Checkpointer(workdir, finished.config.checkpoint)
  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with _left_as_it_was(workdir):
    with pytest.raises(CheckpointError, match=r"No space left on device: '.*best/16'; the "
                       r"checkpoints written before \(steps \[8, 12\]\) are intact"):
      checkpointer.save_best(16, {"w": np.ones(4, np.float32)})
  checkpointer.close()


# --- Data files: missing, empty, malformed --------------------------------------------------

@pytest.mark.parametrize("name, file_name, content, match", [
    pytest.param("rotten_tomatoes", "reviews.csv", None, r"reviews.csv: file not found",
                 id="rt_missing"),
    pytest.param("rotten_tomatoes", "reviews.csv", "", r"reviews.csv: file is empty",
                 id="rt_empty"),
    pytest.param("rotten_tomatoes", "reviews.csv", "\n \n\t\n", r"reviews.csv: file is empty",
                 id="rt_only_whitespace"),
    pytest.param("rotten_tomatoes", "reviews.csv", RT_HEADER, r"reviews.csv: no labelled rows "
                 r"after the header", id="rt_header_only"),
    pytest.param("rotten_tomatoes", "reviews.csv", RT_HEADER + "plot,A synopsis.,film,True\n",
                 r"reviews.csv: no labelled rows after the header", id="rt_only_plot_rows"),
    pytest.param("rotten_tomatoes", "reviews.csv", "category,review\nfresh,Fine.\n",
                 r"reviews.csv: row 1 \(line 1\): header \['category', 'review'\] lacks columns "
                 r"\['text'\]", id="rt_header_without_text_column"),
    pytest.param("rotten_tomatoes", "reviews.csv", _rt_rows(4), r"reviews.csv: row 1 \(line 1\):"
                 r" header \['rotten', 'Review number 0.', 'film_0', 'False'\] lacks columns",
                 id="rt_no_header_row"),
    pytest.param("rotten_tomatoes", "reviews.csv", RT_HEADER + _rt_rows(2) + "fresh,Short.\n",
                 r"reviews.csv: row 4 \(line 4\): expected 4 columns, found 2",
                 id="rt_row_with_too_few_columns"),
    pytest.param("rotten_tomatoes", "reviews.csv", RT_HEADER + 'fresh,"Stray" quote,film,False\n',
                 r"reviews.csv: row 2 \(line 2\): malformed CSV", id="rt_stray_quote"),
    pytest.param("tweets", "tweets.csv", None, r"tweets.csv: file not found", id="tweets_missing"),
    pytest.param("tweets", "tweets.csv", "", r"tweets.csv: file is empty", id="tweets_empty"),
    pytest.param("tweets", "tweets.csv", TWEETS_HEADER, r"tweets.csv: no labelled tweets after "
                 r"the header", id="tweets_header_only"),
    pytest.param("tweets", "tweets.csv", "label,text\npositive,Fine.\n", r"tweets.csv: row 1 "
                 r"\(line 1\): header \['label', 'text'\] lacks columns \['sentiment'\]",
                 id="tweets_header_without_sentiment_column"),
    pytest.param("tweets", "tweets.csv", TWEETS_HEADER + "positive,Fine.\n", r"tweets.csv: row 2 "
                 r"\(line 2\): expected 3 columns, found 2", id="tweets_row_with_too_few_columns"),
    pytest.param("tweets", "tweets.csv", TWEETS_HEADER + 'positive,1,"never closed\n',
                 r"tweets.csv: row 2 \(line 2\): malformed CSV: unexpected end of data",
                 id="tweets_unclosed_quote"),
])
def test_bad_data_file(finished, tmp_path, name, file_name, content, match):
  path = str(tmp_path / file_name)
  if content is not None:
    _write(path, content)
  with _left_as_it_was(finished.prepared):
    with pytest.raises(DataError, match=match):
      sources.load_splits(name, finished.config.data.data_dir, source_path=path)


def test_corrupt_compressed_data_file(tmp_path):
  path = tmp_path / "reviews.csv.bz2"
  path.write_bytes(b"BZh9 not really bz2")
  with pytest.raises(DataError, match=f"{path}: cannot read file: Invalid data stream"):
    sources.load_splits("rotten_tomatoes", str(tmp_path / "tfds"), source_path=str(path))


def test_data_file_that_is_a_folder(finished, tmp_path):
  with pytest.raises(DataError, match=f"{tmp_path}: a folder, not a file"):
    sources.load_splits("rotten_tomatoes", finished.config.data.data_dir,
                        source_path=str(tmp_path))


@pytest.mark.parametrize("name, content, match", [
    pytest.param("rotten_tomatoes", RT_HEADER + _rt_rows(3), r"3 labelled examples leave the "
                 r"validation split empty", id="rt_three_rows"),
    pytest.param("tweets", TWEETS_HEADER + _tweet_rows(1), r"1 labelled examples leave the "
                 r"validation split empty", id="tweets_one_row"),
])
def test_data_file_too_small_to_split(finished, tmp_path, name, content, match):
  path = _write(tmp_path / "small.csv", content)
  with _left_as_it_was(finished.prepared):
    with pytest.raises(DataError, match=f"{path}: {match}"):
      sources.load_splits(name, finished.config.data.data_dir, source_path=path)


def test_unknown_data_set_name(finished):
  with pytest.raises(ConfigError, match=r"unknown data set 'imdb'; valid names: \['chat', "):
    sources.load_splits("imdb", finished.config.data.data_dir)


# --- Encodings ------------------------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    pytest.param((RT_HEADER + _rt_rows(2)).encode() + b"fresh,Caf\xe9 au lait.,film,False\n",
                 r"reviews.csv: row 4 \(line 4\): bytes that are not valid UTF-8",
                 id="latin1_byte_in_a_review"),
    pytest.param((RT_HEADER + _rt_rows(2)).encode("utf-16"), r"reviews.csv: row 1 \(line 1\): "
                 r"bytes that are not valid UTF-8", id="utf16_file"),
    pytest.param((RT_HEADER + _rt_rows(2)).encode("cp1252") + b"rotten,\x93Dull\x94,film,False\n",
                 r"reviews.csv: row 4 \(line 4\): bytes that are not valid UTF-8",
                 id="windows_1252_quotes"),
])
def test_review_file_that_is_not_utf8(finished, tmp_path, content, match):
  path = _write(tmp_path / "reviews.csv", content)
  with _left_as_it_was(finished.prepared):
    with pytest.raises(DataError, match=match):
      sources.load_splits("rotten_tomatoes", finished.config.data.data_dir, source_path=path)


def test_text_that_is_not_utf8_in_a_batch():
  preprocess = data.text_classification_preprocess(data.load_tokenizer(TOKENIZER, 16))
  with pytest.raises(DataError, match=r"text that is not UTF-8 in the batch of ids \[7 8\]"):
    preprocess({"id": np.array([7, 8]), "label": np.array([0, 1]),
                "text": np.array([b"fine", b"caf\xe9"], dtype=object)})


def test_compressed_review_file_that_is_not_utf8(tmp_path):
  path = _write(tmp_path / "reviews.csv.bz2",
                RT_HEADER.encode() + b"fresh,Na\xefve.,film,False\n")
  with pytest.raises(DataError, match=r"reviews.csv.bz2: row 2 \(line 2\): bytes that are not "
                     r"valid UTF-8"):
    sources.load_splits("rotten_tomatoes", str(tmp_path / "tfds"), source_path=path)


def test_tweets_are_read_as_latin1(tmp_path):
  # The tweets corpus is latin-1: bytes that are not UTF-8 are characters, not an error.
  path = _write(tmp_path / "tweets.csv",
                (TWEETS_HEADER + _tweet_rows(30).replace("Tweet", "Caf\xe9 tweet"))
                .encode("latin-1"))
  splits = sources.load_splits("tweets", str(tmp_path / "tfds"), source_path=path)
  assert sum(len(split) for split in splits.values()) == 30
  assert splits["train"][0]["text"].decode().startswith("Caf\xe9 tweet number")


# --- Labels and texts -----------------------------------------------------------------------

@pytest.mark.parametrize("name, bad_row, match", [
    pytest.param("rotten_tomatoes", "neutral,Not sure.,film,False\n", r"row 4 \(line 4\): "
                 r"unknown category 'neutral'; expected one of \['rotten', 'fresh', 'plot'\]",
                 id="rt_unknown_category"),
    pytest.param("rotten_tomatoes", "1,Fine.,film,False\n", r"row 4 \(line 4\): unknown category "
                 r"'1'", id="rt_numeric_category"),
    pytest.param("rotten_tomatoes", ",Fine.,film,False\n", r"row 4 \(line 4\): unknown category "
                 r"''", id="rt_empty_category"),
    pytest.param("rotten_tomatoes", "fresh,,film,False\n", r"row 4 \(line 4\): empty text",
                 id="rt_empty_text"),
    pytest.param("rotten_tomatoes", "fresh,  \t ,film,False\n", r"row 4 \(line 4\): empty text",
                 id="rt_blank_text"),
    pytest.param("tweets", "mixed,1.0,Hmm.\n", r"row 4 \(line 4\): unknown sentiment 'mixed'; "
                 r"expected one of \['negative', 'neutral', 'positive'\]",
                 id="tweets_unknown_sentiment"),
    pytest.param("tweets", "2,1.0,Great.\n", r"row 4 \(line 4\): unknown sentiment '2'",
                 id="tweets_numeric_label"),
])
def test_bad_label_or_text_names_the_row(finished, tmp_path, name, bad_row, match):
  header, rows = (RT_HEADER, _rt_rows) if name == "rotten_tomatoes" else (TWEETS_HEADER,
                                                                          _tweet_rows)
  path = _write(tmp_path / "data.csv", header + rows(2) + bad_row + rows(2))
  with _left_as_it_was(finished.prepared):
    with pytest.raises(DataError, match=f"{path}: {match}"):
      sources.load_splits(name, finished.config.data.data_dir, source_path=path)


def test_tweets_without_any_text(tmp_path):
  path = _write(tmp_path / "tweets.csv", TWEETS_HEADER + "positive,1.0,\nnegative,1.0,   \n")
  with pytest.raises(DataError, match=f"{path}: no labelled tweets after the header"):
    sources.load_splits("tweets", str(tmp_path / "tfds"), source_path=path)


# --- Over-long texts are truncated -----------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    pytest.param("a very long review " * 5000, 32, id="twenty_thousand_words"),
    pytest.param("\u96fb\u5f71 " * 20_000 + "\U0001f3ac" * 1000, 32, id="cjk_and_emoji"),
    # [CLS], [UNK] for a word longer than the tokenizer's limit, [SEP]
    pytest.param("x" * 100_000, 3, id="one_word_of_100k_characters"),
])
def test_over_long_text_is_truncated(text, tokens):
  tokenizer = data.load_tokenizer(TOKENIZER, 32)
  preprocess = data.text_classification_preprocess(tokenizer)
  batch = preprocess({"id": np.array([1, 2]), "label": np.array([0, 1]),
                      "text": np.array([text.encode(), b"short"], dtype=object)})
  assert batch["input_ids"].shape == (2, 32)
  assert batch["attention_mask"][0].sum() == tokens
  sep = tokenizer.encode([""])["input_ids"][0, 1]
  assert batch["input_ids"][0, tokens - 1] == sep


def test_over_long_reviews_are_prepared_and_truncated(tmp_path):
  rows = "".join(f"{'fresh' if i % 2 else 'rotten'},\"{'word ' * 20_000}{i}\",film,False\n"
                 for i in range(20))
  path = _write(tmp_path / "long.csv", RT_HEADER + rows)
  splits = sources.load_splits("rotten_tomatoes", str(tmp_path / "tfds"), source_path=path)
  preprocess = data.text_classification_preprocess(data.load_tokenizer(TOKENIZER, 16))
  batch = preprocess(data.stack_examples(splits["train"].__getitems__([0, 1])))
  assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].all()


# --- Images ---------------------------------------------------------------------------------

@pytest.mark.parametrize("image, label, match", [
    pytest.param(np.zeros((2, 8, 8, 4), np.uint8), [1, 1], r"example id 40: image of shape "
                 r"\[8, 8, 4\]; expected \[H, W\], \[H, W, 1\] or \[H, W, 3\]",
                 id="four_channels"),
    pytest.param(np.zeros((2, 8, 8, 2), np.uint8), [1, 1], r"example id 40: image of shape "
                 r"\[8, 8, 2\]", id="two_channels"),
    pytest.param(np.zeros((2, 64), np.uint8), [1, 1], r"example id 40: image of shape \[64\]",
                 id="flat_vector"),
    pytest.param(np.zeros((2, 8, 8, 3, 1), np.uint8), [1, 1], r"example id 40: image of shape "
                 r"\[8, 8, 3, 1\]", id="extra_axis"),
    pytest.param(np.zeros((2, 0, 0), np.uint8), [1, 1], r"example id 40: empty image of shape "
                 r"\[0, 0\]", id="empty_image"),
    pytest.param(np.zeros((2, 8, 8), np.float32), [1, 1], r"example id 40: image of dtype "
                 r"float32; expected uint8", id="float_pixels"),
    pytest.param(np.zeros((2, 8, 8), bool), [1, 1], r"example id 40: image of dtype bool",
                 id="bool_pixels"),
    pytest.param(np.zeros((2, 8, 8), np.uint8), [1, 10], r"example id 41: label 10; expected a "
                 r"class in \[0, 10\)", id="label_too_large"),
    pytest.param(np.zeros((2, 8, 8), np.uint8), [-1, 0], r"example id 40: label -1",
                 id="negative_label"),
    pytest.param(np.zeros((2, 8, 8), np.uint8), [1.5, 2.0], r"example id 40: label 1.5 of dtype "
                 r"float64; expected an integer class", id="fractional_label"),
    pytest.param(np.zeros((2, 8, 8), np.uint8), ["shirt", "shoe"], r"example id 40: label "
                 r"'shirt' of dtype <U5; expected an integer class", id="label_name"),
])
def test_bad_image_or_label_names_the_example(image, label, match):
  preprocess = images.image_classification_preprocess(8, 0.5, 0.5, num_classes=10)
  with pytest.raises(DataError, match=match):
    preprocess({"image": image, "label": np.array(label), "id": np.array([40, 41])})


@pytest.mark.parametrize("mean, std, match", [
    pytest.param((0.5, 0.5), 0.5, r"image mean \(0.5, 0.5\): expected one value or one per "
                 r"channel \(3\)", id="mean_of_two_channels"),
    pytest.param(0.5, (0.5, 0.0, 0.5), r"image std \[0.5, 0.0, 0.5\]: must be positive",
                 id="zero_std"),
])
def test_bad_image_normalisation(mean, std, match):
  with pytest.raises(ConfigError, match=match):
    images.image_classification_preprocess(8, mean, std, num_classes=10)


def test_few_shot_with_a_label_out_of_range():
  source = [{"id": 100 + i, "label": i % 3} for i in range(9)]
  with pytest.raises(DataError, match=r"example 2 \(id 102\): label 2; expected a class in "
                     r"\[0, 2\)"):
    images.few_shot(source, 1, seed=0, num_classes=2)


def test_few_shot_with_too_few_examples_of_a_class():
  source = [{"id": i, "label": int(i == 0)} for i in range(9)]
  with pytest.raises(DataError, match=r"class 1 has 1 examples, fewer than the 2 per class"):
    images.few_shot(source, 2, seed=0, num_classes=2)


# --- Pretrained weights ---------------------------------------------------------------------

_SMALL_ARCH = {"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}


def _create(pretrained: str, name: str = "bert_classifier") -> Any:
  return models.create(ml_collections.ConfigDict({
      "name": name, "pretrained": pretrained, "num_classes": 2, "pooling": "mean",
      "head_init": "zeros", "dont_load": ["head/.*"]}), seed=0)


def test_weights_file_missing(tmp_path):
  _write_checkpoint(tmp_path, _SMALL_ARCH)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(WeightsError, match=f"weights file not found: {tmp_path}/model.safetensors"):
    _create(str(tmp_path))


def test_weights_file_corrupt(tmp_path):
  _write_checkpoint(tmp_path, _SMALL_ARCH)
  (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(WeightsError, match=f"cannot read safetensors file {tmp_path}/model"):
    _create(str(tmp_path))


def test_tensor_of_the_wrong_shape(tmp_path):
  name = "encoder.layer.0.attention.self.key.weight"
  _write_checkpoint(tmp_path, _SMALL_ARCH, reshape={name: (8, 4)})
  with pytest.raises(WeightsError, match=rf"{tmp_path}: tensor '{name}' has shape \(8, 4\), "
                     r"parameter 'encoder/layers/0/attention/key/kernel' needs \(8, 8\)"):
    _create(str(tmp_path))


def test_embedding_of_another_vocabulary(tmp_path):
  _write_checkpoint(tmp_path, _SMALL_ARCH, reshape={"embeddings.word_embeddings.weight": (60, 8)})
  with pytest.raises(WeightsError, match=r"tensor 'embeddings.word_embeddings.weight' has shape "
                     r"\(60, 8\), parameter 'encoder/embeddings/word_embeddings/embedding' "
                     r"needs \(50, 8\)"):
    _create(str(tmp_path))


def test_tensor_missing(tmp_path):
  _write_checkpoint(tmp_path, _SMALL_ARCH, drop=("encoder.layer.0.output.LayerNorm.bias",))
  with pytest.raises(WeightsError, match=rf"{tmp_path}: no checkpoint tensor for parameters "
                     r"\['encoder/layers/0/output_norm/bias'\]"):
    _create(str(tmp_path))


@pytest.mark.parametrize("index, match", [
    pytest.param("{not json", r"malformed safetensors index .*model.safetensors.index.json",
                 id="index_not_json"),
    pytest.param('{"metadata": {}}', r"malformed safetensors index .*: 'weight_map'",
                 id="index_without_weight_map"),
    pytest.param(json.dumps({"weight_map": {"embeddings.LayerNorm.bias": "model-2.safetensors"}}),
                 r"weights file not found: .*model-2.safetensors",
                 id="index_names_a_missing_shard"),
    pytest.param(json.dumps({"weight_map": {"pooler.dense.weight": "model-1.safetensors"}}),
                 r"model.safetensors.index.json lists tensors that no shard holds: "
                 r"\['pooler.dense.weight'\]", id="index_names_a_missing_tensor"),
])
def test_bad_sharded_checkpoint_index(tmp_path, index, match):
  _write_checkpoint(tmp_path, _SMALL_ARCH, file_name="model-1.safetensors")
  (tmp_path / "model.safetensors.index.json").write_text(index)
  with pytest.raises(WeightsError, match=match):
    _create(str(tmp_path))


@pytest.mark.parametrize("content, match", [
    pytest.param(None, r"config.json not found: .* is not a Hugging Face model folder",
                 id="empty_folder"),
    pytest.param("{not json", r"config.json: cannot read it as JSON", id="not_json"),
    pytest.param("[384, 12]", r"config.json: expected a JSON object of architecture fields, "
                 r"found a list", id="json_list"),
    pytest.param('{"hidden_size": "384"}', r"config.json: hidden_size='384': expected an integer",
                 id="string_for_int"),
    pytest.param('{"layer_norm_eps": null}', r"config.json: layer_norm_eps=None: expected a "
                 r"number", id="null_for_float"),
    pytest.param('{"hidden_size": 8, "num_attention_heads": 3}', r"config.json: hidden_size 8 "
                 r"is not divisible by num_attention_heads 3", id="heads_not_dividing"),
])
def test_bad_model_config_file(tmp_path, content, match):
  if content is not None:
    (tmp_path / "config.json").write_text(content)
  with pytest.raises(ConfigError, match=match):
    _create(str(tmp_path))


def test_unreadable_image_model_weights(tmp_path):
  path = _write(tmp_path / "mobilenet.pth", b"not a pickle")
  with pytest.raises(WeightsError, match=f"cannot read PyTorch checkpoint {path}"):
    _create(path, name="mobilenet_v2")


def test_unreadable_gguf_weights(tmp_path):
  _write(tmp_path / "model.gguf", b"GGUF and then nothing that makes sense")
  with pytest.raises(WeightsError, match=f"cannot read GGUF file {tmp_path}/model.gguf"):
    _create(str(tmp_path), name="llama_lm")

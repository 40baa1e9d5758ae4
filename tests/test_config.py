"""Config arg parsing, validation, and the launcher's handling of bad keys and values."""

import os
import subprocess
import sys

import pytest

from configs import minilm_sentiment
from ftjax.config import parse_arg, validate
from ftjax.errors import ConfigError

from conftest import REPO


def test_parse_arg_types_and_flags():
  arg = parse_arg("debug,lr=1e-4,epochs=3,name=x", debug=False, lr=5e-5, epochs=1, name="a")
  assert arg.debug is True and arg.lr == 1e-4 and arg.epochs == 3 and arg.name == "x"
  assert isinstance(parse_arg("lr=1", lr=0.5).lr, float)


def test_parse_arg_unknown_key_lists_valid_keys():
  with pytest.raises(ConfigError, match=r"unknown config arg 'lrr'.*valid keys: debug, lr"):
    parse_arg("lrr=1e-4", debug=False, lr=5e-5)


@pytest.mark.parametrize("arg,match", [
    ("epochs=1.5", "expected an integer"),
    ("lr=fast", "expected a number"),
    ("debug=maybe", "expected a boolean"),
    ("epochs", "needs a value"),
    ("lr=1,lr=2", "given twice"),
])
def test_parse_arg_rejects_bad_values(arg, match):
  with pytest.raises(ConfigError, match=match):
    parse_arg(arg, debug=False, lr=5e-5, epochs=1)


def test_config_variants():
  config = minilm_sentiment.get_config("lr=1e-4,max_length=48")
  assert config.optimizer.lr == 1e-4 and config.data.max_length == 48
  debug = minilm_sentiment.get_config("debug")
  assert debug.total_steps > 0 and debug.data.max_eval_examples > 0
  assert minilm_sentiment.__doc__.startswith(
      "python launch/train.py --config=configs/minilm_sentiment.py")


def test_config_is_locked_against_new_keys():
  config = minilm_sentiment.get_config()
  with pytest.raises(AttributeError, match="lr"):
    config.optimizer.lrr = 1.0


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "config.batch_size=0: must be a positive integer"),
    ("compute_dtype", "float16", "compute_dtype='float16': must be one of"),
])
def test_validate_names_the_bad_value(key, value, match):
  config = minilm_sentiment.get_config()
  config.unlock()
  config[key] = value
  with pytest.raises(ConfigError, match=match):
    validate(config)


def _launch(*args, workdir):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--workdir={workdir}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/minilm_sentiment.py:debug", "--config.optimizer.lrr=1"],
     "unknown config key in ['--config.optimizer.lrr']: 'lrr' Did you mean \"lr\""),
    (["--config=configs/minilm_sentiment.py:debug,lrr=1"],
     "unknown config arg 'lrr' in 'debug,lrr=1'; valid keys: batch_size, data, debug, dtype"),
    (["--config=configs/minilm_sentiment.py:debug", "--config.batch_size=abc"],
     "flag --config.batch_size=abc"),
    (["--config=configs/minilm_sentiment.py:debug", "--config.batch_size=0"],
     "error: config.batch_size=0: must be a positive integer"),
])
def test_launcher_rejects_bad_config_before_training(tmp_path, args, message):
  workdir = tmp_path / "run"
  result = _launch(*args, workdir=workdir)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (workdir / "checkpoints").exists()

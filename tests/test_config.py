"""Config arg parsing, validation, and the launcher's handling of bad keys and values."""

import os
import subprocess
import sys

import pytest

from configs import minilm_sentiment, mobilenet_fashion, smollm2_chat, smollm2_shakespeare
from ftjax.config import all_keys, defaults, parse_arg, reference, validate
from ftjax.errors import ConfigError

from conftest import REPO, with_overrides


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
  assert debug.total_steps == 12 and debug.data.max_eval_examples == 128
  assert minilm_sentiment.get_config("epochs=3").num_epochs == 3
  assert minilm_sentiment.get_config("steps=40").total_steps == 40
  with pytest.raises(ConfigError, match="steps=40 and epochs=3: give one"):
    minilm_sentiment.get_config("steps=40,epochs=3")
  assert minilm_sentiment.__doc__.startswith(
      "python launch/train.py --config=configs/minilm_sentiment.py")


SHIPPED = (minilm_sentiment, mobilenet_fashion, smollm2_chat, smollm2_shakespeare)


@pytest.mark.parametrize("module", SHIPPED, ids=lambda m: m.__name__.split(".")[-1])
def test_shipped_configs_share_one_arg_vocabulary_and_validate(module):
  for arg in (None, "debug", "peft=lora,steps=70,seed=3,dtype=bfloat16,batch_size=16"):
    config = module.get_config(arg)
    validate(config)
  assert (config.peft.method, config.total_steps, config.seed, config.compute_dtype,
          config.batch_size) == ("lora", 70, 3, "bfloat16", 16)
  probe = module.get_config("peft=full,freeze=all_but_head,epochs=2")
  assert (probe.freeze, probe.total_steps, probe.num_epochs) == ("all_but_head", 0, 2)


@pytest.mark.parametrize("module", SHIPPED, ids=lambda m: m.__name__.split(".")[-1])
def test_shipped_configs_state_only_what_differs_from_the_defaults(module):
  """Each config changes few keys of `defaults()`; the rest are the declared defaults."""
  config, base = module.get_config(), defaults()
  changed = [path for path in all_keys() if _get(config, path) != _get(base, path)]
  assert 0 < len(changed) < 30, changed


def _get(config, path):
  for part in path.split("."):
    config = config[part]
  return config.to_dict() if hasattr(config, "to_dict") else config


def test_config_is_locked_against_new_keys():
  config = minilm_sentiment.get_config()
  with pytest.raises(AttributeError, match="lr"):
    config.optimizer.lrr = 1.0


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "config.batch_size=0: must be a positive integer"),
    ("compute_dtype", "float16", "compute_dtype='float16': must be one of"),
    ("optimizer.decay", "exponential", "config.optimizer.decay='exponential': must be one of "
     "\\['linear', 'cosine', 'constant'\\]"),
    ("peft.method", "lorra", "config.peft.method='lorra': must be one of"),
    ("model.name", "bert", "config.model.name='bert': must be one of"),
    ("optimizer.lr", -1e-4, "config.optimizer.lr=-0.0001: must be a positive number"),
    ("optimizer.layer_decay", 0.0, "must be in \\(0, 1\\]"),
    ("data.split", (0.5, 0.5), "must be three fractions"),
    ("data.augment.mix_prob", 2.0, "config.data.augment.mix_prob=2.0: must be in \\[0, 1\\]"),
    ("trackers", ("tensorboard",), "needs 'jsonl'"),
    ("freeze", "all_but_head", "config.peft.method and config.freeze choose different"),
    ("regularizer.kind", "ewc", "regularizer.strength=0.0: must be > 0"),
    ("data.name", "fashion_mnist", "'fashion_mnist' is image data, but config.model.name="
     "'bert_classifier' reads text; models for it: \\['convnext', 'efficientnet_lite0', "
     "'mobilenet_v2', 'resnet', 'vit'\\]"),
])
def test_validate_names_the_bad_value(key, value, match):
  overrides = {key: value}
  if key == "freeze":
    overrides["peft.method"] = "lora"
  if key == "data.name":
    overrides["model.num_classes"] = 0
  with pytest.raises(ConfigError, match=match):
    validate(with_overrides(minilm_sentiment.get_config(), **overrides))


def test_validate_refuses_unknown_and_missing_keys():
  config = minilm_sentiment.get_config()
  with pytest.raises(ConfigError, match="config.optimizer.warmup: unknown key; did you mean "
                     "config.optimizer.warmup_steps"):
    misspelled = config.copy_and_resolve_references()
    with misspelled.unlocked():
      misspelled.optimizer.warmup = 3
    validate(misspelled)
  partial = config.copy_and_resolve_references()
  partial.unlock()
  del partial.early_stopping["min_delta"]
  with pytest.raises(ConfigError, match="config.early_stopping.min_delta: missing"):
    validate(partial)


def test_config_reference_is_up_to_date():
  """docs/config_reference.md is `python -m ftjax.config`'s output."""
  with open(os.path.join(REPO, "docs", "config_reference.md")) as f:
    assert f.read() == reference() + "\n", (
        "stale: run `python -m ftjax.config > docs/config_reference.md`")


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

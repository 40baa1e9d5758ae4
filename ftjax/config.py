"""Config helpers: the `arg` string of `get_config(arg)` and config validation."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from ftjax import regularizers, trackers
from ftjax.errors import ConfigError


def _parse_value(text: str, default: Any, key: str) -> Any:
  """Parses `text` into the type of `default`."""
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config arg {key}={text!r}: expected a boolean (true/false)")
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    kind = "an integer" if isinstance(default, int) else "a number"
    raise ConfigError(f"config arg {key}={text!r}: expected {kind}")
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a `get_config` arg string like ``"debug,lr=1e-4"`` against defaults.

  A bare word ``name`` sets the boolean default ``name`` to True. Values are
  converted to the type of their default. Unknown keys are rejected with the
  list of valid ones, so a typo never silently runs the wrong experiment.

  Args:
    arg: the part after ``:`` in ``--config=configs/x.py:arg``; may be None.
    **defaults: every accepted key with its default value.

  Returns:
    A locked ConfigDict holding every default, overridden by `arg`.
  """
  result = dict(defaults)
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      valid = ", ".join(sorted(defaults))
      raise ConfigError(f"unknown config arg {key!r} in {arg!r}; valid keys: {valid}")
    if key in seen:
      raise ConfigError(f"config arg {key!r} given twice in {arg!r}")
    seen.add(key)
    if not has_value:
      if not isinstance(defaults[key], bool):
        raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
      result[key] = True
    else:
      result[key] = _parse_value(text.strip(), defaults[key], key)
  config = ml_collections.ConfigDict(result)
  config.lock()
  return config


def check_choice(value: Any, choices: tuple[Any, ...], key: str) -> None:
  """Raises ConfigError unless `value` is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: must be one of {list(choices)}")


def _check_positive(config: ml_collections.ConfigDict, key: str) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"config.{key}={value!r}: must be a positive integer")


def _is_number(value: Any) -> bool:
  """Whether `value` is an int or a float (a bool is neither here)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a run config's values before anything is built; raises ConfigError.

  Unknown keys never get this far: configs are locked, so a mistyped
  `--config.key=value` override is rejected by the flag parser.
  """
  for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every", "eval_every",
              "checkpoint.every", "checkpoint.max_to_keep"):
    _check_positive(config, key)
  for key in ("max_length", "image_size"):  # text / image data
    if key in config.data:
      _check_positive(config, f"data.{key}")
  if config.task == "classification":
    count = config.model.num_classes
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
      raise ConfigError(f"config.model.num_classes={count!r}: must be a positive integer, "
                        "or 0 to take the data's class count")
  if not isinstance(config.total_steps, int) or isinstance(config.total_steps, bool):
    raise ConfigError(f"config.total_steps={config.total_steps!r}: must be an integer (0: "
                      "config.num_epochs epochs)")
  if config.total_steps <= 0:
    _check_positive(config, "num_epochs")
  check_choice(config.compute_dtype, ("float32", "bfloat16"), "compute_dtype")
  check_choice(config.early_stopping.mode, ("max", "min"), "early_stopping.mode")
  if not _is_number(config.optimizer.lr) or not config.optimizer.lr > 0:
    raise ConfigError(f"config.optimizer.lr={config.optimizer.lr!r}: must be a positive number")
  if "regularizer" in config:
    _check_regularizer(config)
  trackers.check(config)
  if "on_nonfinite" in config:
    check_choice(config.on_nonfinite, ("stop", "skip"), "on_nonfinite")
    if not isinstance(config.max_nonfinite_skips, int) or config.max_nonfinite_skips < 0:
      raise ConfigError(f"config.max_nonfinite_skips={config.max_nonfinite_skips!r}: must be "
                        "an integer >= 0")


def _check_regularizer(config: ml_collections.ConfigDict) -> None:
  """The penalty toward the starting weights (`ftjax.regularizers`)."""
  regularizer = config.regularizer
  check_choice(regularizer.kind, regularizers.KINDS, "regularizer.kind")
  if regularizer.kind != "none" and not (_is_number(regularizer.strength)
                                         and regularizer.strength > 0):
    raise ConfigError(f"config.regularizer.strength={regularizer.strength!r}: must be > 0 "
                      f"for regularizer.kind={regularizer.kind!r}")
  if regularizer.kind == "ewc":
    _check_positive(config, "regularizer.fisher_examples")
    if not config.get("init_from"):
      # A new zero-initialised head passes no gradient to the encoder at the start:
      # the Fisher information would weigh the head alone.
      raise ConfigError("config.regularizer.kind='ewc' needs config.init_from: the Fisher "
                        "information is that of the weights a previous run trained on "
                        "regularizer.fisher_task")

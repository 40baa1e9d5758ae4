"""What architectures read from Hugging Face `config.json` files have in common."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from ftjax.errors import ConfigError

# `hidden_act` values of the encoders (BERT, ViT).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# A field's default -> the JSON values it takes and what to expect (bool before int).
_JSON_TYPES = ((bool, (bool,), "a boolean"), (int, (int,), "an integer"),
               (float, (int, float), "a number"), (str, (str,), "a string"))


def expected_instead(value: Any, default: Any) -> str | None:
  """What a JSON value should be to fit a field whose default is `default`; None when it
  fits (a default of None takes anything)."""
  for kind, accepted, expected in _JSON_TYPES:
    if isinstance(default, kind):
      fits = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
      return None if fits else expected
  return None


def read_json(path: str) -> dict[str, Any]:
  """The fields of a Hugging Face `config.json`.

  Raises:
    ConfigError: naming the file when it is missing or is not a JSON object.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: {os.path.dirname(path)} is not a Hugging Face "
                      "model folder")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read it as JSON: {e}") from e
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a JSON object of architecture fields, found a "
                      f"{type(raw).__name__}")
  return raw


class HfConfig:
  """A mixin for frozen dataclasses of architecture fields named as in Hugging Face's
  `config.json`: `from_json` reads such a file, `from_dict` keeps the fields the
  dataclass declares and runs the subclass's `check`."""

  @classmethod
  def from_json(cls, path: str) -> Any:
    """Reads the fields this architecture uses from a Hugging Face `config.json`.

    Raises:
      ConfigError: naming the file when it is missing, is not a JSON object, or
        gives a field a value of another type than the field's default.
    """
    raw = read_json(path)
    for field in dataclasses.fields(cls):
      expected = (expected_instead(raw[field.name], field.default) if field.name in raw
                  else None)
      if expected:
        raise ConfigError(f"{path}: {field.name}={raw[field.name]!r}: expected {expected}")
    return cls.from_dict(raw, source=path)

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config.model.arch") -> Any:
    """Builds and checks a config from HF-named fields; `source` names it in errors."""
    fields = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in raw.items() if k in fields})
    config.check(source)
    return config

  def check(self, source: str) -> None:
    """Raises ConfigError naming `source` for unsupported values (none by default)."""


def check_encoder(config: Any, source: str) -> None:
  """Raises ConfigError unless an encoder's activation is known and its heads split
  `hidden_size` evenly."""
  if config.hidden_act not in ACTIVATIONS:
    raise ConfigError(f"{source}: hidden_act={config.hidden_act!r} is not supported; "
                      f"supported: {sorted(ACTIVATIONS)}")
  if config.hidden_size % config.num_attention_heads:
    raise ConfigError(f"{source}: hidden_size {config.hidden_size} is not divisible by "
                      f"num_attention_heads {config.num_attention_heads}")

"""What architectures read from Hugging Face `config.json` files have in common."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

from ftjax.errors import ConfigError

# `hidden_act` values of the encoders (BERT, ViT).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class HfConfig:
  """A mixin for frozen dataclasses of architecture fields named as in Hugging Face's
  `config.json`: `from_json` reads such a file, `from_dict` keeps the fields the
  dataclass declares and runs the subclass's `check`."""

  @classmethod
  def from_json(cls, path: str) -> Any:
    """Reads the fields this architecture uses from a Hugging Face `config.json`."""
    with open(path) as f:
      return cls.from_dict(json.load(f), source=path)

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

"""New classification heads: how their kernels start."""

from __future__ import annotations

from typing import Any

from flax import nnx

from ftjax.errors import ConfigError

HEAD_INITS = ("zeros", "normal")


def kernel_init(name: str, stddev: float) -> Any:
  """The initializer of a new head's kernel named by `config.model.head_init`.

  Args:
    name: "zeros" (the head starts at uniform predictions, and a pretrained
      network's features are not disturbed by a random head's first gradients)
      or "normal" (N(0, stddev^2)).
    stddev: the normal initializer's standard deviation.

  Raises:
    ConfigError: for another name.
  """
  if name not in HEAD_INITS:
    raise ConfigError(f"config.model.head_init={name!r}: must be one of {list(HEAD_INITS)}")
  if name == "zeros":
    return nnx.initializers.zeros_init()
  return nnx.initializers.normal(stddev=stddev)

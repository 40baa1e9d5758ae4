"""Batch normalisation with PyTorch's conventions, and which layers update their statistics.

A `BatchNorm` keeps `scale`, `bias` (parameters) and the running `mean`, `var`
(`nnx.BatchStat`). It normalises with the running statistics unless its
`use_batch_stats` flag is set, which `ftjax.models.Model` does, per layer and
only in training, for the layers the run lets update (`Model.updating`). Then it
normalises with the batch's own statistics (over every axis but the channels,
so over all devices of a batch-sharded step) and moves the running ones toward
them: `running = (1 - momentum) * running + momentum * batch`, the variance
unbiased, as `torch.nn.BatchNorm2d` does.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import param_groups
from ftjax.schema import check_choice

# config.model.batch_norm
MODES = ("frozen", "update")


class BatchNorm(nnx.Module):
  """Normalises the last axis (channels) of NHWC or NC inputs."""

  def __init__(self, features: int, *, eps: float = 1e-5, momentum: float = 0.1):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.eps = eps
    self.momentum = momentum
    self.use_batch_stats = False

  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    if self.use_batch_stats:
      x32 = x.astype(jnp.float32)
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      count = x.size // x.shape[-1]
      unbiased = var * (count / max(count - 1, 1))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * unbiased
    else:
      mean, var = self.mean[...], self.var[...]
    inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    shift = self.bias[...].astype(jnp.float32) - mean * inv
    return (x.astype(jnp.float32) * inv + shift).astype(x.dtype)


STAT_NAMES = ("mean", "var")


def split_stats(module: nnx.Module) -> tuple[dict, dict]:
  """(parameters, batch statistics) of a module, as nested dicts."""
  _, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def layer_paths(stats: Any) -> list[str]:
  """The paths of the BatchNorm layers holding `stats` (without '/mean', '/var')."""
  return sorted({path.rsplit("/", 1)[0] for path in param_groups.flatten(stats)})


def updating_layers(mode: str, stats: Any, trainable: Any) -> frozenset[str]:
  """The BatchNorm layers whose statistics a training step updates.

  Args:
    mode: `config.model.batch_norm`: "frozen" keeps every layer's running
      statistics (normalising with them, as in evaluation); "update"
      normalises with batch statistics and updates the running ones, in the
      layers whose scale or bias is trained. A frozen layer never updates.
    stats: the model's batch statistics.
    trainable: the run's trainable parameters.

  Returns:
    The updating layers' paths.
  """
  check_choice(mode, MODES, "model.batch_norm")
  if mode == "frozen":
    return frozenset()
  trained = param_groups.flatten(trainable)
  return frozenset(layer for layer in layer_paths(stats)
                   if any(re.fullmatch(re.escape(layer) + "/(scale|bias)", p) for p in trained))


def set_updating(module: nnx.Module, layers: frozenset[str]) -> None:
  """Sets `use_batch_stats` on exactly the BatchNorm layers at `layers`."""
  for path, node in nnx.iter_graph(module):
    if isinstance(node, BatchNorm):
      node.use_batch_stats = param_groups.path_str(path) in layers

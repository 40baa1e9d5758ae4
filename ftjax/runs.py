"""A finished (or running) training run, read back from its workdir."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftjax import checkpoint, models, param_groups
from ftjax.errors import ConfigError
from ftjax.peft import methods


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_module(workdir: str) -> tuple[ml_collections.ConfigDict, models.Model, nnx.Module]:
  """Rebuilds a run's model with its best parameters (adapters still separate).

  Returns:
    (config, model, module): the module holds the pretrained base, the run's
    adaptation (LoRA etc.) and the best trained parameters.
  """
  config = load_config(workdir)
  model, params = models.create(config.model, config.seed)
  model, params = methods.adapt(config, model, params, config.seed)
  params, stats = model.split_stats(params)
  trainable, frozen = methods.split(config, model, params)
  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint)
  try:
    trainable, stats = checkpointer.restore_best(*jax.tree.map(jnp.asarray, (trainable, stats)))
  finally:
    checkpointer.close()
  return config, model, model.module(param_groups.combine(param_groups.combine(trainable, stats),
                                                          frozen))

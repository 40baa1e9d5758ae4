"""A finished (or running) training run, read back from its workdir."""

from __future__ import annotations

import json
import os
from typing import Any

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


LABELS_FILE = "labels.json"  # a classification run's class names, in label order


def class_names(workdir: str) -> tuple[str, ...]:
  """The class names a classification run wrote to `workdir/labels.json`; () without."""
  path = os.path.join(workdir, LABELS_FILE)
  if not os.path.isfile(path):
    return ()
  with open(path) as f:
    return tuple(json.load(f)["names"])


def best_weights(workdir: str) -> tuple[ml_collections.ConfigDict, models.Model, Any]:
  """A run's model and every variable of it with the best trained values.

  Returns:
    (config, model, tree): the tree holds the pretrained base, the run's
    adaptation (LoRA etc.), the best trained parameters and batch statistics.
  """
  config = load_config(workdir)
  model, _, params = methods.create(config)
  params, stats = model.split_stats(params)
  trainable, frozen = methods.split(config, model, params)
  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint)
  try:
    trainable, stats = checkpointer.restore_best(*jax.tree.map(jnp.asarray, (trainable, stats)))
  finally:
    checkpointer.close()
  return config, model, param_groups.combine(param_groups.combine(trainable, stats), frozen)


def restore_module(workdir: str) -> tuple[ml_collections.ConfigDict, models.Model, nnx.Module]:
  """Rebuilds a run's model with its best parameters (adapters still separate).

  Returns:
    (config, model, module): the module holds the pretrained base, the run's
    adaptation (LoRA etc.) and the best trained parameters.
  """
  config, model, weights = best_weights(workdir)
  return config, model, model.module(weights)


def initial_weights(workdir: str, params: Any) -> Any:
  """`params` (every variable of a model) replaced by the best weights of the run in `workdir`.

  Raises:
    ConfigError: when that run's model has other variables or shapes (another
      architecture, head size or adaptation method), naming them.
  """
  where = f"config.init_from={workdir!r}"
  if not os.path.isdir(workdir):
    raise ConfigError(f"{where}: not a folder")
  _, _, theirs = best_weights(workdir)
  ours, theirs = param_groups.flatten(params), param_groups.flatten(theirs)
  problems = [f"{path}: missing there" for path in ours if path not in theirs]
  problems += [f"{path}: only there" for path in theirs if path not in ours]
  problems += [f"{path}: shape {tuple(theirs[path].shape)} there, {tuple(x.shape)} here"
               for path, x in ours.items() if path in theirs and theirs[path].shape != x.shape]
  if problems:
    raise ConfigError(f"{where}: that run's model does not match this one's "
                      f"({len(problems)} difference(s)): {'; '.join(problems[:5])}")
  return param_groups.map_with_path(
      lambda path, x: jnp.asarray(theirs[path], x.dtype), params)

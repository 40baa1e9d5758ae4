"""What a run trains: full fine-tuning, frozen blocks, linear probe, BitFit, (Q)LoRA, DoRA.

Adapter methods and BitFit also train a model's new task head (a classifier's),
never a pretrained one (a language model's output layer and final norm).

Every method ends as `(regex, True | None)` rules over parameter paths (None =
frozen; first match wins); `split` turns them into the trainable and frozen
halves of the parameters. The trainer differentiates and optimizes only the
trainable half, so frozen parameters get no gradient, no optimizer state and
no update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from flax import nnx

from ftjax import param_groups
from ftjax.config import check_choice
from ftjax.errors import ConfigError
from ftjax.models import Layout, Model
from ftjax.peft import lora

METHODS = ("full", "lora", "dora", "qlora", "bitfit")
ADAPTERS = ("lora", "dora", "qlora")
FREEZE = ("none", "all_but_head")


def adapt(config: ml_collections.ConfigDict, model: Model, params: dict,
          seed: int) -> tuple[Model, dict]:
  """Adds LoRA / DoRA adapters when `config.peft.method` asks for them."""
  check_choice(config.peft.method, METHODS, "peft.method")
  if config.peft.method not in ADAPTERS:
    return model, params
  module = model.module(params)
  lora.inject(module, lora.LoraSpec.from_config(config.peft), nnx.Rngs(params=seed + 1))
  graphdef, state = nnx.split(module)
  return dataclasses.replace(model, graphdef=graphdef), nnx.to_pure_dict(state)


def trainable_rules(config: ml_collections.ConfigDict, layout: Layout,
                    num_blocks: int) -> list[tuple[str, Any]]:
  """The `(regex, True | None)` rules of a run: `config.trainable` first, then the method's."""
  check_choice(config.freeze, FREEZE, "freeze")
  method, freeze, blocks = config.peft.method, config.freeze, config.freeze_blocks
  chosen = [name for name, on in (("peft.method", method != "full"),
                                  ("freeze", freeze != "none"), ("freeze_blocks", blocks > 0))
            if on]
  if len(chosen) > 1:
    raise ConfigError(f"config.{' and config.'.join(chosen)} choose different sets of "
                      "trainable parameters; set only one")
  if not 0 <= blocks <= num_blocks:
    raise ConfigError(f"config.freeze_blocks={blocks}: the model has {num_blocks} blocks")
  rules = [tuple(rule) for rule in config.trainable]
  new_head = [(layout.head, True)] if layout.head_is_new else []
  if method in ADAPTERS:
    rules += [(".*/(" + "|".join(lora.LORA_PARAMS) + ")", True), *new_head, (".*", None)]
  elif method == "bitfit":
    rules += [(".*/bias", True), *new_head, (".*", None)]
  elif freeze == "all_but_head":
    rules += [(layout.head, True), (".*", None)]
  elif blocks:
    rules += [(layout.embeddings, None), (layout.blocks(range(blocks)), None), (".*", True)]
  return rules + [(".*", True)]


def split(config: ml_collections.ConfigDict, model: Model, params: dict) -> tuple[dict, dict]:
  """Returns (trainable, frozen) halves of `params` for this run's method."""
  paths = param_groups.flatten(params)
  for pattern, _ in config.trainable:
    if not param_groups.matching(paths, [pattern]):
      raise ConfigError(f"config.trainable: pattern {pattern!r} matches no parameter")
  rules = trainable_rules(config, model.layout, model.layout.num_blocks(paths))
  mask = param_groups.assign(params, rules, "config.trainable")
  trainable, frozen = param_groups.partition(params, mask)
  if not trainable:
    raise ConfigError(f"no parameter is trainable under the rules {rules}")
  return trainable, frozen

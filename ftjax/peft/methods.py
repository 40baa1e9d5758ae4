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
from typing import Any, Callable

import ml_collections
from flax import nnx

from ftjax import models, param_groups, schema
from ftjax.errors import ConfigError
from ftjax.models import Layout, Model
from ftjax.peft import lora, quant

METHODS = ("full", "lora", "dora", "qlora", "bitfit")
ADAPTERS = ("lora", "dora", "qlora")
FREEZE = ("none", "all_but_head")
# Storage of the frozen parameters: float32, or the compute dtype the step casts them to.
BASE_DTYPES = ("float32", "compute")


def _check(config: ml_collections.ConfigDict) -> None:
  """One way of choosing what trains at a time."""
  chosen = [name for name, on in (("peft.method", config.peft.method != "full"),
                                  ("freeze", config.freeze != "none"),
                                  ("freeze_blocks", config.freeze_blocks > 0)) if on]
  if len(chosen) > 1:
    raise ConfigError(f"config.{' and config.'.join(chosen)} choose different sets of "
                      "trainable parameters; set only one")
  for rule in config.trainable:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and rule[1] in (True, None)):
      raise ConfigError(f"config.trainable: {rule!r} is not a (regex, True | None) rule")


SCHEMA = schema.Section("", "What trains (PEFT methods, freezing) and how adapters are built.", {
    "trainable": schema.Key((), "(regex, True | None) rules tried before the method's own; "
                            "None freezes"),
    "freeze": schema.Key("none", "all_but_head: a linear probe, only the new head trains",
                         choices=FREEZE),
    "freeze_blocks": schema.Key(0, "freeze the embeddings and the bottom k blocks",
                                rule=schema.at_least(0)),
    "peft": {
        "method": schema.Key("full", "full fine-tuning, adapters (QLoRA: on a quantized "
                             "base) or BitFit (biases and the new head)", choices=METHODS),
        "target": schema.Key("", "LoRA / DoRA: regex of the kernels to adapt; empty: the "
                             "model's usual ones (attention queries and values, fused q/k/v, "
                             "1x1 convolutions; see docs/peft.md)"),
        "rank": schema.Key(8, "LoRA / DoRA rank", rule=schema.positive),
        "alpha": schema.Key(16.0, "LoRA scale numerator: alpha / rank", rule=schema.positive),
        "dropout": schema.Key(0.05, "dropout on the adapters' input",
                              rule=lambda v: "" if 0 <= v < 1 else "must be in [0, 1)"),
        "rslora": schema.Key(False, "scale alpha / sqrt(rank) instead of alpha / rank"),
        "quant": schema.Key("nf4", "QLoRA storage of the frozen base: NF4 blocks or int8 per "
                            "output channel", choices=quant.FORMATS),
        "quant_block": schema.Key(64, "NF4 block size (even)", rule=schema.positive),
        "double_quant": schema.Key(False, "NF4: quantize the block scales too"),
        "quantize": schema.Key("encoder/.*/kernel", "QLoRA: regex of further frozen kernels "
                               "stored quantized"),
        "base_dtype": schema.Key("float32", "storage of the frozen parameters: float32, or "
                                 "compute (config.compute_dtype: half the memory in bfloat16 "
                                 "runs, the same numbers since the step casts them to it)",
                                 choices=BASE_DTYPES),
    },
}, check=_check)


def create(config: ml_collections.ConfigDict,
           shardings: Callable[[Model, Any], Any] | None = None) -> tuple[Model, Any, dict]:
  """The model of `config.model` with its pretrained parameters, adapted by `config.peft`.

  Returns:
    (model, base parameters, adapted parameters); `shardings` as in `models.create`.
  """
  model, base = models.create(config.model, config.seed, shardings)
  model, params = adapt(config, model, base, config.seed)
  return model, base, params


def adapt(config: ml_collections.ConfigDict, model: Model, params: dict,
          seed: int) -> tuple[Model, dict]:
  """Adds LoRA / DoRA adapters when `config.peft.method` asks for them."""
  if config.peft.method not in ADAPTERS:
    return model, params
  module = model.module(params)
  spec = lora.LoraSpec.from_config(config.peft)
  if not spec.target:
    spec = dataclasses.replace(spec, target=model.layout.adapted)
  lora.inject(module, spec, nnx.Rngs(params=seed + 1))
  graphdef, state = nnx.split(module)
  return dataclasses.replace(model, graphdef=graphdef), nnx.to_pure_dict(state)


def trainable_rules(config: ml_collections.ConfigDict, layout: Layout,
                    num_blocks: int) -> list[tuple[str, Any]]:
  """The `(regex, True | None)` rules of a run: `config.trainable` first, then the method's."""
  method, freeze, blocks = config.peft.method, config.freeze, config.freeze_blocks
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

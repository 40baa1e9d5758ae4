"""Exports fine-tuned models for Hugging Face: merged safetensors, or a PEFT LoRA adapter.

Tensor names come from the pretrained checkpoint the model was loaded from: each
of its tensors is mapped to an ftjax parameter by the model's name map, and the
export writes that parameter back under the same name (undoing the transform,
which is the identity or a transpose). So a merged export loads into the same
transformers class as the original checkpoint; a new head that the checkpoint's
format has no place for is left out (a RoBERTa, DistilBERT or ELECTRA classifier's
linear head: those families' classification heads have two layers, so their export
is the encoder, as <Family>Model loads it). A model read from a llama.cpp
GGUF file is exported as a Hugging Face checkpoint: the HF names its tensors
were given on reading, a `config.json` from its metadata, and the tokenizer
(with chat template) converted from the GGUF file.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging
from flax import nnx
from safetensors.numpy import save_file

from ftjax import param_groups
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import WeightsError
from ftjax.hub import gguf as gguf_hub
from ftjax.hub import loading, safetensors_io
from ftjax.peft import lora

# Files copied next to an exported model so that tokenizer and config load with it.
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "spm.model")

# {ftjax path: (name, transform)} for parameters the checkpoint lacks; None for one the
# checkpoint's format has no place for, which the export leaves out.
Extra = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]] | None]


def _source_tensors(source_dir: str) -> dict[str, np.ndarray]:
  gguf_path = gguf_hub.find_gguf(source_dir)
  if gguf_path:
    return gguf_hub.read_gguf(gguf_path)[1]
  return safetensors_io.load_safetensors(source_dir)


def _names_by_path(source_dir: str, name_map: loading.NameMap) -> dict[str, tuple[str, Any]]:
  """{ftjax path: (checkpoint name, transform back)} for every mapped source tensor.

  The transform back is `loading.inverse` of the name map's; that it restores the
  source tensor is checked.
  """
  result = {}
  for name, array in _source_tensors(source_dir).items():
    target = name_map(name)
    if target is None:
      continue
    path, transform = target
    back = loading.inverse(transform)
    if not np.array_equal(back(transform(array)), array):
      raise WeightsError(f"the transform of {name!r} has no known inverse; cannot export")
    result[path] = (name, back)
  return result


def _plain_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """Parameters and BatchNorm running statistics (which a checkpoint holds too)."""
  state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
  return {p: np.asarray(v) for p, v in param_groups.flatten(nnx.to_pure_dict(state)).items()}


def _copy_side_files(source_dir: str, out_dir: str) -> None:
  """Copies config and tokenizer files, or writes them for a GGUF source."""
  gguf_path = gguf_hub.find_gguf(source_dir)
  if gguf_path:
    tokenizer = tokenizer_lib.load_hf_tokenizer(source_dir)
    # transformers' generate stops at the config's eos token (for a chat model, end of turn).
    config = dict(gguf_hub.read_config(gguf_path),
                  architectures=[gguf_hub.causal_lm_class(gguf_path)], torch_dtype="float32",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    tokenizer.save_pretrained(out_dir)
    return
  for name in _SIDE_FILES:
    if os.path.isfile(os.path.join(source_dir, name)):
      shutil.copy(os.path.join(source_dir, name), os.path.join(out_dir, name))


def save_merged(module: nnx.Module, out_dir: str, *, source_dir: str,
                name_map: loading.NameMap,
                extra: Extra | Callable[[str], Extra] | None = None,
                class_names: Sequence[str] = ()) -> list[str]:
  """Folds adapters into their kernels and writes `model.safetensors` + side files.

  Args:
    module: the model with its trained parameters (merged in place).
    out_dir: the folder to write.
    source_dir: the pretrained checkpoint folder the model was loaded from.
    name_map: the model's checkpoint name -> (ftjax path, transform) map.
    extra: {ftjax path: (name, transform)} for parameters the checkpoint lacks
      (e.g. a new classification head), None for those left out; or a function of
      `source_dir` giving it (encoder families name their heads differently).
    class_names: a classifier's classes in label order, written into the exported
      `config.json` as transformers' `id2label` / `label2id` (which set `num_labels`).

  Returns:
    The written tensor names.
  """
  flat = _plain_params(lora.merge(module))
  names = _names_by_path(source_dir, name_map)
  extra = extra(source_dir) if callable(extra) else extra or {}
  tensors = {}
  for path, value in flat.items():
    if path not in names and path not in extra:
      raise WeightsError(f"no checkpoint name for parameter {path!r}; cannot export it")
    if path not in names and extra[path] is None:
      logging.warning("%s: left out of the export; the format of %s has no place for it",
                      path, source_dir)
      continue
    name, transform = names[path] if path in names else extra[path]
    tensors[name] = np.ascontiguousarray(transform(value))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  _copy_side_files(source_dir, out_dir)
  if class_names:
    _write_labels(os.path.join(out_dir, "config.json"), class_names)
  return sorted(tensors)


def _write_labels(config_path: str, class_names: Sequence[str]) -> None:
  with open(config_path) as f:
    config = json.load(f)
  config["id2label"] = {str(i): name for i, name in enumerate(class_names)}
  config["label2id"] = {name: i for i, name in enumerate(class_names)}
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2)


def save_peft_adapter(module: nnx.Module, out_dir: str, *, spec: lora.LoraSpec,
                      source_dir: str, name_map: loading.NameMap) -> list[str]:
  """Writes the adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

  `peft.PeftModel.from_pretrained(<transformers model of source_dir>, out_dir)`
  then reproduces the adapted model.

  Returns:
    The written tensor names.
  """
  names = _names_by_path(source_dir, name_map)
  tensors, targets = {}, set()
  for path, node in nnx.iter_graph(module):
    if not isinstance(node, lora.LoraLinear):
      continue
    kernel_path = "/".join(str(p) for p in path) + "/kernel"
    if kernel_path not in names:
      raise WeightsError(f"no checkpoint name for adapted kernel {kernel_path!r}")
    name, back = names[kernel_path]
    module_name = name.removesuffix(".weight")
    targets.add(module_name.rsplit(".", 1)[-1])
    prefix = f"base_model.model.{module_name}"
    # A 1x1 convolution's adapters are 1x1 convolutions in PEFT ([r, in, 1, 1], [out, r, 1,
    # 1]) and its DoRA magnitude [1, out, 1, 1]; a linear layer's are [r, in], [out, r].
    conv = back is loading.any_conv_weight
    as_weight = loading.any_conv_weight if conv else loading.transpose
    tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(as_weight(np.asarray(
        node.lora_a[...])))
    tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(as_weight(np.asarray(
        node.lora_b[...])))
    if spec.dora:
      magnitude = np.asarray(node.lora_magnitude[...])
      tensors[f"{prefix}.lora_magnitude_vector"] = (magnitude.reshape(1, -1, 1, 1) if conv
                                                     else magnitude)
  if not tensors:
    raise WeightsError("the model has no LoRA adapters to export")
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": source_dir,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "use_rslora": spec.rslora, "use_dora": spec.dora, "target_modules": sorted(targets),
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
      "modules_to_save": None, "inference_mode": True,
  }
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return sorted(tensors)

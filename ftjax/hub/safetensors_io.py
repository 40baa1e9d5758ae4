"""Reads Hugging Face safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from ftjax.errors import WeightsError


def _load_one(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise WeightsError(f"weights file not found: {path}")
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise WeightsError(f"cannot read safetensors file {path}: {e}") from None


def load_safetensors(model_dir: str) -> dict[str, np.ndarray]:
  """Loads every tensor of `model.safetensors` or of a sharded checkpoint in `model_dir`.

  Args:
    model_dir: folder holding `model.safetensors` or `model.safetensors.index.json`.

  Returns:
    A flat {tensor name: numpy array} dict.
  """
  index_path = os.path.join(model_dir, "model.safetensors.index.json")
  if not os.path.isfile(index_path):
    return _load_one(os.path.join(model_dir, "model.safetensors"))
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError) as e:
    raise WeightsError(f"malformed safetensors index {index_path}: {e}") from None
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(_load_one(os.path.join(model_dir, shard)))
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise WeightsError(f"{index_path} lists tensors that no shard holds: {missing[:10]}")
  return tensors

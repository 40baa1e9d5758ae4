"""Maps Hugging Face ViT checkpoints onto `ftjax.models.vit` parameters.

Names are those `ViTForImageClassification` (and, without the `vit.` prefix,
`ViTModel`) saves: `vit.embeddings.*`, `vit.encoder.layer.{i}.*`,
`vit.layernorm.*`, `classifier.*`. The patch convolution (out, in, kh, kw)
becomes HWIO, linear weights are transposed. A model built for another image
size than the checkpoint's `config.json` gets the position table resized to its
patch grid on loading (`ftjax.models.vit.interpolate_pos_embedding`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from ftjax.errors import ConfigError, WeightsError
from ftjax.hub import loading, safetensors_io
from ftjax.models import vit


_LAYER = r"encoder\.layer\.(\d+)"
# (HF name regex after any 'vit.' prefix, ftjax path template, transform)
_RULES: list[tuple[str, str, loading.Transform]] = [
    (r"embeddings\.cls_token", "embeddings/cls_token", loading.identity),
    (r"embeddings\.position_embeddings", "embeddings/position", loading.identity),
    (r"embeddings\.patch_embeddings\.projection\.weight", "embeddings/patch/kernel",
     loading.conv_kernel),
    (r"embeddings\.patch_embeddings\.projection\.bias", "embeddings/patch/bias", loading.identity),
    (rf"{_LAYER}\.attention\.attention\.(query|key|value)\.weight",
     r"layers/\1/attention/\2/kernel", loading.transpose),
    (rf"{_LAYER}\.attention\.attention\.(query|key|value)\.bias",
     r"layers/\1/attention/\2/bias", loading.identity),
    (rf"{_LAYER}\.attention\.output\.dense\.weight", r"layers/\1/attention/output/kernel",
     loading.transpose),
    (rf"{_LAYER}\.attention\.output\.dense\.bias", r"layers/\1/attention/output/bias",
     loading.identity),
    (rf"{_LAYER}\.layernorm_before\.weight", r"layers/\1/attention_norm/scale", loading.identity),
    (rf"{_LAYER}\.layernorm_before\.bias", r"layers/\1/attention_norm/bias", loading.identity),
    (rf"{_LAYER}\.intermediate\.dense\.weight", r"layers/\1/mlp/fc1/kernel", loading.transpose),
    (rf"{_LAYER}\.intermediate\.dense\.bias", r"layers/\1/mlp/fc1/bias", loading.identity),
    (rf"{_LAYER}\.output\.dense\.weight", r"layers/\1/mlp/fc2/kernel", loading.transpose),
    (rf"{_LAYER}\.output\.dense\.bias", r"layers/\1/mlp/fc2/bias", loading.identity),
    (rf"{_LAYER}\.layernorm_after\.weight", r"layers/\1/mlp_norm/scale", loading.identity),
    (rf"{_LAYER}\.layernorm_after\.bias", r"layers/\1/mlp_norm/bias", loading.identity),
    (r"layernorm\.weight", "norm/scale", loading.identity),
    (r"layernorm\.bias", "norm/bias", loading.identity),
    (r"classifier\.weight", "head/kernel", loading.transpose),
    (r"classifier\.bias", "head/bias", loading.identity),
]

# The classification head, exported as ViTForImageClassification names it.
EXPORT_EXTRA = {"head/kernel": ("classifier.weight", loading.transpose),
                "head/bias": ("classifier.bias", loading.identity)}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a HF ViT tensor (position table as is)."""
  return loading.rename(name.removeprefix("vit."), _RULES)


def model_config(model_dir: str, image_size: int | None = None) -> vit.ViTConfig:
  """The architecture of the checkpoint in `model_dir`, at `image_size` if given.

  Raises:
    ConfigError: if `config.json` is missing or `image_size` is not a multiple of
      the patch size.
  """
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"ViT checkpoint folder {model_dir} has no config.json")
  config = vit.ViTConfig.from_json(path)
  if image_size is None:
    return config
  if image_size % config.patch_size:
    raise ConfigError(f"config.model.image_size={image_size}: not a multiple of the patch "
                      f"size {config.patch_size} of {path}")
  return dataclasses.replace(config, image_size=image_size)


def load_pretrained_into(params: Any, model_dir: str, config: vit.ViTConfig,
                         dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with a HF ViT safetensors checkpoint from `model_dir` loaded in.

  Args:
    params: the parameters of an `ImageClassifier` built with `config`.
    model_dir: folder holding `config.json` and the safetensors weights.
    config: the model's architecture; where its `image_size` differs from the
      checkpoint's, the position table is interpolated to the model's patch grid.
    dont_load: regexes of parameters that keep their values, e.g. ["head/.*"].

  Returns:
    The updated parameter tree.
  """
  old_grid = model_config(model_dir).grid

  def name_map(name: str) -> tuple[str, loading.Transform] | None:
    target = hf_name_to_path(name)
    if target is None or target[0] != "embeddings/position":
      return target

    def resize(pos: np.ndarray) -> np.ndarray:
      if pos.ndim != 3 or pos.shape[:2] != (1, 1 + old_grid[0] * old_grid[1]):
        raise WeightsError(f"{model_dir}: tensor {name!r} has shape {pos.shape}, which does "
                           f"not fit the {old_grid[0]}x{old_grid[1]} patch grid of its "
                           "config.json plus a class token")
      return vit.interpolate_pos_embedding(pos, old_grid, config.grid)

    return target[0], resize

  tensors = safetensors_io.load_safetensors(model_dir)
  return loading.load_tensors(params, tensors, name_map, source=model_dir,
                              dont_load=dont_load)[0]

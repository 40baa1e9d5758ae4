"""Maps Hugging Face ConvNeXt checkpoints onto `ftjax.models.convnext` parameters.

Names are those `ConvNextForImageClassification` (and, without the `convnext.`
prefix, `ConvNextModel`) saves: `convnext.embeddings.*`,
`convnext.encoder.stages.{s}.downsampling_layer.{0,1}.*` (LayerNorm, convolution),
`convnext.encoder.stages.{s}.layers.{j}.*`, `convnext.layernorm.*`, `classifier.*`.
Convolutions become HWIO kernels (the depthwise one [7, 7, 1, C]), linear weights are
transposed.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ftjax.hub import assets, loading, safetensors_io
from ftjax.models import convnext

_STAGE = r"encoder\.stages\.(\d+)"
_LAYER = rf"{_STAGE}\.layers\.(\d+)"


def _norm(prefix: str, path: str) -> loading.Rules:
  """A LayerNorm at checkpoint-name regex `prefix` -> ftjax `path`."""
  return [(rf"{prefix}\.weight", f"{path}/scale", loading.identity),
          (rf"{prefix}\.bias", f"{path}/bias", loading.identity)]


# (HF name regex after the 'convnext.' prefix, ftjax path template, transform)
_RULES: loading.Rules = [
    (r"embeddings\.patch_embeddings\.weight", "stem/patch/kernel", loading.conv_kernel),
    (r"embeddings\.patch_embeddings\.bias", "stem/patch/bias", loading.identity),
    *_norm(r"embeddings\.layernorm", "stem/norm"),
    *_norm(rf"{_STAGE}\.downsampling_layer\.0", r"stages/\1/downsample_norm"),
    (rf"{_STAGE}\.downsampling_layer\.1\.weight", r"stages/\1/downsample/kernel",
     loading.conv_kernel),
    (rf"{_STAGE}\.downsampling_layer\.1\.bias", r"stages/\1/downsample/bias", loading.identity),
    (rf"{_LAYER}\.dwconv\.weight", r"stages/\1/layers/\2/dwconv/kernel", loading.conv_kernel),
    (rf"{_LAYER}\.dwconv\.bias", r"stages/\1/layers/\2/dwconv/bias", loading.identity),
    *_norm(rf"{_LAYER}\.layernorm", r"stages/\1/layers/\2/norm"),
    (rf"{_LAYER}\.(pwconv1|pwconv2)\.weight", r"stages/\1/layers/\2/\3/kernel",
     loading.transpose),
    (rf"{_LAYER}\.(pwconv1|pwconv2)\.bias", r"stages/\1/layers/\2/\3/bias", loading.identity),
    (rf"{_LAYER}\.layer_scale_parameter", r"stages/\1/layers/\2/layer_scale", loading.identity),
    *_norm(r"layernorm", "norm"),
    (r"classifier\.weight", "head/kernel", loading.transpose),
    (r"classifier\.bias", "head/bias", loading.identity),
]

# The classification head, exported as ConvNextForImageClassification names it.
EXPORT_EXTRA = {"head/kernel": ("classifier.weight", loading.transpose),
                "head/bias": ("classifier.bias", loading.identity)}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a tensor of a HF ConvNeXt checkpoint."""
  return loading.rename(name.removeprefix("convnext."), _RULES)


def model_config(pretrained: str, arch: dict[str, Any]) -> convnext.ConvNextConfig:
  """The architecture of the Hugging Face folder `pretrained` (its `config.json`), or
  without one of the config fields `arch`.

  Raises:
    ConfigError: naming the file or `config.model.arch` and the field, for options the
      model does not reproduce.
  """
  if pretrained:
    return convnext.ConvNextConfig.from_json(
        os.path.join(assets.model_dir(pretrained), "config.json"))
  return convnext.ConvNextConfig.from_dict(arch)


def load_pretrained_into(params: Any, pretrained: str, dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with the safetensors checkpoint of the folder `pretrained` loaded in.

  Raises:
    WeightsError: for a tensor of the wrong shape, a parameter without a tensor (not
      in `dont_load`), or a tensor without a parameter.
  """
  directory = assets.model_dir(pretrained)
  return loading.load_every_tensor(params, safetensors_io.load_safetensors(directory),
                                   hf_name_to_path, source=directory, dont_load=dont_load)

"""Maps ResNet checkpoints onto `ftjax.models.resnet` parameters: Hugging Face folders
and torchvision state dicts.

* A Hugging Face folder (`ResNetForImageClassification.save_pretrained`):
  `config.json` gives the architecture, `model.safetensors` the tensors
  (`resnet.embedder.*`, `resnet.encoder.stages.{s}.layers.{j}.*`, `classifier.1.*`).
* A torchvision state dict (`torch.save(torchvision.models.resnet50().state_dict(),
  path)`, read with `ftjax.hub.torch_pickle`, no torch needed): `conv1`, `bn1`,
  `layer{1-4}.{j}.{conv,bn}{1-3}`, `layer{1-4}.{j}.downsample.{0,1}`, `fc`. The file
  holds no architecture: it is `config.model.arch` (Hugging Face's ResNet fields,
  ResNet-50's for those not given; `resnet18` is `layer_type=basic, depths=[2, 2, 2,
  2], hidden_sizes=[64, 128, 256, 512]`). torchvision's ResNets stride in the 3x3
  convolution and not in the first stage, so the two `downsample_in_*` fields must be
  false. A file of another architecture is refused: a tensor of another shape, a
  parameter without a tensor, or a tensor without a parameter (a deeper network).

Convolutions become HWIO kernels, 1x1 ones [in, out] (`loading.any_conv_kernel`);
BatchNorm's running statistics load as the model's batch statistics
(`num_batches_tracked` is not used). The checkpoints' ImageNet head maps onto
`head/{kernel,bias}`; list `head/.*` in `dont_load` to train a new one.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ftjax.errors import ConfigError
from ftjax.hub import assets, loading, safetensors_io, torch_pickle
from ftjax.models import resnet


def _conv_bn(conv: str, bn: str, kernel: str, norm: str,
             transform: loading.Transform = loading.any_conv_kernel) -> loading.Rules:
  """Rules for a convolution (checkpoint-name regex `conv`, ftjax `kernel` layer) and the
  BatchNorm after it (`bn` -> `norm`)."""
  return [(rf"{conv}\.weight", f"{kernel}/kernel", transform),
          *loading.batch_norm_rules(bn, norm)]


_HF_BLOCK = r"encoder\.stages\.(\d+)\.layers\.(\d+)"
_BLOCK = r"stages/\1/layers/\2"
# (HF name regex after the 'resnet.' prefix, ftjax path template, transform)
_HF_RULES: loading.Rules = [
    *_conv_bn(r"embedder\.embedder\.convolution", r"embedder\.embedder\.normalization",
              "stem/conv", "stem/bn", loading.conv_kernel),
    *[rule for k in range(3) for rule in _conv_bn(
        rf"{_HF_BLOCK}\.layer\.{k}\.convolution", rf"{_HF_BLOCK}\.layer\.{k}\.normalization",
        rf"{_BLOCK}/conv{k + 1}", rf"{_BLOCK}/conv{k + 1}_bn")],
    *_conv_bn(rf"{_HF_BLOCK}\.shortcut\.convolution", rf"{_HF_BLOCK}\.shortcut\.normalization",
              rf"{_BLOCK}/shortcut", rf"{_BLOCK}/shortcut_bn"),
    (r"classifier\.1\.weight", "head/kernel", loading.transpose),
    (r"classifier\.1\.bias", "head/bias", loading.identity),
]

# torchvision's ResNet has four stages, `layer1` .. `layer4`.
_TORCHVISION_RULES: loading.Rules = [
    *_conv_bn(r"conv1", r"bn1", "stem/conv", "stem/bn", loading.conv_kernel),
    *[rule for s in range(4) for k in (1, 2, 3) for rule in _conv_bn(
        rf"layer{s + 1}\.(\d+)\.conv{k}", rf"layer{s + 1}\.(\d+)\.bn{k}",
        rf"stages/{s}/layers/\1/conv{k}", rf"stages/{s}/layers/\1/conv{k}_bn")],
    *[rule for s in range(4) for rule in _conv_bn(
        rf"layer{s + 1}\.(\d+)\.downsample\.0", rf"layer{s + 1}\.(\d+)\.downsample\.1",
        rf"stages/{s}/layers/\1/shortcut", rf"stages/{s}/layers/\1/shortcut_bn")],
    (r"fc\.weight", "head/kernel", loading.transpose),
    (r"fc\.bias", "head/bias", loading.identity),
]

# The classification head, exported as ResNetForImageClassification names it.
EXPORT_EXTRA = {"head/kernel": ("classifier.1.weight", loading.transpose),
                "head/bias": ("classifier.1.bias", loading.identity)}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a tensor of a HF ResNet checkpoint."""
  return loading.rename(name.removeprefix("resnet."), _HF_RULES)


def torchvision_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a tensor of a torchvision state dict."""
  return loading.rename(name, _TORCHVISION_RULES)


def is_state_dict(pretrained: str) -> bool:
  """Whether `config.model.pretrained` names a file (a torchvision state dict), not a
  Hugging Face folder or packaged model."""
  return bool(pretrained) and os.path.isfile(pretrained)


def model_config(pretrained: str, arch: dict[str, Any]) -> resnet.ResNetConfig:
  """The architecture of a model built from `config.model.pretrained` and `.arch`.

  Args:
    pretrained: a Hugging Face folder (its `config.json`), a torchvision state dict
      (architecture `arch`) or "" (random weights of `arch`).
    arch: Hugging Face ResNet config fields.

  Raises:
    ConfigError: naming the file or `config.model.arch` and the field, for options the
      model does not reproduce (or torchvision's ResNets do not have).
  """
  if pretrained and not is_state_dict(pretrained):
    return resnet.ResNetConfig.from_json(
        os.path.join(assets.model_dir(pretrained), "config.json"))
  config = resnet.ResNetConfig.from_dict(arch)
  if pretrained:
    for field in ("downsample_in_first_stage", "downsample_in_bottleneck"):
      if getattr(config, field):
        raise ConfigError(f"config.model.arch: {field}=True, but torchvision's ResNets (the "
                          f"layout of {pretrained}) have it false")
  return config


def load_pretrained_into(params: Any, pretrained: str, dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with the checkpoint `pretrained` (a Hugging Face folder or a
  torchvision state dict, see `model_config`) loaded in.

  Args:
    params: an `ImageClassifier`'s parameters and batch statistics (nested dict).
    pretrained: `config.model.pretrained`.
    dont_load: regexes of parameters that keep their values, e.g. ["head/.*"].

  Raises:
    WeightsError: for a tensor of the wrong shape, a parameter without a tensor (not
      in `dont_load`), or a tensor without a parameter: a checkpoint of another
      architecture.
  """
  if is_state_dict(pretrained):
    tensors, name_map, source = (torch_pickle.load(pretrained), torchvision_name_to_path,
                                 pretrained)
  else:
    source = assets.model_dir(pretrained)
    tensors, name_map = safetensors_io.load_safetensors(source), hf_name_to_path
  return loading.load_every_tensor(params, tensors, name_map, source=source,
                                   dont_load=dont_load)

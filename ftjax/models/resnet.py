"""ResNet image classifier in Flax NNX: Hugging Face's `ResNetForImageClassification`.

A 7x7 stride-2 convolution with BatchNorm and ReLU and a 3x3 stride-2 max-pool (the
stem), then stages of residual blocks, global average pooling and a linear head.
A block is "basic" (two 3x3 convolutions, ResNet-18/34) or "bottleneck" (1x1
reduction to a quarter of the width, 3x3, 1x1 expansion; ResNet-50 and deeper);
its input is added back, through a strided 1x1 convolution with BatchNorm (the
shortcut) where the shape changes. The first block of every stage but the first
strides by 2 (the first too with `downsample_in_first_stage`), in the 3x3
convolution (ResNet v1.5, torchvision's) or with `downsample_in_bottleneck` in the
first 1x1 one.

Torchvision's `resnet18` .. `resnet152` are the same networks:
`ftjax.hub.resnet` reads both checkpoint layouts. Images are NHWC; 1x1
convolutions are `nnx.Linear` layers over the channels (the input subsampled
first when they stride), so LoRA can adapt them; BatchNorm is
`ftjax.models.batch_norm.BatchNorm`. Parameter paths: `stem/{conv,bn}`,
`stages/{s}/layers/{j}/{conv1,conv1_bn,conv2,conv2_bn[,conv3,conv3_bn][,shortcut,
shortcut_bn]}`, `head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import sharding
from ftjax.errors import ConfigError
from ftjax.models import heads, hf_config
from ftjax.models.batch_norm import BatchNorm

# Feature maps between stages: split along the batch, whole along height, width, channels.
_ACTIVATION_AXES = ("batch", None, None, None)

LAYER_TYPES = ("basic", "bottleneck")
ACTIVATIONS = ("relu",)
_REDUCTION = 4  # a bottleneck's inner width: its output width over this


@dataclasses.dataclass(frozen=True)
class ResNetConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named as in Hugging Face's `config.json` (defaults:
  ResNet-50)."""

  num_channels: int = 3
  embedding_size: int = 64
  hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
  depths: tuple[int, ...] = (3, 4, 6, 3)
  layer_type: str = "bottleneck"
  hidden_act: str = "relu"
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False

  def check(self, source: str) -> None:
    if self.layer_type not in LAYER_TYPES:
      raise ConfigError(f"{source}: layer_type={self.layer_type!r} is not supported; "
                        f"supported: {list(LAYER_TYPES)}")
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"{source}: hidden_act={self.hidden_act!r} is not supported; "
                        f"supported: {list(ACTIVATIONS)}")
    check_stages(self, source)

  def blocks(self) -> list[tuple[int, int, int, int, int]]:
    """(stage, index in the stage, in channels, out channels, stride) of every block."""
    blocks, channels = [], self.embedding_size
    for s, (width, depth) in enumerate(zip(self.hidden_sizes, self.depths)):
      first_stride = 2 if s > 0 or self.downsample_in_first_stage else 1
      for j in range(depth):
        blocks.append((s, j, channels, width, first_stride if j == 0 else 1))
        channels = width
    return blocks


def adapted_kernels(config: ResNetConfig) -> str:
  """The 1x1 convolutions (linear layers) LoRA adapts by default: a bottleneck's conv1,
  conv3 and shortcut; a basic block's shortcut (its 3x3 convolutions are not linear)."""
  linear = "shortcut" if config.layer_type == "basic" else "conv1|conv3|shortcut"
  return rf"stages/\d+/layers/\d+/({linear})/kernel"


def param_axes(config: ResNetConfig) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
  """Logical axes of every parameter and batch statistic (see `ftjax.sharding`).

  Convolutions are small: they stay replicated. Which of a block's convolutions are
  3x3 (HWIO kernels) and which 1x1 (linear [in, out]) depends on its type.
  """
  spatial = "conv1|conv2" if config.layer_type == "basic" else "conv2"
  return (
      (r"stem/conv/kernel", (None, None, None, None)),
      (rf"stages/\d+/layers/\d+/({spatial})/kernel", (None, None, None, None)),
      (r"stages/\d+/layers/\d+/(conv\d|shortcut)/kernel", (None, None)),
      (r".*bn/(scale|bias|mean|var)", ("norm",)),
      (r"head/kernel", ("embed", "classes")),
      (r"head/bias", ("classes",)),
  )


def check_stages(config: Any, source: str) -> None:
  """Raises ConfigError unless `hidden_sizes` and `depths` are as many positive integers."""
  for field in ("hidden_sizes", "depths"):
    values = getattr(config, field)
    if (not isinstance(values, (list, tuple)) or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
      raise ConfigError(f"{source}: {field}={values!r}: expected a list of positive integers")
  if len(config.hidden_sizes) != len(config.depths):
    raise ConfigError(f"{source}: hidden_sizes {list(config.hidden_sizes)} and depths "
                      f"{list(config.depths)} must have one entry per stage")


# As torchvision and transformers initialise convolutions: He normal over the fan-out.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(din: int, dout: int, kernel_size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  """A k x k convolution without bias, padded by k // 2 on every side (PyTorch's)."""
  pad = kernel_size // 2
  return nnx.Conv(din, dout, (kernel_size, kernel_size), strides=stride,
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                  rngs=rngs)


def _pointwise(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """A 1x1 convolution without bias, as a linear layer over the channel axis."""
  return nnx.Linear(din, dout, use_bias=False, kernel_init=_conv_init, rngs=rngs)


def _subsample(x: jax.Array, stride: int) -> jax.Array:
  """What a strided 1x1 convolution (no padding) reads: every stride-th row and column."""
  return x[:, ::stride, ::stride] if stride > 1 else x


class Block(nnx.Module):
  """A basic or bottleneck residual block, with a projection shortcut where needed.

  A strided 1x1 convolution is its `nnx.Linear` applied to the subsampled input, the
  subsampling done here so that LoRA, which replaces the linear layer, keeps it.
  """

  def __init__(self, config: ResNetConfig, din: int, dout: int, stride: int,
               rngs: nnx.Rngs):
    self.stride = stride
    self.reduce_first = False  # a bottleneck whose first 1x1 convolution strides
    if config.layer_type == "basic":
      self.conv1 = _conv(din, dout, 3, stride, rngs)
      self.conv2 = _conv(dout, dout, 3, 1, rngs)
      self.conv3 = None
      widths = (dout, dout)
    else:
      inner = dout // _REDUCTION
      self.reduce_first = config.downsample_in_bottleneck
      self.conv1 = _pointwise(din, inner, rngs)
      self.conv2 = _conv(inner, inner, 3, 1 if self.reduce_first else stride, rngs)
      self.conv3 = _pointwise(inner, dout, rngs)
      widths = (inner, inner, dout)
    self.conv1_bn = BatchNorm(widths[0])
    self.conv2_bn = BatchNorm(widths[1])
    self.conv3_bn = BatchNorm(widths[2]) if self.conv3 is not None else None
    if din != dout or stride != 1:
      self.shortcut = _pointwise(din, dout, rngs)
      self.shortcut_bn = BatchNorm(dout)
    else:
      self.shortcut = self.shortcut_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = _subsample(x, self.stride) if self.reduce_first else x
    h = jax.nn.relu(self.conv1_bn(self.conv1(h)))
    h = self.conv2_bn(self.conv2(h))
    if self.conv3 is not None:
      h = self.conv3_bn(self.conv3(jax.nn.relu(h)))
    residual = (x if self.shortcut is None else
                self.shortcut_bn(self.shortcut(_subsample(x, self.stride))))
    return jax.nn.relu(h + residual)


class Stage(nnx.Module):
  """A stage's blocks (`layers`)."""

  def __init__(self, layers: list[Block]):
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class Stem(nnx.Module):
  """7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool (padded by 1)."""

  def __init__(self, config: ResNetConfig, rngs: nnx.Rngs):
    self.conv = _conv(config.num_channels, config.embedding_size, 7, 2, rngs)
    self.bn = BatchNorm(config.embedding_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn(self.conv(x)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ImageClassifier(nnx.Module):
  """A ResNet with global average pooling and a linear head."""

  def __init__(self, config: ResNetConfig, num_classes: int, *, head_init: str = "zeros",
               rngs: nnx.Rngs):
    """Builds the network.

    Args:
      config: the architecture.
      num_classes: the head's width.
      head_init: "zeros" (a new head that starts at uniform predictions) or
        "normal" (N(0, 0.01)).
      rngs: initialisation randomness (`params`).

    Raises:
      ConfigError: for an unknown `head_init`.
    """
    self.stem = Stem(config, rngs)
    stages = [[] for _ in config.depths]
    for s, _, din, dout, stride in config.blocks():
      stages[s].append(Block(config, din, dout, stride, rngs))
    self.stages = nnx.List([Stage(layers) for layers in stages])
    self.head = nnx.Linear(config.hidden_sizes[-1], num_classes,
                           kernel_init=heads.kernel_init(head_init, 0.01), rngs=rngs)

  def features(self, batch: dict[str, Any]) -> jax.Array:
    """Pooled features [B, hidden_sizes[-1]] of `batch["image"]` [B, H, W, C] (normalised)."""
    x = sharding.constrain(self.stem(batch["image"]), _ACTIVATION_AXES)
    for stage in self.stages:
      x = sharding.constrain(stage(x), _ACTIVATION_AXES)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] of `batch["image"]` (no dropout: the flags are unused)."""
    del deterministic, rngs
    return self.head(self.features(batch)).astype(jnp.float32)

"""MobileNetV2 and EfficientNet-lite0 image classifiers in Flax NNX.

Both are stacks of inverted-residual blocks (1x1 expansion, depthwise kxk
convolution, 1x1 linear projection, a residual connection where the shape
allows one), between a strided 3x3 stem and a 1x1 convolution to 1280 channels,
followed by global average pooling, dropout and a linear head. They differ only
in what `ConvNetConfig` records: the block table, the padding (torchvision's
symmetric `(k - 1) // 2` or TensorFlow's 'SAME', which puts the odd extra row
and column at the bottom and right) and the BatchNorm constants.

Images are NHWC. Every 1x1 convolution is an `nnx.Linear` over the channel axis
(kernel [in, out]), so LoRA (`ftjax.peft.lora`), which adapts linear layers,
can target them; the stem and depthwise convolutions are `nnx.Conv` (HWIO).
BatchNorm is `ftjax.models.batch_norm.BatchNorm`, with PyTorch's conventions,
so the torchvision and EfficientNet-PyTorch checkpoints load as they are
(`ftjax.hub.vision`). Parameter paths: `stem/{conv,bn}`, `blocks/{i}/{expand,
expand_bn,depthwise,depthwise_bn,project,project_bn}`, `top`, `top_bn`, `head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import sharding
from ftjax.errors import ConfigError
from ftjax.models import dropout as dropout_lib
from ftjax.models import heads, target
from ftjax.models.batch_norm import BatchNorm

# Logical axes of every parameter and batch statistic (see `ftjax.sharding`).
# Convolutions are small: they stay replicated.
PARAM_AXES = (
    (r"stem/conv/kernel", (None, None, None, None)),
    (r"blocks/\d+/depthwise/kernel", (None, None, None, None)),
    (r"blocks/\d+/(expand|project)/kernel", (None, None)),
    (r"top/kernel", (None, None)),
    (r".*bn/(scale|bias|mean|var)", ("norm",)),
    (r"head/kernel", ("embed", "classes")),
    (r"head/bias", ("classes",)),
)

# Feature maps between blocks: split along the batch, whole along height, width, channels.
_ACTIVATION_AXES = ("batch", None, None, None)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PADDING_MODES = ("symmetric", "same")


@dataclasses.dataclass(frozen=True)
class Stage:
  """`repeats` inverted-residual blocks; the first one strides and changes the width."""

  expand_ratio: int
  channels: int
  repeats: int
  stride: int
  kernel_size: int = 3


@dataclasses.dataclass(frozen=True)
class Block:
  """One inverted-residual block's shape."""

  in_channels: int
  out_channels: int
  expand_ratio: int
  stride: int
  kernel_size: int

  @property
  def hidden_channels(self) -> int:
    return self.in_channels * self.expand_ratio

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
  """An inverted-residual network's architecture and its expected input.

  `bn_momentum` follows PyTorch: running = (1 - momentum) * running + momentum * batch.
  Inputs are RGB in [0, 1], normalised with `mean` and `std` per channel; the
  network was trained at `image_size` but accepts any height and width.
  """

  stages: tuple[Stage, ...]
  stem_channels: int = 32
  top_channels: int = 1280
  padding: str = "symmetric"
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1
  dropout: float = 0.2
  image_size: int = 224
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.padding not in PADDING_MODES:
      raise ConfigError(f"ConvNetConfig.padding={self.padding!r}: must be one of "
                        f"{list(PADDING_MODES)}")

  def blocks(self) -> list[Block]:
    """Every block in order; block i holds the parameters `blocks/{i}/...`."""
    blocks, channels = [], self.stem_channels
    for stage in self.stages:
      for r in range(stage.repeats):
        blocks.append(Block(channels, stage.channels, stage.expand_ratio,
                            stage.stride if r == 0 else 1, stage.kernel_size))
        channels = stage.channels
    return blocks

  def conv_padding(self, kernel_size: int) -> str | tuple[tuple[int, int], ...]:
    """The `nnx.Conv` padding of a kernel_size x kernel_size convolution."""
    if self.padding == "same":
      return "SAME"
    pad = (kernel_size - 1) // 2
    return ((pad, pad), (pad, pad))


ARCHS = {
    # torchvision's mobilenet_v2(width_mult=1.0): (t, c, n, s) rows of the paper.
    "mobilenet_v2": ConvNetConfig(
        stages=(Stage(1, 16, 1, 1), Stage(6, 24, 2, 2), Stage(6, 32, 3, 2),
                Stage(6, 64, 4, 2), Stage(6, 96, 3, 1), Stage(6, 160, 3, 2),
                Stage(6, 320, 1, 1))),
    # EfficientNet-lite0: ReLU6, no squeeze-excite, TensorFlow padding and BatchNorm
    # constants (TF momentum 0.99 is PyTorch's 0.01).
    "efficientnet_lite0": ConvNetConfig(
        stages=(Stage(1, 16, 1, 1, 3), Stage(6, 24, 2, 2, 3), Stage(6, 40, 2, 2, 5),
                Stage(6, 80, 3, 2, 3), Stage(6, 112, 3, 1, 5), Stage(6, 192, 4, 2, 5),
                Stage(6, 320, 1, 1, 3)),
        padding="same", bn_eps=1e-3, bn_momentum=0.01),
}


def get_arch(name: str) -> ConvNetConfig:
  """The architecture called `name` in `ARCHS`.

  Raises:
    ConfigError: for an unknown name.
  """
  if name not in ARCHS:
    raise ConfigError(f"image architecture {name!r} is unknown; known: {sorted(ARCHS)}")
  return ARCHS[name]


# As torchvision initialises convolutions: He normal over the fan-out.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pointwise(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """A 1x1 convolution without bias, as a linear layer over the channel axis."""
  return nnx.Linear(din, dout, use_bias=False, kernel_init=_conv_init, rngs=rngs)


def _batch_norm(arch: ConvNetConfig, features: int) -> BatchNorm:
  return BatchNorm(features, eps=arch.bn_eps, momentum=arch.bn_momentum)


class DepthwiseConv(nnx.Module):
  """A k x k depthwise convolution (one filter per channel), kernel [k, k, 1, C].

  On CPU it is computed as k * k shifted, strided slices of the padded input
  scaled per channel and summed: XLA fuses these into a few loops, and the
  backward pass is as simple, which trains MobileNetV2 several times faster
  than XLA's CPU grouped convolution. Other backends use the grouped convolution.
  Both give the same result up to float rounding.
  """

  def __init__(self, channels: int, kernel_size: int, stride: int, padding: str,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(_conv_init(rngs.params(), (kernel_size, kernel_size, 1, channels)))
    self.stride = stride
    self.padding = padding

  def _pads(self, size: int) -> tuple[int, int]:
    k = self.kernel.shape[0]
    if self.padding == "same":  # TensorFlow: the extra row / column at the end
      total = max((-(-size // self.stride) - 1) * self.stride + k - size, 0)
      return total // 2, total - total // 2
    return (k - 1) // 2, (k - 1) // 2

  def __call__(self, x: jax.Array) -> jax.Array:
    pads = (self._pads(x.shape[1]), self._pads(x.shape[2]))
    kernel = self.kernel[...].astype(x.dtype)
    if target.platform() != "cpu":
      return jax.lax.conv_general_dilated(
          x, kernel, (self.stride, self.stride), pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    k, s = kernel.shape[0], self.stride
    out_h = (padded.shape[1] - k) // s + 1
    out_w = (padded.shape[2] - k) // s + 1
    out = None
    for i in range(k):
      for j in range(k):
        window = jax.lax.slice(padded, (0, i, j, 0),
                               (x.shape[0], i + (out_h - 1) * s + 1, j + (out_w - 1) * s + 1,
                                x.shape[3]), (1, s, s, 1))
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


class Stem(nnx.Module):
  """3x3 convolution with stride 2, BatchNorm, ReLU6."""

  def __init__(self, arch: ConvNetConfig, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, arch.stem_channels, (3, 3), strides=2,
                         padding=arch.conv_padding(3), use_bias=False,
                         kernel_init=_conv_init, rngs=rngs)
    self.bn = _batch_norm(arch, arch.stem_channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu6(self.bn(self.conv(x)))


class InvertedResidual(nnx.Module):
  """Expansion (skipped at ratio 1), depthwise convolution, linear projection, residual."""

  def __init__(self, arch: ConvNetConfig, block: Block, rngs: nnx.Rngs):
    hidden = block.hidden_channels
    if block.expand_ratio != 1:
      self.expand = _pointwise(block.in_channels, hidden, rngs)
      self.expand_bn = _batch_norm(arch, hidden)
    else:
      self.expand = self.expand_bn = None
    k = block.kernel_size
    self.depthwise = DepthwiseConv(hidden, k, block.stride, arch.padding, rngs)
    self.depthwise_bn = _batch_norm(arch, hidden)
    self.project = _pointwise(hidden, block.out_channels, rngs)
    self.project_bn = _batch_norm(arch, block.out_channels)
    self.residual = block.residual

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    if self.expand is not None:
      h = jax.nn.relu6(self.expand_bn(self.expand(h)))
    h = jax.nn.relu6(self.depthwise_bn(self.depthwise(h)))
    h = self.project_bn(self.project(h))
    return x + h if self.residual else h


class ImageClassifier(nnx.Module):
  """An inverted-residual network with global average pooling and a linear head."""

  def __init__(self, arch: ConvNetConfig, num_classes: int, *, head_init: str = "zeros",
               rngs: nnx.Rngs):
    """Builds the network.

    Args:
      arch: the architecture, e.g. `ARCHS["mobilenet_v2"]`.
      num_classes: the head's width.
      head_init: "zeros" (a new head that starts at uniform predictions) or
        "normal" (N(0, 0.01), as torchvision initialises its classifier).
      rngs: initialisation randomness (`params`).

    Raises:
      ConfigError: for an unknown `head_init`.
    """
    blocks = arch.blocks()
    self.stem = Stem(arch, rngs)
    self.blocks = nnx.List([InvertedResidual(arch, block, rngs) for block in blocks])
    self.top = _pointwise(blocks[-1].out_channels, arch.top_channels, rngs)
    self.top_bn = _batch_norm(arch, arch.top_channels)
    self.dropout = dropout_lib.Dropout(arch.dropout)
    self.head = nnx.Linear(arch.top_channels, num_classes,
                           kernel_init=heads.kernel_init(head_init, 0.01), rngs=rngs)

  def features(self, batch: dict[str, Any]) -> jax.Array:
    """Pooled features [B, top_channels] of `batch["image"]` [B, H, W, 3] (normalised)."""
    x = sharding.constrain(self.stem(batch["image"]), _ACTIVATION_AXES)
    for block in self.blocks:
      x = sharding.constrain(block(x), _ACTIVATION_AXES)
    x = jax.nn.relu6(self.top_bn(self.top(x)))
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] of `batch["image"]`; `rngs` drives dropout in training."""
    pooled = self.dropout(self.features(batch), deterministic=deterministic, rngs=rngs)
    return self.head(pooled).astype(jnp.float32)

"""ConvNeXt image classifier in Flax NNX: Hugging Face's `ConvNextForImageClassification`.

A patchify stem (a patch_size x patch_size convolution with the same stride, then
LayerNorm), stages of ConvNeXt blocks, the first of every stage but the first
downsampling (LayerNorm, then a 2x2 stride-2 convolution), global average pooling,
a final LayerNorm and a linear head. A block is a 7x7 depthwise convolution,
LayerNorm over the channels, a pointwise MLP four times as wide (GELU), a per-channel
scale (`layer_scale`, absent when `layer_scale_init_value` is 0) and the residual
connection, with stochastic depth in training (`drop_path_rate`, rising linearly over
the blocks as in transformers).

Images are NHWC, so the channels-first LayerNorms of the PyTorch model are plain
LayerNorms over the last axis here. The pointwise layers are `nnx.Linear`, so LoRA
can adapt them; the depthwise convolution is `ftjax.models.mobilenet`'s.
`ftjax.hub.convnext` maps checkpoints onto the parameter paths `stem/{patch,norm}`,
`stages/{s}/{downsample_norm,downsample}`, `stages/{s}/layers/{j}/{dwconv,norm,
pwconv1,pwconv2,layer_scale}`, `norm`, `head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import sharding
from ftjax.errors import ConfigError
from ftjax.models import dropout as dropout_lib
from ftjax.models import heads, hf_config, mobilenet, resnet

# Logical axes of every parameter (see `ftjax.sharding`). Convolutions are small: they
# stay replicated.
PARAM_AXES = (
    (r"stem/patch/kernel", (None, None, None, None)),
    (r"stages/\d+/downsample/kernel", (None, None, None, None)),
    (r"stages/\d+/layers/\d+/dwconv/kernel", (None, None, None, None)),
    (r"stages/\d+/layers/\d+/pwconv1/kernel", ("embed", "mlp")),
    (r"stages/\d+/layers/\d+/pwconv1/bias", ("mlp",)),
    (r"stages/\d+/layers/\d+/pwconv2/kernel", ("mlp", "embed")),
    (r"(.*/)?(norm|downsample_norm)/(scale|bias)", ("norm",)),
    (r".*/layer_scale", ("norm",)),
    (r".*/bias", (None,)),  # of the convolutions and pwconv2
    (r"head/kernel", ("embed", "classes")),
    (r"head/bias", ("classes",)),
)


def adapted_kernels(config: ConvNextConfig) -> str:
  """The kernels LoRA adapts by default: each block's pointwise MLP."""
  del config
  return r".*/pwconv(1|2)/kernel"


def param_axes(config: ConvNextConfig) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
  """`PARAM_AXES`, whatever the architecture (as `ftjax.models.resnet.param_axes`)."""
  del config
  return PARAM_AXES


# Feature maps between stages: split along the batch, whole along height, width, channels.
_ACTIVATION_AXES = ("batch", None, None, None)

_BLOCK_NORM_EPS = 1e-6  # every LayerNorm but the final one (`layer_norm_eps`)
_KERNEL_SIZE = 7
_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ConvNextConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named as in Hugging Face's `config.json` (defaults:
  ConvNeXt-T)."""

  num_channels: int = 3
  patch_size: int = 4
  num_stages: int = 4
  hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
  depths: tuple[int, ...] = (3, 3, 9, 3)
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  layer_scale_init_value: float = 1e-6
  drop_path_rate: float = 0.0

  def check(self, source: str) -> None:
    if self.hidden_act not in hf_config.ACTIVATIONS:
      raise ConfigError(f"{source}: hidden_act={self.hidden_act!r} is not supported; "
                        f"supported: {sorted(hf_config.ACTIVATIONS)}")
    resnet.check_stages(self, source)
    if self.num_stages != len(self.depths):
      raise ConfigError(f"{source}: num_stages={self.num_stages} but depths "
                        f"{list(self.depths)} has {len(self.depths)} entries")
    if not 0 <= self.drop_path_rate < 1:
      raise ConfigError(f"{source}: drop_path_rate={self.drop_path_rate}: must be in [0, 1)")

  def drop_path_rates(self) -> list[list[float]]:
    """Each block's stochastic depth rate, by stage: 0 to `drop_path_rate` linearly."""
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths)).tolist()
    ends = np.cumsum(self.depths).tolist()
    return [rates[end - depth:end] for end, depth in zip(ends, self.depths)]


def _layer_norm(features: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, rngs=rngs)


def _dense(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.truncated_normal(stddev=0.02)
  return nnx.Linear(din, dout, kernel_init=init, rngs=rngs)


def _strided_conv(din: int, dout: int, size: int, rngs: nnx.Rngs) -> nnx.Conv:
  """A size x size convolution with stride `size`, unpadded (patchify, downsample)."""
  init = nnx.initializers.truncated_normal(stddev=0.02)
  return nnx.Conv(din, dout, (size, size), strides=size, padding="VALID", kernel_init=init,
                  rngs=rngs)


class DepthwiseConv(mobilenet.DepthwiseConv):
  """The 7x7 depthwise convolution (padded by 3) with a per-channel bias."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    super().__init__(channels, _KERNEL_SIZE, 1, "symmetric", rngs)
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return super().__call__(x) + self.bias[...].astype(x.dtype)


def drop_path(x: jax.Array, rate: float, *, deterministic: bool,
              rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: zeroes whole examples' branches with probability `rate` in
  training, scaling the kept ones by 1 / keep probability (`ftjax.models.dropout`)."""
  if deterministic or rate == 0:
    return x
  return dropout_lib.dropout(x, rate, rngs.dropout(),
                             broadcast_shape=(x.shape[0],) + (1,) * (x.ndim - 1))


class Block(nnx.Module):
  """x + drop_path(layer_scale * pwconv2(act(pwconv1(norm(dwconv(x))))))."""

  def __init__(self, config: ConvNextConfig, dim: int, drop_rate: float, rngs: nnx.Rngs):
    self.dwconv = DepthwiseConv(dim, rngs)
    self.norm = _layer_norm(dim, _BLOCK_NORM_EPS, rngs)
    self.pwconv1 = _dense(dim, _EXPANSION * dim, rngs)
    self.pwconv2 = _dense(_EXPANSION * dim, dim, rngs)
    init = config.layer_scale_init_value
    self.layer_scale = nnx.Param(jnp.full((dim,), init, jnp.float32)) if init > 0 else None
    self.activation = config.hidden_act
    self.drop_rate = drop_rate

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    h = self.norm(self.dwconv(x))
    h = self.pwconv2(hf_config.ACTIVATIONS[self.activation](self.pwconv1(h)))
    if self.layer_scale is not None:
      h = h * self.layer_scale[...].astype(h.dtype)
    return x + drop_path(h, self.drop_rate, deterministic=deterministic, rngs=rngs)


class Stage(nnx.Module):
  """An optional downsampling (LayerNorm, 2x2 stride-2 convolution), then the blocks."""

  def __init__(self, config: ConvNextConfig, din: int, dout: int, stride: int,
               drop_rates: list[float], rngs: nnx.Rngs):
    if din != dout or stride > 1:
      self.downsample_norm = _layer_norm(din, _BLOCK_NORM_EPS, rngs)
      self.downsample = _strided_conv(din, dout, stride, rngs)
    else:
      self.downsample_norm = self.downsample = None
    self.layers = nnx.List([Block(config, dout, rate, rngs) for rate in drop_rates])

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    if self.downsample is not None:
      x = self.downsample(self.downsample_norm(x))
    for layer in self.layers:
      x = layer(x, deterministic=deterministic, rngs=rngs)
    return x


class Stem(nnx.Module):
  """Patchify convolution and LayerNorm."""

  def __init__(self, config: ConvNextConfig, rngs: nnx.Rngs):
    width = config.hidden_sizes[0]
    self.patch = _strided_conv(config.num_channels, width, config.patch_size, rngs)
    self.norm = _layer_norm(width, _BLOCK_NORM_EPS, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.patch(x))


class ImageClassifier(nnx.Module):
  """A ConvNeXt with global average pooling, a final LayerNorm and a linear head."""

  def __init__(self, config: ConvNextConfig, num_classes: int, *, head_init: str = "zeros",
               rngs: nnx.Rngs):
    """Builds the network; arguments as `ftjax.models.resnet.ImageClassifier`'s, but a
    "normal" `head_init` draws from N(0, 0.02)."""
    self.stem = Stem(config, rngs)
    widths = config.hidden_sizes
    self.stages = nnx.List([
        Stage(config, widths[max(s - 1, 0)], widths[s], 2 if s > 0 else 1, rates, rngs)
        for s, rates in enumerate(config.drop_path_rates())])
    self.norm = _layer_norm(widths[-1], config.layer_norm_eps, rngs)
    self.head = nnx.Linear(widths[-1], num_classes,
                           kernel_init=heads.kernel_init(head_init, 0.02), rngs=rngs)

  def features(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """The final LayerNorm of the pooled features [B, hidden_sizes[-1]] of
    `batch["image"]` [B, H, W, C] (normalised)."""
    x = sharding.constrain(self.stem(batch["image"]), _ACTIVATION_AXES)
    for stage in self.stages:
      x = sharding.constrain(stage(x, deterministic=deterministic, rngs=rngs),
                             _ACTIVATION_AXES)
    return self.norm(jnp.mean(x, axis=(1, 2)))

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes]; `rngs` drives stochastic depth in training."""
    features = self.features(batch, deterministic=deterministic, rngs=rngs)
    return self.head(features).astype(jnp.float32)

"""Frozen weights stored quantized (QLoRA): int8 per output channel, or NF4 in blocks.

A `QuantizedKernel` holds the codes and scales of a [in, out] kernel and
dequantizes it inside the jitted matmul; it is frozen (never differentiated).

* int8: symmetric, one float32 scale per output column (absmax / 127).
* nf4: the 16 NormalFloat levels of the QLoRA paper, one absmax per block of
  `block_size` consecutive values (row-major), two codes packed per byte. With
  `double_quant`, the block absmaxes are themselves stored as int8 with one
  float32 scale per 256 blocks, as in QLoRA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import ConfigError

# The NF4 levels (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = np.asarray([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
FORMATS = ("int8", "nf4")
_DOUBLE_QUANT_GROUP = 256


def _quantize_absmax_int8(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
  scale = np.abs(values).max(axis=axis, keepdims=True) / 127.0
  scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
  return np.clip(np.round(values / scale), -127, 127).astype(np.int8), scale


class QuantizedKernel(nnx.Module):
  """A frozen [in, out] kernel in int8 or NF4; calling it returns the float32 kernel."""

  def __init__(self, kernel: np.ndarray, fmt: str, *, block_size: int = 64,
               double_quant: bool = False):
    if fmt not in FORMATS:
      raise ConfigError(f"config.peft.quant={fmt!r}: must be one of {list(FORMATS)}")
    kernel = np.asarray(kernel, np.float32)
    self.shape = tuple(kernel.shape)
    self.fmt = fmt
    self.double_quant = double_quant and fmt == "nf4"
    if fmt == "int8":
      codes, scale = _quantize_absmax_int8(kernel, axis=0)
      self.codes = nnx.Param(jnp.asarray(codes))
      self.scale = nnx.Param(jnp.asarray(scale[0]))
      return
    if kernel.size % block_size or block_size % 2:
      raise ConfigError(f"config.peft.quant_block={block_size} must be even and divide the "
                        f"{kernel.size} values of a {self.shape} kernel")
    blocks = kernel.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    absmax = np.where(absmax == 0, 1.0, absmax).astype(np.float32)
    normalised = blocks / absmax[:, None]
    codes = np.abs(normalised[..., None] - NF4_LEVELS).argmin(-1).astype(np.uint8)
    self.codes = nnx.Param(jnp.asarray((codes[:, 0::2] << 4) | codes[:, 1::2]))
    if self.double_quant:
      pad = -len(absmax) % _DOUBLE_QUANT_GROUP
      groups = np.pad(absmax, (0, pad)).reshape(-1, _DOUBLE_QUANT_GROUP)
      mean = groups.mean(axis=1, keepdims=True)
      absmax_codes, absmax_scale = _quantize_absmax_int8(groups - mean, axis=1)
      self.absmax_codes = nnx.Param(jnp.asarray(absmax_codes))
      self.absmax_scale = nnx.Param(jnp.asarray(absmax_scale[:, 0]))
      self.absmax_mean = nnx.Param(jnp.asarray(mean[:, 0]))
      self.num_blocks = len(absmax)
    else:
      self.absmax = nnx.Param(jnp.asarray(absmax))

  def __call__(self) -> jax.Array:
    if self.fmt == "int8":
      return self.codes[...].astype(jnp.float32) * self.scale[...].astype(jnp.float32)
    packed = self.codes[...]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(packed.shape[0], -1)
    if self.double_quant:
      groups = (self.absmax_codes[...].astype(jnp.float32)
                * self.absmax_scale[...].astype(jnp.float32)[:, None]
                + self.absmax_mean[...].astype(jnp.float32)[:, None])
      absmax = groups.reshape(-1)[:self.num_blocks]
    else:
      absmax = self.absmax[...].astype(jnp.float32)
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * absmax[:, None]
    return values.reshape(self.shape)

  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(self)))

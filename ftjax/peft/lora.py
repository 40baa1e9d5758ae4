"""LoRA, rsLoRA and DoRA adapters put into any model's linear layers by regex.

`inject` replaces every `nnx.Linear` whose kernel path matches the target regex
with a `LoraLinear` that keeps the base `kernel` and `bias` at the same paths and
adds `lora_a` [in, r] (random) and `lora_b` [r, out] (zero), plus
`lora_magnitude` [out] for DoRA. Because `lora_b` starts at zero the adapted
model computes exactly what the base model computes until the first update.

  LoRA:  y = x W + b + s * d(x) A B,     s = alpha / r  (rsLoRA: alpha / sqrt(r)), d = dropout
  DoRA:  y = x (m * V / ||V||) + b,      V = W + s A B, column norms over the input
         dimension, treated as constants in the backward pass (as the DoRA paper
         recommends); with dropout, y = x W + (g - 1) d(x) W + g s d(x) A B + b, g = m / ||V||.

Dropout needs the step's rng and mode: `LoraLinear.set_call_mode`, which
`ftjax.models.set_call_mode` calls on every adapted layer of a freshly merged
module before it is called.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax import param_groups
from ftjax.errors import ConfigError
from ftjax.models import dropout as dropout_lib
from ftjax.peft import quant

LORA_PARAMS = ("lora_a", "lora_b", "lora_magnitude")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how (the `peft` config section)."""

  target: str
  rank: int
  alpha: float
  dropout: float = 0.0
  rslora: bool = False
  dora: bool = False
  quant: str | None = None  # QLoRA: int8 | nf4 storage of the frozen base kernels
  quant_block: int = 64
  double_quant: bool = False
  quantize: str = ""  # QLoRA: regex of the other linear kernels stored quantized

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LoraSpec":
    qlora = config.method == "qlora"
    return cls(target=config.target, rank=config.rank, alpha=float(config.alpha),
               dropout=float(config.dropout), rslora=bool(config.rslora),
               dora=config.method == "dora", quant=config.quant if qlora else None,
               quant_block=config.quant_block, double_quant=bool(config.double_quant),
               quantize=config.quantize if qlora else "")


def column_norms(kernel: jax.Array) -> jax.Array:
  """L2 norm of each output column of a [in, out] kernel (DoRA's magnitude)."""
  return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0))


class LoraLinear(nnx.Module):
  """A linear layer with a frozen base and a trainable low-rank (optionally DoRA) update."""

  def __init__(self, base: nnx.Linear, spec: LoraSpec, rngs: nnx.Rngs):
    fan_in, fan_out = base.kernel.shape
    self.kernel = (quant.QuantizedKernel(np.asarray(base.kernel[...]), spec.quant,
                                         block_size=spec.quant_block,
                                         double_quant=spec.double_quant)
                   if spec.quant else base.kernel)
    self.bias = base.bias
    self.scale = spec.scale
    self.dora = spec.dora
    # As in the reference implementation: A ~ kaiming-uniform(a=sqrt(5)), B = 0.
    bound = 1.0 / fan_in ** 0.5
    self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (fan_in, spec.rank),
                                               jnp.float32, -bound, bound))
    self.lora_b = nnx.Param(jnp.zeros((spec.rank, fan_out), jnp.float32))
    if spec.dora:
      self.lora_magnitude = nnx.Param(column_norms(self.base_kernel()))
    self.dropout = dropout_lib.Dropout(spec.dropout)
    self.deterministic = True
    self.rngs = nnx.data(None)

  def set_call_mode(self, *, train: bool, rngs: nnx.Rngs | None) -> None:
    """The mode and dropout rng of the coming call."""
    self.deterministic = not train
    self.rngs = nnx.data(rngs)

  def base_kernel(self) -> jax.Array:
    """The frozen kernel as float32 (dequantized for QLoRA)."""
    return read_kernel(self.kernel)

  def delta(self) -> jax.Array:
    """The low-rank update s * A B, shaped like the kernel."""
    return self.scale * (self.lora_a[...] @ self.lora_b[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.base_kernel().astype(x.dtype)
    bias = self.bias[...].astype(x.dtype) if self.bias is not None else 0.0
    train_dropout = not self.deterministic and self.dropout.rate > 0
    dropped = self.dropout(x, deterministic=self.deterministic, rngs=self.rngs)
    low_rank = self.scale * ((dropped @ self.lora_a[...].astype(x.dtype))
                             @ self.lora_b[...].astype(x.dtype))
    base = x @ kernel
    if not self.dora:
      return base + low_rank + bias
    adapted = self.base_kernel() + self.delta()
    gain = jax.lax.stop_gradient(1.0 / column_norms(adapted)) * self.lora_magnitude[...]
    gain = gain.astype(x.dtype)
    if train_dropout:
      return base + (gain - 1) * (dropped @ kernel) + gain * low_rank + bias
    return gain * (base + low_rank) + bias

  def merged_kernel(self) -> jax.Array:
    """The kernel that gives the same outputs without the adapter (for export)."""
    adapted = self.base_kernel() + self.delta()
    if self.dora:
      adapted = adapted * (self.lora_magnitude[...] / column_norms(adapted))
    return adapted


def read_kernel(kernel: nnx.Param | quant.QuantizedKernel) -> jax.Array:
  return kernel() if isinstance(kernel, quant.QuantizedKernel) else kernel[...]


class QuantLinear(nnx.Module):
  """A frozen linear layer whose kernel is stored quantized (QLoRA's untargeted layers)."""

  def __init__(self, base: nnx.Linear, spec: LoraSpec):
    self.kernel = quant.QuantizedKernel(np.asarray(base.kernel[...]), spec.quant,
                                        block_size=spec.quant_block,
                                        double_quant=spec.double_quant)
    self.bias = base.bias

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel().astype(x.dtype)
    return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def _replace(root: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> None:
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, (nnx.List, list)) else getattr(parent, key)
  if isinstance(parent, (nnx.List, list)):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def inject(module: nnx.Module, spec: LoraSpec, rngs: nnx.Rngs) -> list[str]:
  """Replaces the linear layers whose kernel path matches `spec.target`, in place.

  Returns:
    The adapted kernels' paths.

  Raises:
    ConfigError: if the regex matches no parameter, matches a parameter that is
      not the kernel of a linear layer, or the rank exceeds a kernel's dimensions.
  """
  try:
    pattern = re.compile(spec.target)
  except re.error as e:
    raise ConfigError(f"config.peft.target: invalid regex {spec.target!r}: {e}") from None
  linears = {}
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Linear) and path:
      linears[_path_str(path) + "/kernel"] = path
  matched = [p for p in param_groups.flatten(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
             if pattern.fullmatch(p)]
  if not matched:
    raise ConfigError(f"config.peft.target={spec.target!r} matches no parameter; "
                      f"linear kernels are: {sorted(linears)[:8]} ...")
  not_linear = [p for p in matched if p not in linears]
  if not_linear:
    raise ConfigError(f"config.peft.target={spec.target!r} matches {not_linear[:5]}, which "
                      "are not kernels of linear layers (LoRA adapts [in, out] matrices)")
  quantized = param_groups.matching(linears, [spec.quantize]) if spec.quantize else []
  for kernel_path in sorted(set(matched) | set(quantized)):
    path = linears[kernel_path]
    base = module
    for key in path:
      base = base[key] if isinstance(base, (nnx.List, list)) else getattr(base, key)
    if kernel_path not in matched:
      _replace(module, path, QuantLinear(base, spec))
      continue
    if spec.rank > min(base.kernel.shape):
      raise ConfigError(f"config.peft.rank={spec.rank} exceeds the dimensions "
                        f"{tuple(base.kernel.shape)} of {kernel_path}")
    _replace(module, path, LoraLinear(base, spec, rngs))
  return matched


def merge(module: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and dequantizes, in place; returns the
  plain model."""
  for path, node in list(nnx.iter_graph(module)):
    if isinstance(node, (LoraLinear, QuantLinear)):
      kernel = node.merged_kernel() if isinstance(node, LoraLinear) else node.kernel()
      fan_in, fan_out = kernel.shape
      plain = nnx.Linear(fan_in, fan_out, use_bias=node.bias is not None, rngs=nnx.Rngs(0))
      plain.kernel[...] = kernel
      if node.bias is not None:
        plain.bias[...] = node.bias[...]
      _replace(module, path, plain)
  return module

"""Vision Transformer (ViT) image classifier in Flax NNX.

The image [B, H, W, C] is cut into patch_size x patch_size patches by a strided
convolution, a learned class token is prepended, learned position embeddings
are added, and pre-LayerNorm transformer blocks (self-attention, then a GELU
MLP, each inside a residual connection) follow; the final LayerNorm's class
token feeds the linear head. This is Hugging Face's `ViTForImageClassification`;
`ftjax.hub.vit` maps its checkpoints onto these parameters.

The position table has one row per patch of an `image_size` x `image_size`
image (plus the class token's), so a model is built for one image size. A
checkpoint trained at another size is loaded with its table resized
(`interpolate_pos_embedding`). Every projection is an `nnx.Linear`, so LoRA can
adapt them.
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
from ftjax.models import heads, hf_config

# Logical axes of every parameter (see `ftjax.sharding`): (path regex, one name per dim).
PARAM_AXES = (
    (r"embeddings/patch/kernel", (None, None, None, "embed")),
    (r"embeddings/patch/bias", ("embed",)),
    (r"embeddings/(cls_token|position)", (None, None, "embed")),
    (r"(.*_)?norm/(scale|bias)", ("norm",)),
    (r".*/attention/(query|key|value)/kernel", ("embed", "heads")),
    (r".*/attention/(query|key|value)/bias", ("heads",)),
    (r".*/attention/output/kernel", ("heads", "embed")),
    (r".*/attention/output/bias", ("embed",)),
    (r".*/mlp/fc1/kernel", ("embed", "mlp")),
    (r".*/mlp/fc1/bias", ("mlp",)),
    (r".*/mlp/fc2/kernel", ("mlp", "embed")),
    (r".*/mlp/fc2/bias", ("embed",)),
    (r"head/kernel", ("embed", "classes")),
    (r"head/bias", ("classes",)),
)

# Token sequences between blocks: split along the batch, whole along length and width.
_ACTIVATION_AXES = ("batch", None, None)

# Inputs are RGB in [0, 1], normalised with these per-channel constants.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ViTConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named as in Hugging Face's `config.json`."""

  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0

  @property
  def grid(self) -> tuple[int, int]:
    """Patches along the height and the width of an input image."""
    side = self.image_size // self.patch_size
    return side, side

  def check(self, source: str) -> None:
    hf_config.check_encoder(self, source)
    if not isinstance(self.image_size, int) or self.image_size % self.patch_size:
      raise ConfigError(f"{source}: image_size {self.image_size!r} is not a multiple of "
                        f"patch_size {self.patch_size}")


def interpolate_pos_embedding(pos: np.ndarray, old_grid: tuple[int, int],
                              new_grid: tuple[int, int]) -> np.ndarray:
  """Resizes a position table to another patch grid, keeping the class token's row.

  Args:
    pos: [1, 1 + old_h * old_w, D], the class token's row first, then the
      patches row by row.
    old_grid: (old_h, old_w), the grid `pos` was trained for.
    new_grid: (new_h, new_w).

  Returns:
    [1, 1 + new_h * new_w, D]: the patch rows resized bicubically as a 2-D map.

  Raises:
    ValueError: if `pos` does not have 1 + old_h * old_w rows.
  """
  pos = np.asarray(pos)
  (old_h, old_w), (new_h, new_w) = old_grid, new_grid
  if pos.ndim != 3 or pos.shape[:2] != (1, 1 + old_h * old_w):
    raise ValueError(f"position table of shape {pos.shape} does not fit a "
                     f"{old_h}x{old_w} grid plus a class token")
  if (old_h, old_w) == (new_h, new_w):
    return pos
  dim = pos.shape[-1]
  patches = pos[0, 1:].reshape(old_h, old_w, dim).astype(np.float32)
  resized = jax.image.resize(patches, (new_h, new_w, dim), method="bicubic")
  table = np.concatenate([pos[0, :1].astype(np.float32),
                          np.asarray(resized).reshape(new_h * new_w, dim)])
  return table[None].astype(pos.dtype)


def _dense(din: int, dout: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  init = nnx.initializers.truncated_normal(stddev=0.02)
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, rngs=rngs)


class Embeddings(nnx.Module):
  """Patch embedding, class token, position embeddings, dropout."""

  def __init__(self, config: ViTConfig, rngs: nnx.Rngs):
    h, p = config.hidden_size, config.patch_size
    init = nnx.initializers.truncated_normal(stddev=0.02)
    self.patch = nnx.Conv(config.num_channels, h, (p, p), strides=p, padding="VALID",
                          kernel_init=init, rngs=rngs)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, h), jnp.float32))
    num_patches = config.grid[0] * config.grid[1]
    self.position = nnx.Param(init(rngs.params(), (1, 1 + num_patches, h), jnp.float32))
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)
    self.image_size = config.image_size

  def __call__(self, images, *, deterministic, rngs):
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ConfigError(f"images of size {images.shape[1]}x{images.shape[2]} given to a ViT "
                        f"built for {self.image_size}x{self.image_size}")
    patches = self.patch(images)
    batch, _, _, hidden = patches.shape
    patches = patches.reshape(batch, -1, hidden)
    cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (batch, 1, hidden))
    x = jnp.concatenate([cls, patches], axis=1) + self.position[...].astype(patches.dtype)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention over all tokens."""

  def __init__(self, config: ViTConfig, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.query = _dense(h, h, rngs, config.qkv_bias)
    self.key = _dense(h, h, rngs, config.qkv_bias)
    self.value = _dense(h, h, rngs, config.qkv_bias)
    self.output = _dense(h, h, rngs)
    self.dropout = dropout_lib.Dropout(config.attention_probs_dropout_prob)

  def __call__(self, x, *, deterministic, rngs):
    batch, length, hidden = x.shape
    head_dim = hidden // self.num_heads

    def heads(y):
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, hidden)
    return self.output(context)


class Mlp(nnx.Module):
  """fc1, activation, fc2."""

  def __init__(self, config: ViTConfig, rngs: nnx.Rngs):
    self.fc1 = _dense(config.hidden_size, config.intermediate_size, rngs)
    self.fc2 = _dense(config.intermediate_size, config.hidden_size, rngs)
    self.activation = config.hidden_act

  def __call__(self, x):
    return self.fc2(hf_config.ACTIVATIONS[self.activation](self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-LayerNorm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ViTConfig, rngs: nnx.Rngs):
    h, eps = config.hidden_size, config.layer_norm_eps
    self.attention_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)
    self.attention = SelfAttention(config, rngs)
    self.mlp_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)
    self.mlp = Mlp(config, rngs)
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)

  def __call__(self, x, *, deterministic, rngs):
    drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
    x = x + drop(self.attention(self.attention_norm(x), deterministic=deterministic,
                                rngs=rngs))
    return x + drop(self.mlp(self.mlp_norm(x)))


class ImageClassifier(nnx.Module):
  """ViT encoder + final LayerNorm + a linear head on the class token."""

  def __init__(self, config: ViTConfig, num_classes: int, *, head_init: str = "zeros",
               rngs: nnx.Rngs):
    """Builds the model for `config.image_size` x `config.image_size` images.

    Args:
      config: the architecture.
      num_classes: the head's width.
      head_init: "zeros" or "normal" (N(0, 0.02)).
      rngs: initialisation randomness (`params`).

    Raises:
      ConfigError: for an unknown `head_init`.
    """
    self.embeddings = Embeddings(config, rngs)
    self.layers = nnx.List([EncoderLayer(config, rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, rngs=rngs)
    self.head = nnx.Linear(config.hidden_size, num_classes,
                           kernel_init=heads.kernel_init(head_init, 0.02), rngs=rngs)

  def features(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """The final LayerNorm's class token [B, hidden] for `batch["image"]` [B, H, W, C]."""
    x = self.embeddings(batch["image"], deterministic=deterministic, rngs=rngs)
    x = sharding.constrain(x, _ACTIVATION_AXES)
    for layer in self.layers:
      x = sharding.constrain(layer(x, deterministic=deterministic, rngs=rngs),
                             _ACTIVATION_AXES)
    return self.norm(x[:, 0])

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes]; `rngs` drives dropout in training."""
    features = self.features(batch, deterministic=deterministic, rngs=rngs)
    return self.head(features).astype(jnp.float32)

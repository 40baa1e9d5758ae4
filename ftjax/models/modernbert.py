"""ModernBERT text encoder and sequence classifier in Flax NNX.

ModernBERT (config.json model_type "modernbert") is an encoder whose blocks are
not BERT's, so it has its own module rather than a `bert.Family`:

- token embeddings only (no positions, no token types), then LayerNorm;
- pre-norm blocks, x + attn(attn_norm(x)) then x + mlp(mlp_norm(x)), where the
  first block's attention norm is the identity (the embeddings' norm precedes it);
- rotary position embeddings with one base on the global layers
  (`global_rope_theta`) and another on the local ones (`local_rope_theta`);
- every `global_attn_every_n_layers`-th layer (from the first) attends globally,
  the others within a window: a token sees the keys at most `local_attention // 2`
  positions away on either side, as transformers masks it;
- fused projections: q, k and v side by side in `Wqkv`, the GeGLU's input and gate
  in `Wi` (act(input) * gate, then `Wo`);
- LayerNorms without bias unless `norm_bias`, linears without bias unless
  `attention_bias` / `mlp_bias`, and a final norm after the last block.

`SequenceClassifier` is transformers' `ModernBertForSequenceClassification`: the
pooled states ("cls": the first token's, "mean": over real tokens, as
`classifier_pooling` says) go through `head` (dense, activation, norm) and the linear
`classifier`. Parameter names are the checkpoint's module names under ftjax's
layout (``encoder/layers/0/attn/Wqkv/kernel``, ``head/dense/kernel``,
``classifier/kernel``); `ftjax.hub.modernbert` maps checkpoint tensors onto them.
Every projection is an `nnx.Linear`, so LoRA can adapt the fused ones whole, as
PEFT names them (`Wqkv`, `Wi`, `Wo`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import sharding
from ftjax.errors import ConfigError
from ftjax.models import bert, heads, hf_config
from ftjax.models import dropout as dropout_lib
from ftjax.models.llama import Rope, apply_rope

MODEL_TYPE = "modernbert"

# Logical axes of every parameter (see `ftjax.sharding`): (path regex, one name per dim).
PARAM_AXES = (
    (r"encoder/embeddings/tok_embeddings/embedding", ("vocab", "embed")),
    (r".*norm/(scale|bias)", ("norm",)),
    # Queries, keys and values (the GeGLU's input and gate) side by side.
    (r".*/attn/Wqkv/kernel", ("embed", "heads")),
    (r".*/attn/Wqkv/bias", ("heads",)),
    (r".*/attn/Wo/kernel", ("heads", "embed")),
    (r".*/mlp/Wi/kernel", ("embed", "mlp")),
    (r".*/mlp/Wi/bias", ("mlp",)),
    (r".*/mlp/Wo/kernel", ("mlp", "embed")),
    (r".*/(attn|mlp)/Wo/bias", ("embed",)),
    (r"head/dense/kernel", ("embed", None)),
    (r"head/dense/bias", (None,)),
    (r"classifier/kernel", ("embed", "classes")),
    (r"classifier/bias", ("classes",)),
)

# Hidden states between blocks: split along the batch, whole along length and width.
_ACTIVATION_AXES = ("batch", None, None)

GLOBAL, LOCAL = "full_attention", "sliding_attention"  # transformers' layer types
# transformers' rotary bases where config.json names none.
_DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}
_LEGACY_THETA = {GLOBAL: "global_rope_theta", LOCAL: "local_rope_theta"}


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named as in Hugging Face's `config.json`.

  `layer_types` and the two rotary bases hold what `from_dict` resolves from either
  form transformers reads: `layer_types` and `rope_parameters` (transformers 5), or
  `global_attn_every_n_layers`, `global_rope_theta` and `local_rope_theta` (the Hub's
  original configs). Fields that change nothing this model computes (the masked-LM
  decoder's, flash-attention settings, token ids) are not read.
  """

  vocab_size: int = 50368
  hidden_size: int = 768
  intermediate_size: int = 1152
  num_hidden_layers: int = 22
  num_attention_heads: int = 12
  hidden_activation: str = "gelu"
  max_position_embeddings: int = 8192
  initializer_range: float = 0.02
  norm_eps: float = 1e-5
  norm_bias: bool = False
  attention_bias: bool = False
  attention_dropout: float = 0.0
  embedding_dropout: float = 0.0
  mlp_bias: bool = False
  mlp_dropout: float = 0.0
  local_attention: int = 128
  classifier_pooling: str = "cls"
  classifier_dropout: float = 0.0
  classifier_bias: bool = False
  classifier_activation: str = "gelu"
  layer_types: tuple[str, ...] = ()
  global_rope_theta: float = _DEFAULT_THETA[GLOBAL]
  local_rope_theta: float = _DEFAULT_THETA[LOCAL]

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def half_window(self) -> int:
    """How far a local layer's token sees on either side (transformers' `sliding_window`)."""
    return self.local_attention // 2

  def rope(self, layer_type: str) -> Rope:
    theta = self.global_rope_theta if layer_type == GLOBAL else self.local_rope_theta
    return Rope(head_dim=self.head_dim, theta=float(theta),
                max_position_embeddings=self.max_position_embeddings)

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config.model.arch") -> ModernBertConfig:
    """Builds and checks a config from HF-named fields; `source` names them in errors.

    Raises:
      ConfigError: naming `source` and the field, for another model type, a layer
        type, rotary embedding or activation this model does not implement, or
        inconsistent sizes.
    """
    model_type = raw.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
      raise ConfigError(f"{source}: model_type={model_type!r} is not supported by "
                        f"modernbert_classifier; supported: [{MODEL_TYPE!r}]")
    raw = {k: v for k, v in raw.items() if v is not None}
    thetas = _rope_thetas(raw, source)
    return super().from_dict(
        {**raw, "layer_types": _layer_types(raw, source),
         "global_rope_theta": thetas[GLOBAL], "local_rope_theta": thetas[LOCAL]}, source)

  def check(self, source: str) -> None:
    for field in ("hidden_activation", "classifier_activation"):
      if getattr(self, field) not in hf_config.ACTIVATIONS:
        raise ConfigError(f"{source}: {field}={getattr(self, field)!r} is not supported; "
                          f"supported: {sorted(hf_config.ACTIVATIONS)}")
    if self.classifier_pooling not in bert.POOLINGS:
      raise ConfigError(f"{source}: classifier_pooling={self.classifier_pooling!r} is not "
                        f"supported; supported: {sorted(bert.POOLINGS)}")
    if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
      raise ConfigError(f"{source}: hidden_size {self.hidden_size} must split into "
                        f"num_attention_heads {self.num_attention_heads} heads of an even "
                        "width (rotary embeddings rotate pairs)")
    if isinstance(self.local_attention, bool) or self.local_attention < 2:
      raise ConfigError(f"{source}: local_attention={self.local_attention!r}: expected an "
                        "integer of at least 2 (the window's width)")


def _layer_types(raw: dict[str, Any], source: str) -> tuple[str, ...]:
  """Each layer's attention: `layer_types`, else every `global_attn_every_n_layers`-th
  layer global from the first (transformers' default 3) and the others local."""
  layers = raw.get("num_hidden_layers", ModernBertConfig.num_hidden_layers)
  if "layer_types" in raw:
    types = raw["layer_types"]
    if (not isinstance(types, (list, tuple)) or len(types) != layers
        or not set(types) <= {GLOBAL, LOCAL}):
      raise ConfigError(f"{source}: layer_types={types!r}: expected one of {[GLOBAL, LOCAL]} "
                        f"for each of the {layers} layers")
    return tuple(types)
  every = raw.get("global_attn_every_n_layers", 3)
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ConfigError(f"{source}: global_attn_every_n_layers={every!r}: expected a positive "
                      "integer")
  return tuple(LOCAL if i % every else GLOBAL for i in range(layers))


def _rope_thetas(raw: dict[str, Any], source: str) -> dict[str, float]:
  """{layer type: rotary base} from `rope_parameters` (one entry per layer type), else
  `global_rope_theta` / `local_rope_theta`, else transformers' defaults. Only plain
  RoPE is implemented: any other `rope_type` (or a `rope_scaling`) is refused."""
  if raw.get("rope_scaling"):
    raise ConfigError(f"{source}: rope_scaling={raw['rope_scaling']!r} is not supported; "
                      "supported: none (plain rotary embeddings)")
  parameters = raw.get("rope_parameters") or {}
  if not isinstance(parameters, dict) or not set(parameters) <= {GLOBAL, LOCAL}:
    raise ConfigError(f"{source}: rope_parameters={parameters!r}: expected an entry for "
                      f"each of {[GLOBAL, LOCAL]}")
  thetas = {}
  for layer_type in (GLOBAL, LOCAL):
    entry = parameters.get(layer_type) or {}
    if entry.get("rope_type", "default") != "default":
      raise ConfigError(f"{source}: rope_parameters.{layer_type}.rope_type="
                        f"{entry['rope_type']!r} is not supported; supported: ['default']")
    theta = entry.get("rope_theta", raw.get(_LEGACY_THETA[layer_type],
                                            _DEFAULT_THETA[layer_type]))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
      raise ConfigError(f"{source}: the {layer_type} rope_theta={theta!r}: expected a "
                        "positive number")
    thetas[layer_type] = float(theta)
  return thetas


def _linear(din: int, dout: int, use_bias: bool, stddev: float, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias,
                    kernel_init=nnx.initializers.truncated_normal(stddev=stddev), rngs=rngs)


def _norm(config: ModernBertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_eps,
                       use_bias=config.norm_bias, rngs=rngs)


def _out_stddev(config: ModernBertConfig) -> float:
  """transformers' initial scale of the projections back into the residual stream."""
  return config.initializer_range / math.sqrt(2.0 * config.num_hidden_layers)


class Embeddings(nnx.Module):
  """Token embeddings, then LayerNorm and dropout."""

  def __init__(self, config: ModernBertConfig, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(stddev=config.initializer_range)
    self.tok_embeddings = nnx.Embed(config.vocab_size, config.hidden_size,
                                    embedding_init=init, rngs=rngs)
    self.norm = _norm(config, rngs)
    self.drop = dropout_lib.Dropout(config.embedding_dropout)

  def __call__(self, input_ids, *, deterministic, rngs):
    return self.drop(self.norm(self.tok_embeddings(input_ids)), deterministic=deterministic,
                     rngs=rngs)


class Attention(nnx.Module):
  """Bidirectional self-attention with rotary embeddings and a fused q/k/v projection."""

  def __init__(self, config: ModernBertConfig, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.Wqkv = _linear(h, 3 * h, config.attention_bias, config.initializer_range, rngs)
    self.Wo = _linear(h, h, config.attention_bias, _out_stddev(config), rngs)
    self.dropout = dropout_lib.Dropout(config.attention_dropout)

  def __call__(self, x, cos, sin, keep, *, deterministic, rngs):
    batch, length, hidden = x.shape
    qkv = self.Wqkv(x).reshape(batch, length, 3, self.num_heads, hidden // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Rotated in float32 whatever the compute dtype, as transformers rotates them.
    rotate = lambda y: apply_rope(y.astype(jnp.float32), cos, sin).astype(y.dtype)
    context = bert.attend(rotate(q), rotate(k), v, keep, self.dropout,
                          deterministic=deterministic, rngs=rngs)
    out = self.Wo(context.reshape(batch, length, hidden))
    return self.dropout(out, deterministic=deterministic, rngs=rngs)


class MLP(nnx.Module):
  """GeGLU: Wo(act(input) * gate), input and gate side by side in `Wi`'s output."""

  def __init__(self, config: ModernBertConfig, rngs: nnx.Rngs):
    h, m = config.hidden_size, config.intermediate_size
    self.Wi = _linear(h, 2 * m, config.mlp_bias, config.initializer_range, rngs)
    self.Wo = _linear(m, h, config.mlp_bias, _out_stddev(config), rngs)
    self.drop = dropout_lib.Dropout(config.mlp_dropout)
    self.act = hf_config.ACTIVATIONS[config.hidden_activation]

  def __call__(self, x, *, deterministic, rngs):
    inputs, gate = jnp.split(self.Wi(x), 2, axis=-1)
    return self.Wo(self.drop(self.act(inputs) * gate, deterministic=deterministic, rngs=rngs))


class EncoderLayer(nnx.Module):
  """Pre-norm block; the first layer's attention norm is the identity."""

  def __init__(self, config: ModernBertConfig, index: int, rngs: nnx.Rngs):
    self.attn_norm = _norm(config, rngs) if index else None
    self.attn = Attention(config, rngs)
    self.mlp_norm = _norm(config, rngs)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, cos, sin, keep, *, deterministic, rngs):
    normed = x if self.attn_norm is None else self.attn_norm(x)
    x = x + self.attn(normed, cos, sin, keep, deterministic=deterministic, rngs=rngs)
    return x + self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=rngs)


class Encoder(nnx.Module):
  """Embeddings, the blocks (global and local) and the final norm; returns hidden states."""

  def __init__(self, config: ModernBertConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(config, rngs)
    self.layers = nnx.List([EncoderLayer(config, i, rngs)
                            for i in range(config.num_hidden_layers)])
    self.final_norm = _norm(config, rngs)
    self.layer_types = tuple(config.layer_types)
    self.ropes = tuple(config.rope(t) for t in (GLOBAL, LOCAL))
    self.half_window = config.half_window

  def __call__(self, input_ids, attention_mask, *, deterministic=True, rngs=None,
               segment_ids=None, positions=None):
    """Hidden states [B, L, H]; `segment_ids` and `positions`: packed rows (several texts
    each, `ftjax.data.packing`), each text attending only to itself, its rotary angles
    counted from its first token (the window's distances are the same either way)."""
    x = self.embeddings(input_ids, deterministic=deterministic, rngs=rngs)
    x = sharding.constrain(x, _ACTIVATION_AXES)
    slots = jnp.arange(input_ids.shape[-1])
    positions = slots[None, :] if positions is None else positions
    angles = dict(zip((GLOBAL, LOCAL), (rope(positions) for rope in self.ropes)))
    keep = bert.keep_mask(attention_mask, segment_ids)  # [B, 1, 1 or L, L]
    near = jnp.abs(slots[:, None] - slots[None, :]) <= self.half_window  # [L, L]
    masks = {GLOBAL: keep, LOCAL: keep & near[None, None]}
    for layer, layer_type in zip(self.layers, self.layer_types):
      x = layer(x, *angles[layer_type], masks[layer_type], deterministic=deterministic,
                rngs=rngs)
      x = sharding.constrain(x, _ACTIVATION_AXES)
    return self.final_norm(x)


class Head(nnx.Module):
  """transformers' `ModernBertPredictionHead`: dense, activation, LayerNorm."""

  def __init__(self, config: ModernBertConfig, rngs: nnx.Rngs):
    self.dense = _linear(config.hidden_size, config.hidden_size, config.classifier_bias,
                         _out_stddev(config), rngs)
    self.act = hf_config.ACTIVATIONS[config.classifier_activation]
    self.norm = _norm(config, rngs)

  def __call__(self, x):
    return self.norm(self.act(self.dense(x)))


class SequenceClassifier(nnx.Module):
  """Encoder, pooling, `head` and the linear `classifier`, as
  `ModernBertForSequenceClassification` computes them."""

  def __init__(self, config: ModernBertConfig, *, num_classes: int, head_init: str = "zeros",
               rngs: nnx.Rngs):
    self.encoder = Encoder(config, rngs)
    self.pooling = config.classifier_pooling
    self.head = Head(config, rngs)
    self.drop = dropout_lib.Dropout(config.classifier_dropout)
    self.classifier = nnx.Linear(
        config.hidden_size, num_classes,
        kernel_init=heads.kernel_init(head_init, config.hidden_size ** -0.5), rngs=rngs)

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, classes]; of a packed batch (`ftjax.data.packing`: with `segment_ids`),
    each text's in its slot, [rows, slots, classes]."""
    # ModernBERT reads no token types.
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"],
                          deterministic=deterministic, rngs=rngs,
                          segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
    pooled = bert.pool_texts(hidden, batch, self.pooling)
    return self.classifier(self.drop(self.head(pooled), deterministic=deterministic,
                                      rngs=rngs))

"""DeBERTa-v2 / v3 text encoder (config.json model_type "deberta-v2") in Flax NNX.

DeBERTa's attention adds to the content scores (query . key) two disentangled terms
over relative positions: content-to-position (c2p: a token's query against the
embedding of its distance to each key) and position-to-content (p2c: each key
against the embedding of the query's distance to it), the distances bucketed
logarithmically beyond `position_buckets / 2`. Its embeddings have no absolute
positions in v3 (`position_biased_input=False`) and are zeroed at padding; v2's
large models add a convolution beside the first block (`conv_kernel_size`).

The block around the attention (output projection, post-LayerNorms, MLP), the
pooling and the classification head are BERT's (`ftjax.models.bert`), under the
same parameter names, so LoRA targets, freezing presets and sharding rules
written for BERT's paths apply unchanged.
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
from ftjax.models import bert, hf_config
from ftjax.models import dropout as dropout_lib

MODEL_TYPES = ("deberta-v2",)

# DeBERTa's own parameters, then BERT's rules for the rest (first match wins).
PARAM_AXES = (
    (r"encoder/rel_embeddings/embedding", (None, "embed")),
    (r".*/attention/pos_(query|key)/kernel", ("embed", "heads")),
    (r".*/attention/pos_(query|key)/bias", ("heads",)),
    (r"encoder/conv/conv/kernel", (None, None, "embed")),
    (r"encoder/conv/conv/bias", ("embed",)),
    *bert.PARAM_AXES,
)

# Parameters below the first block, for `Layout.embeddings`: the token embeddings, the
# shared relative-position table and its norm, and the convolution of the embeddings
# that is added to the first block's output.
EMBEDDINGS = "encoder/(embeddings|rel_embeddings|rel_norm|conv)/.*"

_POSITION_TERMS = ("c2p", "p2c")
_REL_NORMS = ("none", "layer_norm")
_CONV_ACTIVATIONS = {**hf_config.ACTIVATIONS, "tanh": jnp.tanh}
# BERT's dense-layer initialisation and activation sharding, shared with its encoder.
_dense = bert._dense  # pylint: disable=protected-access
_ACTIVATION_AXES = bert._ACTIVATION_AXES  # pylint: disable=protected-access


def _parts(value: Any) -> tuple[str, ...]:
  """A "p2c|c2p" string or a list as lower-case names, as transformers reads them."""
  if value is None:
    return ()
  items = value.split("|") if isinstance(value, str) else value
  return tuple(str(item).strip().lower() for item in items)


@dataclasses.dataclass(frozen=True)
class DebertaConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named and defaulting as in transformers'
  `DebertaV2Config` (a field missing from config.json means what it means there)."""

  model_type: str = "deberta-v2"
  vocab_size: int = 128100
  hidden_size: int = 1536
  num_hidden_layers: int = 24
  num_attention_heads: int = 24
  intermediate_size: int = 6144
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-7
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  hidden_act: str = "gelu"
  embedding_size: int = 0  # 0: hidden_size; else projected to it before the LayerNorm
  position_biased_input: bool = True  # absolute position embeddings added to the tokens'
  relative_attention: bool = False
  max_relative_positions: int = -1  # < 1: max_position_embeddings
  position_buckets: int = -1  # > 0: log buckets beyond position_buckets / 2
  norm_rel_ebd: str = "none"
  share_att_key: bool = False  # positions projected by query/key, not pos_query/pos_key
  pos_att_type: tuple[str, ...] = ()  # in config.json "p2c|c2p" or a list of c2p / p2c
  attention_head_size: int = 0  # 0: hidden_size / num_attention_heads
  conv_kernel_size: int = 0  # > 0: a convolution beside the first block
  conv_groups: int = 1
  conv_act: str = "tanh"

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config.model.arch") -> DebertaConfig:
    """Builds and checks a config from HF-named fields; `source` names them in errors.

    Raises:
      ConfigError: naming `source` and the field, for an option this encoder does not
        reproduce, with what it supports.
    """
    model_type = raw.get("model_type", "deberta-v2")
    if model_type not in MODEL_TYPES:
      raise ConfigError(f"{source}: model_type={model_type!r} is not supported by "
                        f"deberta_classifier; supported: {list(MODEL_TYPES)}")
    raw = dict(raw)
    for field in ("pos_att_type", "norm_rel_ebd"):
      if field in raw and not isinstance(raw[field], (str, list, tuple, type(None))):
        raise ConfigError(f"{source}: {field}={raw[field]!r}: expected a string or a list")
    raw["pos_att_type"] = _parts(raw.get("pos_att_type"))
    return super().from_dict(raw, source)

  def check(self, source: str) -> None:
    hf_config.check_encoder(self, source)

    def refuse(field: str, supported: str) -> None:
      raise ConfigError(f"{source}: {field}={getattr(self, field)!r} is not supported for "
                        f"model_type='deberta-v2'; supported: {supported}")

    if not set(self.pos_att_type) <= set(_POSITION_TERMS):
      refuse("pos_att_type", f"any of {list(_POSITION_TERMS)}")
    if not set(_parts(self.norm_rel_ebd)) <= set(_REL_NORMS):
      refuse("norm_rel_ebd", f"one of {list(_REL_NORMS)}")
    if self.attention_head_size not in (0, self.hidden_size // self.num_attention_heads):
      refuse("attention_head_size", "hidden_size / num_attention_heads = "
             f"{self.hidden_size // self.num_attention_heads}")
    if self.conv_kernel_size > 0 and self.conv_kernel_size % 2 == 0:
      refuse("conv_kernel_size", "0 (no convolution) or an odd size")
    if self.conv_kernel_size > 0 and self.conv_act not in _CONV_ACTIVATIONS:
      refuse("conv_act", str(sorted(_CONV_ACTIVATIONS)))
    if self.conv_kernel_size > 0 and (self.conv_groups < 1 or self.hidden_size % self.conv_groups):
      refuse("conv_groups", f"a divisor of hidden_size {self.hidden_size}")

  @property
  def embedding_width(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def max_relative(self) -> int:
    """The largest relative distance told apart (before bucketing)."""
    if self.max_relative_positions > 0:
      return self.max_relative_positions
    return self.max_position_embeddings

  @property
  def span(self) -> int:
    """Half the rows of the relative-position table: distances -span .. span - 1."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative

  @property
  def layer_norm_rel(self) -> bool:
    return "layer_norm" in _parts(self.norm_rel_ebd)


def relative_positions(length: int, buckets: int, max_position: int) -> np.ndarray:
  """[length, length] distances query - key, bucketed logarithmically beyond buckets / 2
  (when `buckets` > 0) as transformers' `make_log_bucket_position` computes them: in
  float32, so that the buckets agree at their edges."""
  ids = np.arange(length)
  distance = ids[:, None] - ids[None, :]
  if buckets <= 0 or max_position <= 0:
    return distance
  mid = buckets // 2
  far = np.where(np.abs(distance) < mid, mid - 1, np.abs(distance))
  log_scale = np.log(np.float32((max_position - 1) / mid))
  logs = np.ceil(np.log(far.astype(np.float32) / np.float32(mid)) / log_scale
                 * np.float32(mid - 1)) + np.float32(mid)
  return np.where(far <= mid, distance, logs * np.sign(distance)).astype(np.int64)


class DisentangledAttention(nnx.Module):
  """Multi-head self-attention over content and relative positions (c2p / p2c)."""

  def __init__(self, config: DebertaConfig, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.query = _dense(h, h, rngs)
    self.key = _dense(h, h, rngs)
    self.value = _dense(h, h, rngs)
    self.output = _dense(h, h, rngs)
    self.terms = config.pos_att_type
    self.share_key = config.share_att_key
    self.span = config.span
    if config.relative_attention and not config.share_att_key:
      if "c2p" in self.terms:
        self.pos_key = _dense(h, h, rngs)
      if "p2c" in self.terms:
        self.pos_query = _dense(h, h, rngs)
    self.dropout = dropout_lib.Dropout(config.attention_probs_dropout_prob)
    self.position_dropout = dropout_lib.Dropout(config.hidden_dropout_prob)

  def _heads(self, y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-1], self.num_heads, -1)

  def _position_scores(self, q, k, rel_embeddings, distance, scale):
    """c2p and p2c scores [B, heads, query, key] from the relative-position table."""
    span, table = self.span, rel_embeddings
    batch, length = q.shape[:2]
    score = 0.0
    if "c2p" in self.terms:
      pos_key = self._heads((self.key if self.share_key else self.pos_key)(table))
      by_row = jnp.einsum("bqhd,rhd->bhqr", q, pos_key)
      index = np.clip(distance + span, 0, 2 * span - 1)
      index = jnp.broadcast_to(index, (batch, self.num_heads, length, length))
      score = score + jnp.take_along_axis(by_row, index, axis=-1) / scale
    if "p2c" in self.terms:
      pos_query = self._heads((self.query if self.share_key else self.pos_query)(table))
      by_row = jnp.einsum("bkhd,rhd->bhkr", k, pos_query)
      # Key j against the query's distance to it: row j at -(j - i), then [i, j].
      index = np.clip(-distance + span, 0, 2 * span - 1)
      index = jnp.broadcast_to(index, (batch, self.num_heads, length, length))
      score = score + jnp.swapaxes(jnp.take_along_axis(by_row, index, axis=-1), -1, -2) / scale
    return score

  def __call__(self, x, attention_mask, *, deterministic, rngs, rel_embeddings=None,
               distance=None):
    batch, length, hidden = x.shape
    q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
    # Each disentangled term adds a score of the same size: scaled by sqrt(d * terms).
    factor = 1 + sum(term in self.terms for term in _POSITION_TERMS)
    scale = jnp.sqrt(jnp.float32(q.shape[-1] * factor)).astype(x.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k / scale)
    if rel_embeddings is not None:
      rel_embeddings = self.position_dropout(rel_embeddings, deterministic=deterministic,
                                             rngs=rngs)
      logits = logits + self._position_scores(q, k, rel_embeddings, distance, scale)
    # Pairs of real tokens only: a padding query's row is all masked (uniform weights),
    # as in the reference implementation.
    real = attention_mask.astype(bool)
    keep = real[:, None, :, None] & real[:, None, None, :]
    logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, hidden)
    return self.output(context)


class Embeddings(nnx.Module):
  """Word (+ absolute position) (+ token-type) embeddings, projected to the layers'
  width where narrower, then LayerNorm; padding positions are zeroed."""

  def __init__(self, config: DebertaConfig, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(stddev=0.02)
    e, h = config.embedding_width, config.hidden_size
    self.word_embeddings = nnx.Embed(config.vocab_size, e, embedding_init=init, rngs=rngs)
    if config.position_biased_input:
      self.position_embeddings = nnx.Embed(config.max_position_embeddings, e,
                                           embedding_init=init, rngs=rngs)
    if config.type_vocab_size > 0:
      self.token_type_embeddings = nnx.Embed(config.type_vocab_size, e, embedding_init=init,
                                             rngs=rngs)
    if e != h:
      self.projection = nnx.Linear(e, h, use_bias=False, kernel_init=init, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)

  def _positions(self, length: int) -> jax.Array:
    """0 .. length - 1; sequences longer than the table are refused (their length is
    static when traced), since a lookup past it would be clamped."""
    table = self.position_embeddings.num_embeddings
    if length > table:
      raise ConfigError(f"sequences of {length} tokens need {length} positions, but the "
                        f"encoder's max_position_embeddings is {table}: set "
                        f"config.data.max_length to at most {table}")
    return jnp.arange(length)[None, :]

  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic, rngs):
    x = self.word_embeddings(input_ids)
    if hasattr(self, "position_embeddings"):
      x = x + self.position_embeddings(self._positions(input_ids.shape[-1]))
    if hasattr(self, "token_type_embeddings"):
      x = x + self.token_type_embeddings(token_type_ids)
    if hasattr(self, "projection"):
      x = self.projection(x)
    x = self.layer_norm(x) * attention_mask[..., None].astype(x.dtype)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)


class ConvLayer(nnx.Module):
  """DeBERTa-v2's convolution over the embeddings, added to the first block's output."""

  def __init__(self, config: DebertaConfig, rngs: nnx.Rngs):
    h, size = config.hidden_size, config.conv_kernel_size
    self.conv = nnx.Conv(h, h, kernel_size=(size,), padding=[((size - 1) // 2,) * 2],
                         feature_group_count=config.conv_groups, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)
    self.activation = _CONV_ACTIVATIONS[config.conv_act]

  def __call__(self, embedded, block_output, attention_mask, *, deterministic, rngs):
    real = attention_mask[..., None].astype(bool)
    y = jnp.where(real, self.conv(embedded), 0.0)
    y = self.activation(self.dropout(y, deterministic=deterministic, rngs=rngs))
    return self.layer_norm(block_output + y) * real.astype(y.dtype)


class Encoder(nnx.Module):
  """Embeddings, the relative-position table and a stack of BERT blocks around
  disentangled attention; returns hidden states."""

  def __init__(self, config: DebertaConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(config, rngs)
    self.layers = nnx.List([
        bert.EncoderLayer(config, rngs, attention=DisentangledAttention(config, rngs))
        for _ in range(config.num_hidden_layers)])
    self.buckets, self.max_relative = config.position_buckets, config.max_relative
    if config.relative_attention:
      self.rel_embeddings = nnx.Embed(2 * config.span, config.hidden_size,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
      if config.layer_norm_rel:
        self.rel_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                      rngs=rngs)
    if config.conv_kernel_size > 0:
      self.conv = ConvLayer(config, rngs)

  def _relative(self, length: int) -> dict[str, Any]:
    """The attention's relative-position inputs (none without relative attention)."""
    if not hasattr(self, "rel_embeddings"):
      return {}
    table = self.rel_embeddings.embedding[...]
    if hasattr(self, "rel_norm"):
      table = self.rel_norm(table)
    return {"rel_embeddings": table,
            "distance": relative_positions(length, self.buckets, self.max_relative)}

  def __call__(self, input_ids, attention_mask, token_type_ids, *, deterministic=True,
               rngs=None):
    embedded = self.embeddings(input_ids, token_type_ids, attention_mask,
                               deterministic=deterministic, rngs=rngs)
    x = embedded = sharding.constrain(embedded, _ACTIVATION_AXES)
    relative = self._relative(input_ids.shape[-1])
    for i, layer in enumerate(self.layers):
      x = layer(x, attention_mask, deterministic=deterministic, rngs=rngs, **relative)
      if i == 0 and hasattr(self, "conv"):
        x = self.conv(embedded, x, attention_mask, deterministic=deterministic, rngs=rngs)
      x = sharding.constrain(x, _ACTIVATION_AXES)
    return x


class SequenceClassifier(bert.SequenceClassifier):
  """DeBERTa encoder + pooling (`config.model.pooling`) + a new linear head, as BERT's.

  DeBERTa's own classification head (a dense pooler before the output layer) is not
  used; an export holds the encoder alone, as `DebertaV2Model` loads it.
  """

  encoder_class = Encoder

"""BERT-style text encoder and sequence classifier in Flax NNX.

One encoder serves the BERT, RoBERTa, XLM-RoBERTa, DistilBERT and ELECTRA families,
configured by their differences (`FAMILIES`, picked by config.json's model_type).
Parameter names follow ftjax's layout (``encoder/layers/0/attention/query/kernel``)
in every family; `ftjax.hub.bert` maps each family's checkpoint tensors onto it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import schema, sharding
from ftjax.errors import ConfigError
from ftjax.models import dropout as dropout_lib
from ftjax.models import heads, hf_config

# Logical axes of every parameter (see `ftjax.sharding`): (path regex, one name per dim).
PARAM_AXES = (
    (r"encoder/embeddings/word_embeddings/embedding", ("vocab", "embed")),
    (r"encoder/embeddings/(position|token_type)_embeddings/embedding", (None, "embed")),
    (r"encoder/embeddings/projection/kernel", (None, "embed")),
    (r"encoder/embeddings/projection/bias", ("embed",)),
    (r".*(layer_norm|_norm)/(scale|bias)", ("norm",)),
    (r".*/attention/(query|key|value)/kernel", ("embed", "heads")),
    (r".*/attention/(query|key|value)/bias", ("heads",)),
    (r".*/attention/output/kernel", ("heads", "embed")),
    (r".*/intermediate/kernel", ("embed", "mlp")),
    (r".*/intermediate/bias", ("mlp",)),
    (r"encoder/layers/\d+/output/kernel", ("mlp", "embed")),
    (r".*/output/bias", ("embed",)),
    (r"head/kernel", ("embed", "classes")),
    (r"head/bias", ("classes",)),
)

# Hidden states between blocks: split along the batch, whole along length and width.
_ACTIVATION_AXES = ("batch", None, None)

# How a classifier turns token states into one vector: their mean over real tokens, or
# the first ([CLS]) token's.
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class Family:
  """How an encoder family's architecture differs from BERT's."""

  # config.json fields with the only value this encoder implements, e.g.
  # position_embedding_type='absolute': anything else is refused by name.
  required: tuple[tuple[str, Any], ...] = (("position_embedding_type", "absolute"),)
  # Positions count only the tokens that are not pad_token_id, from pad_token_id + 1
  # (RoBERTa's create_position_ids_from_input_ids); padding sits at pad_token_id.
  positions_skip_padding: bool = False
  token_types: bool = True  # a token-type embedding table (segment A / B)
  # config.json field -> BertConfig field, for a family that names them otherwise.
  renamed: tuple[tuple[str, str], ...] = ()
  # Embeddings `embedding_size` wide, projected to hidden_size where that differs (ELECTRA).
  reads_embedding_size: bool = False


# model_type in config.json -> its family.
FAMILIES = {
    "bert": Family(),
    "distilbert": Family(
        required=(("sinusoidal_pos_embds", False),), token_types=False,
        renamed=(("dim", "hidden_size"), ("n_layers", "num_hidden_layers"),
                 ("n_heads", "num_attention_heads"), ("hidden_dim", "intermediate_size"),
                 ("activation", "hidden_act"), ("dropout", "hidden_dropout_prob"),
                 ("attention_dropout", "attention_probs_dropout_prob"))),
    "electra": Family(reads_embedding_size=True),
    "roberta": Family(positions_skip_padding=True),
    "xlm-roberta": Family(positions_skip_padding=True),
}


@dataclasses.dataclass(frozen=True)
class BertConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named as in Hugging Face's `config.json`.

  `model_type` picks the family (`FAMILIES`); a checkpoint of any other family is
  refused rather than loaded into an encoder that computes something else.
  """

  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  hidden_act: str = "gelu"
  # Used only by the families whose positions skip padding (BERT's may be null).
  pad_token_id: int | None = None
  embedding_size: int = 0  # of the families that read it; 0: hidden_size

  @property
  def embedding_width(self) -> int:
    if self.family.reads_embedding_size and self.embedding_size:
      return self.embedding_size
    return self.hidden_size

  @property
  def family(self) -> Family:
    return FAMILIES[self.model_type]

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config.model.arch") -> BertConfig:
    """Builds and checks the config of the family named by `raw`'s model_type.

    Args:
      raw: HF-named fields (config.json's, or config.model.arch's, where a missing
        model_type means BERT).
      source: names the fields' origin in errors.

    Returns:
      The checked config.

    Raises:
      ConfigError: naming `source` and the field, for a family or an option of a
        family that this encoder does not implement.
    """
    model_type = raw.get("model_type", "bert")
    if model_type not in FAMILIES:
      raise ConfigError(f"{source}: model_type={model_type!r} is not supported by "
                        f"bert_classifier; supported: {sorted(FAMILIES)} (config.model.name="
                        "auto picks the model that reads a folder's model_type)")
    family = FAMILIES[model_type]
    for field, value in family.required:
      if raw.get(field, value) != value:
        raise ConfigError(f"{source}: {field}={raw[field]!r} is not supported for "
                          f"model_type={model_type!r}; supported: {value!r}")
    return super().from_dict(_renamed(raw, family, source), source)

  def check(self, source: str) -> None:
    hf_config.check_encoder(self, source)
    if self.family.positions_skip_padding and not isinstance(self.pad_token_id, int):
      raise ConfigError(f"{source}: pad_token_id={self.pad_token_id!r}: model_type="
                        f"{self.model_type!r} numbers positions after the padding token and "
                        "needs its integer id")


def _renamed(raw: dict[str, Any], family: Family, source: str) -> dict[str, Any]:
  """`raw` with the family's own field names (DistilBERT's `dim`, ...) as BertConfig's,
  each value checked against the type of the field it fills."""
  defaults = {f.name: f.default for f in dataclasses.fields(BertConfig)}
  # The type check `from_json` gives the fields named as BertConfig names them.
  raw = dict(raw)
  for theirs, ours in family.renamed:
    if theirs in raw:
      expected = hf_config.expected_instead(raw[theirs], defaults[ours])
      if expected:
        raise ConfigError(f"{source}: {theirs}={raw[theirs]!r}: expected {expected}")
      raw[ours] = raw.pop(theirs)
  return raw


def _dense(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.truncated_normal(stddev=0.02)
  return nnx.Linear(din, dout, kernel_init=init, rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position (+ token-type) embeddings, then LayerNorm, dropout and, where the
  embeddings are not as wide as the layers (ELECTRA), a projection to their width."""

  def __init__(self, config: BertConfig, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(stddev=0.02)
    h = config.embedding_width
    self.word_embeddings = nnx.Embed(config.vocab_size, h, embedding_init=init, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, h,
                                         embedding_init=init, rngs=rngs)
    if config.family.token_types:
      self.token_type_embeddings = nnx.Embed(config.type_vocab_size, h, embedding_init=init,
                                             rngs=rngs)
    self.layer_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)
    if h != config.hidden_size:
      self.projection = _dense(h, config.hidden_size, rngs)
    self.positions_skip_padding = config.family.positions_skip_padding
    self.pad_token_id = config.pad_token_id

  def _first_position(self, input_ids: jax.Array) -> int:
    """The position of a text's first token; sequences too long for the position table
    are refused (when traced: their length is static), since a lookup past it would be
    clamped."""
    first = self.pad_token_id + 1 if self.positions_skip_padding else 0
    table = self.position_embeddings.num_embeddings
    if first + input_ids.shape[-1] > table:
      raise ConfigError(
          f"sequences of {input_ids.shape[-1]} tokens need {first + input_ids.shape[-1]} "
          f"positions, but the encoder's max_position_embeddings is {table}"
          + (f" (positions start at pad_token_id + 1 = {first})" if first else "")
          + f": set config.data.max_length to at most {table - first}")
    return first

  def _positions(self, input_ids: jax.Array) -> jax.Array:
    """Each token's position, a text per row."""
    self._first_position(input_ids)
    if not self.positions_skip_padding:
      return jnp.arange(input_ids.shape[-1])[None, :]
    real = (input_ids != self.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + self.pad_token_id

  def __call__(self, input_ids, token_type_ids, *, deterministic, rngs, positions=None):
    """`positions`: each token's place in its text (packed rows, `ftjax.data.packing`);
    None: a text per row, from its first token."""
    if positions is None:
      positions = self._positions(input_ids)
    else:
      positions = positions + self._first_position(input_ids)
    x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
    if hasattr(self, "token_type_embeddings"):
      x = x + self.token_type_embeddings(token_type_ids)
    x = self.dropout(self.layer_norm(x), deterministic=deterministic, rngs=rngs)
    return self.projection(x) if hasattr(self, "projection") else x


def attend(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array,
           dropout: dropout_lib.Dropout, *, deterministic: bool,
           rngs: nnx.Rngs | None) -> jax.Array:
  """Softmax attention of queries [B, L, heads, d] to keys and values [B, S, heads, d]
  where `keep` [B, 1, L or 1, S] allows, `dropout` applied to the probabilities.

  Masked keys get the dtype's lowest score, as in the reference implementations (a
  query that may see no key attends uniformly rather than yielding NaN).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  probs = dropout(probs, deterministic=deterministic, rngs=rngs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention with a padding mask."""

  def __init__(self, config: BertConfig, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.query = _dense(h, h, rngs)
    self.key = _dense(h, h, rngs)
    self.value = _dense(h, h, rngs)
    self.output = _dense(h, h, rngs)
    self.dropout = dropout_lib.Dropout(config.attention_probs_dropout_prob)

  def __call__(self, x, keep, *, deterministic, rngs):
    """`keep`: which keys each query may see, [B, 1, L or 1, L] (`keep_mask`)."""
    batch, length, hidden = x.shape
    head_dim = hidden // self.num_heads

    def heads(y):
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    context = attend(q, k, v, keep, self.dropout, deterministic=deterministic, rngs=rngs)
    return self.output(context.reshape(batch, length, hidden))


class EncoderLayer(nnx.Module):
  """Post-LayerNorm transformer block: attention, then the MLP.

  `attention` replaces BERT's self-attention (DeBERTa's disentangled attention, which
  takes further keyword inputs: the call passes them on).
  """

  def __init__(self, config: BertConfig, rngs: nnx.Rngs, attention: nnx.Module | None = None):
    h, eps = config.hidden_size, config.layer_norm_eps
    self.attention = attention if attention is not None else SelfAttention(config, rngs)
    self.attention_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)
    self.intermediate = _dense(h, config.intermediate_size, rngs)
    self.output = _dense(config.intermediate_size, h, rngs)
    self.output_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)
    self.activation = config.hidden_act

  def __call__(self, x, mask, *, deterministic, rngs, **attention_inputs):
    """`mask`: what the attention masks keys with (BERT's: `keep_mask`; DeBERTa's: the
    attention mask)."""
    drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
    y = self.attention(x, mask, deterministic=deterministic, rngs=rngs, **attention_inputs)
    x = self.attention_norm(x + drop(y))
    y = self.output(hf_config.ACTIVATIONS[self.activation](self.intermediate(x)))
    return self.output_norm(x + drop(y))


class Encoder(nnx.Module):
  """The BERT encoder: embeddings and a stack of layers; returns hidden states."""

  def __init__(self, config: BertConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(config, rngs)
    self.layers = nnx.List([EncoderLayer(config, rngs)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, input_ids, attention_mask, token_type_ids, *, deterministic=True,
               rngs=None, segment_ids=None, positions=None):
    """Hidden states [B, L, H]; `segment_ids` and `positions`: packed rows (several texts
    each, `ftjax.data.packing`), each text attending only to itself."""
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs,
                        positions=positions)
    x = sharding.constrain(x, _ACTIVATION_AXES)
    keep = keep_mask(attention_mask, segment_ids)
    for layer in self.layers:
      x = sharding.constrain(layer(x, keep, deterministic=deterministic, rngs=rngs),
                             _ACTIVATION_AXES)
    return x


def keep_mask(attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Which keys each query attends to: the real ones ([B, 1, 1, L]), or in packed rows
  those of its own text ([B, 1, L, L])."""
  if segment_ids is None:
    return attention_mask[:, None, None, :].astype(bool)
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids[:, None, :] != 0))[:, None]


def pool(hidden: jax.Array, attention_mask: jax.Array, method: str) -> jax.Array:
  """Reduces [B, L, H] hidden states to [B, H]: the first token or the masked mean."""
  if method == "cls":
    return hidden[:, 0]
  weights = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


def pool_texts(hidden: jax.Array, batch: dict[str, Any], method: str) -> jax.Array:
  """Each text's pooled hidden states: [B, H], or of a packed batch (with `segment_ids`,
  `ftjax.data.packing`) [rows, slots, H]."""
  if "segment_ids" in batch:
    return pool_packed(hidden, batch["segment_ids"], batch["positions"],
                       batch["mask"].shape[-1], method)
  return pool(hidden, batch["attention_mask"], method)


def pool_packed(hidden: jax.Array, segment_ids: jax.Array, positions: jax.Array, slots: int,
                method: str) -> jax.Array:
  """Reduces packed rows' [R, L, H] hidden states to each text's [R, slots, H] (text s of
  a row: its tokens of segment s + 1): its first token or its mean; empty slots 0."""
  tokens = segment_ids[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]  # [R, S, L]
  if method == "cls":
    tokens = tokens & (positions == 0)[:, None, :]
  weights = tokens.astype(hidden.dtype)
  sums = jnp.einsum("rsl,rlh->rsh", weights, hidden)
  return sums / jnp.maximum(weights.sum(-1), 1)[..., None]


class SequenceClassifier(nnx.Module):
  """Encoder + pooling + a new linear head; the pretrained pooler is not used."""

  # The encoder under the head (a subclass's: DeBERTa's), built from the same config.
  encoder_class = Encoder

  def __init__(self, config: BertConfig, *, num_classes: int, pooling: str = "mean",
               head_init: str = "zeros", rngs: nnx.Rngs):
    schema.check_choice(pooling, POOLINGS, "model.pooling")
    self.encoder = self.encoder_class(config, rngs)
    self.pooling = pooling
    self.dropout = dropout_lib.Dropout(config.hidden_dropout_prob)
    self.head = nnx.Linear(config.hidden_size, num_classes,
                           kernel_init=heads.kernel_init(head_init, 0.02), rngs=rngs)

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, classes]; of a packed batch (`ftjax.data.packing`: with `segment_ids`),
    each text's in its slot, [rows, slots, classes]."""
    # Packed rows' segment ids and positions, only where present: a subclass's encoder
    # (DeBERTa's) reads one text per row and takes neither.
    packed = {key: batch[key] for key in ("segment_ids", "positions") if key in batch}
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                          deterministic=deterministic, rngs=rngs, **packed)
    pooled = pool_texts(hidden, batch, self.pooling)
    return self.head(self.dropout(pooled, deterministic=deterministic, rngs=rngs))

"""Decoder-only language models (Llama 2/3, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2/3) in Flax NNX.

One decoder serves every family: `LlamaConfig` records how a checkpoint's
`model_type` differs from Llama (q/k/v biases, RMSNorm on each head's queries
and keys, sliding-window attention on some or all layers, Gemma's (1 + w) norms
before and after each sub-block, scaled embeddings, GELU, soft-capped attention
and output logits, a separate rotary base for local layers, Phi-3's fused q/k/v and
gate/up projections), as transformers' class for that model type builds it.

Parameter names follow Hugging Face's module names with ftjax's '/' separator
(``model/layers/0/self_attn/q_proj/kernel``); `ftjax.hub.llama` maps checkpoint
tensors onto them. Every projection is an `nnx.Linear`, so LoRA can adapt any of
them by regex.

Inputs are token ids with explicit `positions` and `segment_ids` [B, L]: a token
attends only to earlier tokens of its own segment, so several examples can be
packed into one row (positions restarting at 0 for each), and segment 0 marks
padding, which no real token attends to.

`SequenceClassifier` puts a linear `score` head on the hidden state of each
row's last real token instead of the language-model head, as transformers'
`LlamaForSequenceClassification` does (the base of reward models).

Generation runs the same blocks incrementally: `CausalLM.init_cache` allocates a
`KVCache` and `CausalLM.decode` appends tokens to it (the whole prompt at once,
then one token per step), attending to every earlier cached token of its row
(within the layer's sliding window, if any).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax import sharding
from ftjax.errors import ConfigError
from ftjax.models import attention as attention_lib
from ftjax.models import heads, hf_config, target


@dataclasses.dataclass(frozen=True)
class _Family:
  """How a model type's decoder differs from Llama's, as its transformers class builds it."""

  qkv_bias: bool = False  # q, k and v projections have biases whatever attention_bias says
  qk_norm: bool = False   # RMSNorm on each head's queries and keys, before RoPE
  # Where `sliding_window` applies: "never" (the class has no window), "every_layer"
  # (Mistral: on every layer unless null), "layer_types" (Qwen2/3: only with
  # `use_sliding_window`, on the layers `layer_types` marks, by default those from
  # `max_window_layers` on) or "pattern" (Gemma: on the layers `layer_types` marks, by
  # default all but every `pattern`-th).
  window: str = "never"
  pattern: int = 0
  # Gemma: norms scale by (1 + weight), in float32; the attention and the MLP each have
  # a norm before and after them; embeddings are multiplied by sqrt(hidden_size).
  gemma: bool = False
  # Gemma 3: layers with a sliding window rotate with their own base (`rope_local_base_freq`).
  local_rope: bool = False
  # Phi-3: one `qkv_proj` for queries, keys and values, one `gate_up_proj` for the MLP.
  fused: bool = False
  # GPT-2: LayerNorm (with a bias) instead of RMSNorm; learned absolute positions
  # (`embed_positions`) instead of rotary ones; a plain MLP down(act(up(x))) instead of a
  # gated one; a bias on every projection.
  layer_norm: bool = False
  learned_positions: bool = False
  gated: bool = True
  biases: bool = False
  # config.json field -> LlamaConfig field, for a family that names them otherwise.
  renamed: tuple[tuple[str, str], ...] = ()
  # config.json fields with the only value this decoder implements: anything else is
  # refused by name.
  required: tuple[tuple[str, Any], ...] = ()
  # Fields the family's class does not read (GPT-2 has neither grouped queries nor a
  # head_dim of its own), dropped should a config.json carry them.
  ignored: tuple[str, ...] = ()
  default_window: int | None = 4096  # sliding_window when config.json gives none
  default_theta: float = 10000.0  # rope_theta when config.json gives none
  default_act: str = "silu"       # the activation when config.json names none
  default_tied: bool = False      # tie_word_embeddings when config.json gives none
  mlp_ratio: int = 0  # intermediate_size = mlp_ratio * hidden_size when config.json gives none


# Model types whose checkpoints this decoder reproduces.
FAMILIES = {
    "llama": _Family(),
    "qwen2": _Family(qkv_bias=True, window="layer_types"),
    "mistral": _Family(window="every_layer"),
    "phi3": _Family(window="every_layer", fused=True, default_window=None),
    "qwen3": _Family(qk_norm=True, window="layer_types"),
    "gemma2": _Family(window="pattern", pattern=2, gemma=True,
                      default_act="gelu_pytorch_tanh"),
    "gemma3_text": _Family(qk_norm=True, window="pattern", pattern=6, gemma=True,
                           local_rope=True, default_theta=1_000_000.0,
                           default_act="gelu_pytorch_tanh"),
    "gpt2": _Family(fused=True, layer_norm=True, learned_positions=True, gated=False,
                    biases=True, default_act="gelu_new", default_tied=True, mlp_ratio=4,
                    renamed=(("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                             ("n_head", "num_attention_heads"), ("n_inner", "intermediate_size"),
                             ("n_positions", "max_position_embeddings"),
                             ("layer_norm_epsilon", "rms_norm_eps"),
                             ("activation_function", "hidden_act")),
                    required=(("scale_attn_weights", True),
                              ("scale_attn_by_inverse_layer_idx", False),
                              ("add_cross_attention", False)),
                    ignored=("num_key_value_heads", "head_dim")),
}
# transformers' values for the window fields a config.json leaves out.
_DEFAULT_MAX_WINDOW_LAYERS = 28
_DEFAULT_LOCAL_THETA = 10000.0  # Gemma 3's rope_local_base_freq
# Attention types of `layer_types` entries the decoder applies.
_LAYER_TYPES = ("full_attention", "sliding_attention")
# The MLP's activations, by the names of transformers' ACT2FN.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# Logical axes of every parameter (see `ftjax.sharding`): (path regex, one name per dim).
PARAM_AXES = (
    (r"model/embed_tokens/embedding", ("vocab", "embed")),
    (r"model/embed_positions/embedding", (None, "embed")),
    (r".*/self_attn/(q_norm|k_norm)/scale", ("norm",)),  # [head_dim], replicated
    (r".*(layernorm|norm)/(scale|bias)", ("norm",)),
    (r".*/q_proj/kernel", ("embed", "heads")),
    (r".*/q_proj/bias", ("heads",)),
    (r".*/(k_proj|v_proj)/kernel", ("embed", "kv_heads")),
    (r".*/(k_proj|v_proj)/bias", ("kv_heads",)),
    # Phi-3's fused projections: queries, keys and values (or gate and up) side by side.
    (r".*/qkv_proj/kernel", ("embed", "heads")),
    (r".*/qkv_proj/bias", ("heads",)),
    (r".*/gate_up_proj/kernel", ("embed", "mlp")),
    (r".*/o_proj/kernel", ("heads", "embed")),
    (r".*/(o_proj|down_proj)/bias", ("embed",)),
    (r".*/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r".*/(gate_proj|up_proj)/bias", ("mlp",)),
    (r".*/down_proj/kernel", ("mlp", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", "classes")),
)

# Hidden states between blocks: split along the batch, whole along length and width.
_ACTIVATION_AXES = ("batch", None, None)

# Names of the block's intermediate values that remat policies may keep (the outputs of
# the projections, `checkpoint_name`d where they are computed).
_QKV = ("query_proj", "key_proj", "value_proj")
_OUT = ("out_proj",)
_CONTEXT = ("context",)  # the attention's output, before `o_proj`
_MLP_IN = ("mlp_gate", "mlp_up")
_MLP_OUT = ("mlp_down",)
_save_only = jax.checkpoint_policies.save_only_these_names

# Gradient checkpointing of each decoder block: config value -> `jax.checkpoint` policy.
# The named ones keep the outputs of the most expensive matmuls and recompute the
# rest (norms, rotations, activations, the attention itself), as MaxText's do.
REMAT_POLICIES = {
    "full": None,  # save only the block's inputs; recompute everything else
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # every matmul output
    "save_qkv_proj": _save_only(*_QKV),
    "save_out_proj": _save_only(*_OUT),
    "save_qkv_out_proj": _save_only(*_QKV, *_OUT),
    # Every projection of the attention, none of the MLP's (the widest activations).
    "save_dot_except_mlp": _save_only(*_QKV, *_CONTEXT, *_OUT),
    # ... and the MLP's down projection, which is only [B, L, hidden].
    "save_dot_except_mlp_in": _save_only(*_QKV, *_CONTEXT, *_OUT, *_MLP_OUT),
    "save_all_proj": _save_only(*_QKV, *_CONTEXT, *_OUT, *_MLP_IN, *_MLP_OUT),
}


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary position embedding: the inverse frequencies of HF's rope types.

  `rope_type` is one of "default", "linear" (positions divided by `factor`),
  "dynamic" (NTK-aware base that grows once a batch runs past
  `max_position_embeddings`) and "llama3" (low frequencies divided by `factor`,
  smoothly interpolated between `low_freq_factor` and `high_freq_factor`).
  """

  head_dim: int
  theta: float
  max_position_embeddings: int
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 0

  @classmethod
  def from_scaling(cls, scaling: dict[str, Any] | None, *, theta: float, head_dim: int,
                   max_position_embeddings: int) -> "Rope":
    """Builds the embedding from a HF `rope_scaling` dict (None for plain RoPE).

    Raises:
      ConfigError: for an unsupported rope type or a missing scaling key.
    """
    base = cls(head_dim=head_dim, theta=float(theta),
               max_position_embeddings=max_position_embeddings)
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    supported = ("default", "linear", "dynamic", "llama3")
    if rope_type not in supported:
      raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: {list(supported)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError(f"partial_rotary_factor={scaling['partial_rotary_factor']!r} is not "
                        "supported (rotary embeddings cover the whole head)")
    if rope_type == "default":
      return base
    needed = ["factor"] + (["low_freq_factor", "high_freq_factor"] if rope_type == "llama3"
                           else [])
    absent = [key for key in needed if key not in scaling]
    if absent:
      raise ConfigError(f"rope_type {rope_type!r} needs {absent} in rope_scaling")
    return dataclasses.replace(
        base, rope_type=rope_type, factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings",
                                                         max_position_embeddings)))

  def inv_frequencies(self, seq_len: jax.Array) -> jax.Array:
    """The [head_dim / 2] float32 inverse frequencies for a batch of `seq_len` positions.

    Only "dynamic" depends on `seq_len` (as in HF, the batch's largest position + 1).
    """
    exponents = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
    theta = jnp.float32(self.theta)
    if self.rope_type == "dynamic":
      seq_len = jnp.maximum(seq_len, self.max_position_embeddings).astype(jnp.float32)
      growth = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
      theta = theta * growth ** (self.head_dim / (self.head_dim - 2))
    inv_freq = 1.0 / theta ** exponents
    if self.rope_type == "linear":
      return inv_freq / self.factor
    if self.rope_type != "llama3":
      return inv_freq
    context = self.original_max_position_embeddings
    low_freq_wavelen = context / self.low_freq_factor
    high_freq_wavelen = context / self.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
    smooth = ((context / wavelen - self.low_freq_factor)
              / (self.high_freq_factor - self.low_freq_factor))
    smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)

  def __call__(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [B, L, head_dim] float32, for integer `positions` [B, L]."""
    inv_freq = self.inv_frequencies(jnp.max(positions) + 1)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of the tokens decoded so far, a pytree (fits `jax.lax.while_loop`).

  Every row has `max_len` slots; slots `0 .. index - 1` are written, each row's
  from the same slot on (shorter prompts are left-padded), and `valid` marks the
  written slots that hold real tokens rather than padding.
  """

  # Per layer, [B, max_len, kv_heads, head_dim]; for scanned blocks one array of them all
  # [num_layers, B, max_len, kv_heads, head_dim].
  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array  # likewise
  valid: jax.Array               # [B, max_len] bool
  index: jax.Array               # int32 scalar: the next slot to write

  @classmethod
  def empty(cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int,
            head_dim: int, dtype: Any, stacked: bool = False) -> "KVCache":
    """A cache with no tokens: zero keys and values, no valid slot, index 0; with
    `stacked`, each of keys and values one array for all layers."""
    shape = (batch, max_len, num_kv_heads, head_dim)
    if stacked:
      keys = values = jnp.zeros((num_layers, *shape), dtype)
    else:
      keys = values = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(keys=keys, values=values, valid=jnp.zeros((batch, max_len), bool),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


@dataclasses.dataclass(frozen=True)
class LlamaConfig(hf_config.HfConfig):
  """Architecture hyper-parameters, named as in Hugging Face's `config.json`.

  `rope_scaling` is None for plain RoPE, else a dict with `rope_type` and its
  parameters; transformers 5's `rope_parameters` is read into `rope_theta` and
  `rope_scaling`. `num_key_value_heads` and `head_dim` default, as in HF, to
  `num_attention_heads` and `hidden_size // num_attention_heads`.

  `sliding_window` and `layer_types` hold the attention window as applied
  (`from_dict` resolves them from the model type's own fields): on the layers
  `layer_types` marks "sliding_attention" (every layer when it is None), a token
  attends only to the last `sliding_window` tokens, itself included; None means
  no window anywhere.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  model_type: str = "llama"
  initializer_range: float = 0.02
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  pad_token_id: int | None = None  # where `SequenceClassifier` finds each row's end
  # Gemma: attention scores are scaled by query_pre_attn_scalar ** -0.5 (else head_dim's),
  # and attention scores and output logits capped smoothly (cap * tanh(x / cap)).
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  local_rope_theta: float | None = None  # Gemma 3: the rotary base of sliding layers

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

  @property
  def qkv_bias(self) -> bool:
    """Whether q, k and v projections have biases (always for Qwen2)."""
    return self.attention_bias or self.family.qkv_bias

  @property
  def qk_norm(self) -> bool:
    """Whether each head's queries and keys are RMS-normalised before RoPE (Qwen3, Gemma 3)."""
    return self.family.qk_norm

  @property
  def gemma(self) -> bool:
    """Whether the blocks are Gemma's: (1 + w) norms around each sub-block, scaled
    embeddings."""
    return self.family.gemma

  @property
  def fused(self) -> bool:
    """Whether q/k/v and gate/up are each one projection (Phi-3's `qkv_proj`, `gate_up_proj`)."""
    return self.family.fused

  @property
  def family(self) -> _Family:
    return FAMILIES[self.model_type]

  def layer_is_local(self, index: int) -> bool:
    """Whether layer `index` is a sliding ("local") layer with its own rotary base."""
    return (self.local_rope_theta is not None and self.layer_types is not None
            and self.layer_types[index] == "sliding_attention")

  def local_rope(self) -> Rope:
    """Gemma 3's rotary embedding of sliding layers (plain RoPE with its own base)."""
    return Rope(head_dim=self.head_dim, theta=float(self.local_rope_theta),
                max_position_embeddings=self.max_position_embeddings)

  def layer_window(self, index: int) -> int | None:
    """The attention window of layer `index`: None where it attends to every earlier token."""
    if self.layer_types is not None and self.layer_types[index] != "sliding_attention":
      return None
    return self.sliding_window

  def rope(self) -> Rope:
    """The rotary embedding this config describes (raises ConfigError if unsupported)."""
    return Rope.from_scaling(self.rope_scaling, theta=self.rope_theta, head_dim=self.head_dim,
                             max_position_embeddings=self.max_position_embeddings)

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config.model.arch") -> "LlamaConfig":
    """Builds and checks a config from HF-named fields; `source` names it in errors.

    Args:
      raw: the fields, as in a Hugging Face `config.json`.
      source: where they come from (a file, or the run config's key).

    Returns:
      The config, its attention window resolved as the model type's
      transformers class resolves it.

    Raises:
      ConfigError: for an unsupported model type, activation, rope type or
        attention-window setting, or inconsistent head counts.
    """
    model_type = raw.get("model_type", cls.model_type)
    if model_type not in FAMILIES:
      raise ConfigError(f"{source}: model_type={model_type!r} is not supported; "
                        f"supported: {list(FAMILIES)}")
    family = FAMILIES[model_type]
    raw = _family_fields(raw, family, source)
    gemma_fields = ("query_pre_attn_scalar", "attn_logit_softcapping",
                    "final_logit_softcapping")
    fields = {f.name for f in dataclasses.fields(cls)} - {
        "rope_theta", "rope_scaling", "sliding_window", "layer_types", "hidden_act",
        "local_rope_theta", *([] if family.gemma else gemma_fields)}
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError(f"{source}: partial_rotary_factor={raw['partial_rotary_factor']!r} is "
                        "not supported (rotary embeddings cover the whole head)")
    if raw.get("use_bidirectional_attention"):
      raise ConfigError(f"{source}: use_bidirectional_attention=True is not supported (the "
                        "decoder is causal)")
    scaling, theta, local_theta = _rope_fields(raw, family, source)
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or family.default_act
    config = cls(rope_theta=float(theta), rope_scaling=scaling, hidden_act=activation,
                 local_rope_theta=local_theta,
                 **{k: v for k, v in raw.items() if k in fields and v is not None})
    if config.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"{source}: hidden_act={config.hidden_act!r} is not supported; "
                        f"supported: {list(ACTIVATIONS)}")
    if config.num_attention_heads % config.num_key_value_heads:
      raise ConfigError(f"{source}: num_attention_heads {config.num_attention_heads} is not a "
                        f"multiple of num_key_value_heads {config.num_key_value_heads}")
    try:
      config.rope()
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None
    window, layer_types = _attention_window(raw, config, source)
    return dataclasses.replace(config, sliding_window=window, layer_types=layer_types)


def _family_fields(raw: dict[str, Any], family: _Family, source: str) -> dict[str, Any]:
  """`raw` under LlamaConfig's names, with the family's defaults filled in.

  Raises:
    ConfigError: for a field of `family.required` with another value.
  """
  for field, value in family.required:
    if raw.get(field, value) != value:
      raise ConfigError(f"{source}: {field}={raw[field]!r} is not supported (the decoder "
                        f"implements {field}={value!r} for model_type={raw['model_type']!r})")
  # The family's own name wins over ours (GPT-2's config.json keeps both n_inner and an
  # intermediate_size its class ignores).
  renamed = dict(family.renamed)
  raw = {**{key: value for key, value in raw.items()
            if key not in renamed and key not in family.ignored},
         **{ours: raw[theirs] for theirs, ours in renamed.items() if theirs in raw}}
  raw.setdefault("tie_word_embeddings", family.default_tied)
  if family.mlp_ratio and raw.get("intermediate_size") is None:
    raw["intermediate_size"] = family.mlp_ratio * raw.get("hidden_size",
                                                          LlamaConfig.hidden_size)
  if family.biases:
    raw.update(attention_bias=True, mlp_bias=True)
  return raw


def _rope_fields(raw: dict[str, Any], family: _Family,
                 source: str) -> tuple[dict[str, Any] | None, float, float | None]:
  """(rope_scaling, rope_theta, local rope theta) from transformers 4's `rope_theta`,
  `rope_scaling` (and Gemma 3's `rope_local_base_freq`) or transformers 5's
  `rope_parameters` (for Gemma 3, one entry per attention type)."""
  rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
  local_theta = None
  if family.local_rope:
    local_theta = raw.get("rope_local_base_freq", _DEFAULT_LOCAL_THETA)
    if rope and set(rope) <= set(_LAYER_TYPES):  # {attention type: its parameters}
      local = dict(rope.get("sliding_attention") or {})
      rope = dict(rope.get("full_attention") or {})
      if local.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: rope_parameters.sliding_attention.rope_type="
                          f"{local['rope_type']!r} is not supported; supported: ['default']")
      local_theta = local.get("rope_theta", local_theta)
    local_theta = float(local_theta)
  theta = rope.pop("rope_theta", raw.get("rope_theta", family.default_theta))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  scaling = {"rope_type": rope_type, **rope} if rope_type != "default" or rope else None
  return scaling, theta, local_theta


def _attention_window(raw: dict[str, Any], config: LlamaConfig,
                      source: str) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) as `config.model_type`'s transformers class applies them.

  Raises:
    ConfigError: naming `source` and the field for a window that is not a
      positive integer, a `layer_types` list that is not one full / sliding
      attention entry per layer, or a window the family's class would not apply
      as the file asks (Llama has none; Mistral's covers every layer).
  """
  family = FAMILIES[config.model_type]
  window = raw.get("sliding_window", None if family.window == "never"
                   else family.default_window)
  if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                             or window < 1):
    raise ConfigError(f"{source}: sliding_window={window!r}: expected a positive integer or "
                      "null")
  layer_types = raw.get("layer_types")
  if layer_types is not None:
    if (not isinstance(layer_types, (list, tuple))
        or len(layer_types) != config.num_hidden_layers):
      raise ConfigError(f"{source}: layer_types={layer_types!r}: expected a list of one "
                        f"attention type per layer ({config.num_hidden_layers})")
    unknown = sorted({str(t) for t in layer_types} - set(_LAYER_TYPES))
    if unknown:
      raise ConfigError(f"{source}: layer_types has attention types {unknown} that the "
                        f"decoder cannot apply; supported: {list(_LAYER_TYPES)}")
    layer_types = tuple(layer_types)
  sliding = layer_types is not None and "sliding_attention" in layer_types
  if family.window == "never":
    if window is not None or sliding:
      field = "sliding_window" if window is not None else "layer_types"
      raise ConfigError(f"{source}: {field}: model_type={config.model_type!r} has no "
                        "sliding-window attention (its transformers class ignores the field); "
                        "remove it or name the family that applies it")
    return None, None
  if family.window == "pattern":
    if layer_types is None:
      every = raw.get("sliding_window_pattern", family.pattern)
      layer_types = tuple("sliding_attention" if (i + 1) % every else "full_attention"
                          for i in range(config.num_hidden_layers))
    return window, layer_types
  if family.window == "every_layer":
    uniform = "full_attention" if window is None else "sliding_attention"
    if layer_types is not None and set(layer_types) != {uniform}:
      raise ConfigError(f"{source}: layer_types={list(layer_types)}: model_type="
                        f"{config.model_type!r} applies sliding_window={window} to every "
                        "layer; per-layer attention types are not supported for it")
    return window, None
  if not raw.get("use_sliding_window") or window is None:
    return None, None
  if layer_types is None:
    first = raw.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS)
    if isinstance(first, bool) or not isinstance(first, int):
      raise ConfigError(f"{source}: max_window_layers={first!r}: expected an integer")
    layer_types = tuple("sliding_attention" if i >= first else "full_attention"
                        for i in range(config.num_hidden_layers))
  return (window, layer_types) if "sliding_attention" in layer_types else (None, None)


def _linear(din: int, dout: int, use_bias: bool, config: LlamaConfig,
            rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.normal(stddev=config.initializer_range)
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, rngs=rngs)


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation, computed in float32, then scaled: by `scale` in the
  input's dtype (Llama), or with `offset` by (1 + `scale`) in float32 (Gemma, whose
  scale starts at zero)."""

  def __init__(self, dim: int, eps: float, offset: bool = False):
    self.scale = nnx.Param((jnp.zeros if offset else jnp.ones)((dim,), jnp.float32))
    self.eps, self.offset = eps, offset

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Layer normalisation (GPT-2's) with a scale and a bias, computed in float32."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    y = y - jnp.mean(y, axis=-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _norm(config: LlamaConfig) -> RMSNorm | LayerNorm:
  """A norm over the hidden states, of the family's kind."""
  if config.family.layer_norm:
    return LayerNorm(config.hidden_size, config.rms_norm_eps)
  return RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [B, L, heads, head_dim] `x` by [B, L, head_dim] angles (HF's half-split layout)."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, *, window: int | None = None,
               implementation: str = "xla"):
    h, d = config.hidden_size, config.head_dim
    # The kernel (`ftjax.models.attention`) and the window it applies itself; "xla" takes
    # the window from the mask instead.
    self.window, self.implementation = window, implementation
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = d
    sizes = (self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d)
    if config.fused:
      self.qkv_proj = _linear(h, sum(sizes), config.qkv_bias, config, rngs)
    else:
      self.q_proj, self.k_proj, self.v_proj = (_linear(h, size, config.qkv_bias, config, rngs)
                                               for size in sizes)
    self.split_at = (sizes[0], sizes[0] + sizes[1]) if config.fused else None
    self.o_proj = _linear(self.num_heads * d, h, config.attention_bias, config, rngs)
    self.q_norm = RMSNorm(d, config.rms_norm_eps, config.gemma) if config.qk_norm else None
    self.k_norm = RMSNorm(d, config.rms_norm_eps, config.gemma) if config.qk_norm else None
    self.scale = (None if config.query_pre_attn_scalar is None
                  else config.query_pre_attn_scalar ** -0.5)
    self.softcap = config.attn_logit_softcapping

  def _project(self, x: jax.Array, cos: jax.Array,
               sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B, L, heads, d] and keys, and values [B, L, kv_heads, d]."""
    batch, length, _ = x.shape
    if self.split_at is None:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    else:
      q, k, v = jnp.split(self.qkv_proj(x), self.split_at, axis=-1)
    q, k, v = (checkpoint_name(y, name) for y, name in zip((q, k, v), _QKV))
    q = q.reshape(batch, length, self.num_heads, self.head_dim)
    k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if cos is None:  # learned absolute positions, added to the embeddings
      return q, k, v
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    q, k, v = self._project(x, cos, sin)
    out = attention_lib.attend(q, k, v, implementation=self.implementation, mask=mask,
                               segment_ids=segment_ids, window=self.window, scale=self.scale,
                               softcap=self.softcap)
    batch, length, _ = x.shape
    out = checkpoint_name(out.reshape(batch, length, self.num_heads * self.head_dim), "context")
    return checkpoint_name(self.o_proj(out), "out_proj")

  def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
             keys: jax.Array, values: jax.Array,
             index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of new tokens to themselves and to the cached ones.

    Args:
      x: the new tokens' inputs [B, L, hidden], written to cache slots
        `index` .. `index + L - 1`.
      cos: rotary angles of the new tokens [B, L, head_dim].
      sin: likewise.
      mask: [B, 1, L, S] which cache slots each new token attends to (causality
        and padding both expressed here).
      keys: this layer's cached keys [B, S, kv_heads, head_dim].
      values: its cached values, likewise.
      index: the first slot to write (int32 scalar).

    Returns:
      (output [B, L, hidden], keys, values) with the new tokens written in.
    """
    q, k, v = self._project(x, cos, sin)
    start = (0, index, 0, 0)
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
    out = attention_lib.reference(q, keys.astype(q.dtype), values.astype(q.dtype), mask,
                                  is_causal=False, scale=self.scale, softcap=self.softcap)
    batch, length, _ = x.shape
    return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim)), keys, values


class MLP(nnx.Module):
  """Gated feed-forward: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or GELU (GeGLU);
  GPT-2's is plain: down(act(up(x)))."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    h, m = config.hidden_size, config.intermediate_size
    self.gated = config.family.gated
    self.fused = self.gated and config.fused
    if self.fused:  # gate and up side by side
      self.gate_up_proj = _linear(h, 2 * m, config.mlp_bias, config, rngs)
    else:
      self.gate_proj = _linear(h, m, config.mlp_bias, config, rngs) if self.gated else None
      self.up_proj = _linear(h, m, config.mlp_bias, config, rngs)
    self.down_proj = _linear(m, h, config.mlp_bias, config, rngs)
    self.act = ACTIVATIONS[config.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.gated:
      hidden = self.act(checkpoint_name(self.up_proj(x), "mlp_up"))
    else:
      if self.fused:
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
      else:
        gate, up = self.gate_proj(x), self.up_proj(x)
      hidden = self.act(checkpoint_name(gate, "mlp_gate")) * checkpoint_name(up, "mlp_up")
    return checkpoint_name(self.down_proj(hidden), "mlp_down")


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)). Gemma's normalises
  each sub-block's output too: x + post_norm(attention(norm(x))), likewise for the MLP
  (its norms: input, post_attention, pre_feedforward, post_feedforward)."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, *, window: int | None = None,
               attention: str = "xla"):
    norm = lambda: _norm(config)
    self.input_layernorm = norm()
    self.self_attn = Attention(config, rngs, window=window, implementation=attention)
    # Llama's norm before the MLP; Gemma's after the attention.
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm() if config.gemma else None
    self.post_feedforward_layernorm = norm() if config.gemma else None
    self.mlp = MLP(config, rngs)

  def _feed_forward(self, x: jax.Array, attended: jax.Array) -> jax.Array:
    """The block's output from its input `x` and the attention's output."""
    if self.pre_feedforward_layernorm is None:
      x = x + attended
      return x + self.mlp(self.post_attention_layernorm(x))
    x = x + self.post_attention_layernorm(attended)
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    return self._feed_forward(x, self.self_attn(self.input_layernorm(x), cos, sin, mask,
                                                segment_ids))

  def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
             keys: jax.Array, values: jax.Array,
             index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The block on new tokens against this layer's cache (see `Attention.decode`)."""
    attended, keys, values = self.self_attn.decode(self.input_layernorm(x), cos, sin, mask,
                                                   keys, values, index)
    return self._feed_forward(x, attended), keys, values


def _run_layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array,
               mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
  return layer(x, cos, sin, mask, segment_ids)


def _remat(fn, remat: str, *, module: bool):
  """`fn` under the gradient checkpointing `remat` names ("none": as it is)."""
  if remat == "none":
    return fn
  if module:
    return nnx.remat(fn, policy=REMAT_POLICIES[remat])
  # Inside a scan, CSE across iterations cannot undo the recomputation.
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


def _window_mask(mask: jax.Array, window: jax.Array, query_slots: jax.Array,
                 key_slots: jax.Array) -> jax.Array:
  """`mask` narrowed to a sliding `window` (an integer array; 0: no window), as
  `Decoder._masks` does for a window known when tracing."""
  near = key_slots[None, :] > query_slots[:, None] - window  # [L, S]
  return mask & (near | (window == 0))[None, None]


@dataclasses.dataclass(frozen=True)
class _Stacked:
  """The blocks as one block's graph and their states stacked along a leading axis, so
  that `jax.lax.scan` runs them: traced and compiled once, whatever the depth."""

  graphdef: nnx.GraphDef
  states: Any  # every variable but rng state, each [num_layers, ...]
  rngs: Any    # the shared dropout rng state (adapters'), one key per layer

  @classmethod
  def of(cls, layers: nnx.List) -> "_Stacked":
    """Stacks the layers' variables (a copy of the weights, in the forward pass; their
    gradients flow back to each layer's own parameters).

    Raises:
      ConfigError: when the blocks differ in structure (e.g. adapters on some only).
    """
    splits = [nnx.split(layer, nnx.RngState, ...) for layer in layers]
    graphdef, rngs, _ = splits[0]
    for index, (other, _, _) in enumerate(splits[1:], start=1):
      if other != graphdef:
        raise ConfigError(f"config.model.scan_layers=True runs every block with block 0's "
                          f"graph, but block {index} differs from it (an adapter on some "
                          "blocks only?): adapt every block or set scan_layers=False")
    count = len(splits)
    stack = lambda *leaves: jnp.stack(leaves)
    states = jax.tree.map(stack, *[state for _, _, state in splits])
    # Each layer draws its own dropout masks: the shared key folded with its index.
    rngs = jax.tree.map(lambda leaf: stack(*(
        jax.random.fold_in(leaf, i) if isinstance(leaf, jax.Array)
        and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
        for i in range(count))), rngs)
    return cls(graphdef, states, rngs)

  def layer(self, states: Any, rngs: Any) -> DecoderLayer:
    """One block from its slice of the stacked variables (in the scan's body)."""
    return nnx.merge(self.graphdef, rngs, states)


def _layer_kernels(config: LlamaConfig, attention: str, *, packed: bool,
                   scan: bool) -> list[tuple[int | None, str]]:
  """Each layer's (window its kernel applies, kernel) for `config.model.attention`.

  Scanned blocks share one graph, so their kernel and window are the same: with
  windows on some layers only (Gemma), that is "xla", which takes each layer's window
  from its mask.

  Raises:
    ConfigError: for a kernel that cannot compute a layer exactly, or cuDNN off a GPU.
  """
  platform = target.platform()
  windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
  if attention == "cudnn" and platform != "gpu":
    raise ConfigError(f"config.model.attention='cudnn' runs on NVIDIA GPUs; this platform "
                      f"is {platform}: use 'auto' or 'xla'")
  if scan and len(set(windows)) > 1:
    if attention not in ("auto", "xla"):
      raise ConfigError(f"config.model.attention={attention!r} with scan_layers=True: the "
                        "scanned blocks share one graph, and only 'xla' applies windows that "
                        "differ between layers (layer_types); set attention='auto' or "
                        "'xla', or scan_layers=False")
    return [(None, "xla")] * len(windows)
  kernels = []
  for index, window in enumerate(windows):
    kernel = attention_lib.choose(attention, platform=platform, window=window,
                                  softcap=config.attn_logit_softcapping, packed=packed)
    problem = attention_lib.unsupported(kernel, window=window,
                                        softcap=config.attn_logit_softcapping, packed=packed)
    if problem:
      raise ConfigError(f"config.model.attention={attention!r}: {problem} (layer {index}"
                        f"{'' if window is None else f', window {window}'}); use 'auto' "
                        "or 'xla'")
    kernels.append((window, kernel))
  return kernels


class Decoder(nnx.Module):
  """Token embeddings, the decoder blocks and the final norm; returns hidden states."""

  def __init__(self, config: LlamaConfig, *, remat: str, rngs: nnx.Rngs,
               scan: bool = False, attention: str = "xla", packed: bool = True):
    init = nnx.initializers.normal(stddev=config.initializer_range)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=init,
                                  rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(config, rngs, window=window, attention=kernel)
        for window, kernel in _layer_kernels(config, attention, packed=packed, scan=scan)])
    self.embed_positions = (nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                      embedding_init=init, rngs=rngs)
                            if config.family.learned_positions else None)
    self.norm = _norm(config)
    self.embed_scale = config.hidden_size ** 0.5 if config.gemma else None
    # The rotary embeddings (global; Gemma 3's local of sliding layers; none with learned
    # positions), and each layer's.
    layers = range(config.num_hidden_layers)
    local = tuple(config.layer_is_local(i) for i in layers)
    self.ropes = (() if self.embed_positions is not None else
                  (config.rope(),) + ((config.local_rope(),) if any(local) else ()))
    self.layer_ropes = tuple(int(is_local) for is_local in local)
    self.remat = remat
    self.windows = tuple(config.layer_window(i) for i in layers)
    self.scan = scan

  @property
  def max_positions(self) -> int | None:
    """The size of the learned position table; None with rotary embeddings (no limit)."""
    return None if self.embed_positions is None else self.embed_positions.num_embeddings

  def _embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings, plus learned position embeddings where the family has them."""
    x = self.embed_tokens(input_ids)
    if self.embed_scale is not None:
      # Gemma: the scale rounded to the embeddings' dtype first, as in transformers.
      x = x * jnp.asarray(self.embed_scale, x.dtype)
    return x if self.embed_positions is None else x + self.embed_positions(positions)

  def _rotations(self, positions: jax.Array) -> list[tuple[jax.Array | None, ...]]:
    """Each layer's (cos, sin) for `positions`; (None, None) without rotary embeddings."""
    if not self.ropes:
      return [(None, None)] * len(self.layer_ropes)
    angles = [rope(positions) for rope in self.ropes]
    return [angles[index] for index in self.layer_ropes]

  def _masks(self, mask: jax.Array, query_slots: jax.Array,
             key_slots: jax.Array) -> dict[int | None, jax.Array]:
    """{window: [B, 1, L, S] mask} for every layer's window, None for full attention.

    A sliding window keeps the keys whose slot is one of the last `window` up to
    the query's own (transformers' `kv_idx > q_idx - window`). Slots rather than
    positions, as in transformers: within a packed segment or a left-padded row
    the two differ by a constant, and other keys are masked anyway.
    """
    masks = {None: mask}
    for window in set(self.windows) - {None}:
      near = key_slots[None, :] > query_slots[:, None] - window  # [L, S]
      masks[window] = mask & near[None, None]
    return masks

  def __call__(self, input_ids: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    # Positions never exceed a row's length; a lookup past the table would not fail.
    if self.max_positions is not None and input_ids.shape[1] > self.max_positions:
      raise ConfigError(f"rows of {input_ids.shape[1]} tokens, but the decoder's position "
                        f"table (max_position_embeddings) has {self.max_positions} "
                        f"positions: set config.data.max_length to at most "
                        f"{self.max_positions}")
    x = self._embed(input_ids, positions)
    rotations = self._rotations(positions)
    # [B, 1, L, L]: same segment; `is_causal` adds the causal part. The diagonal is
    # always kept, so padding rows attend to themselves and never produce NaNs.
    same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    slots = jnp.arange(input_ids.shape[1])
    x = sharding.constrain(x, _ACTIVATION_AXES)
    if self.scan:
      x, _ = self._scanned(x, positions, same_segment, slots, slots, segment_ids=segment_ids)
      return self.norm(x)
    masks = self._masks(same_segment, slots, slots)
    run = _remat(_run_layer, self.remat, module=True)
    for layer, window, (cos, sin) in zip(self.layers, self.windows, rotations):
      x = sharding.constrain(run(layer, x, cos, sin, masks[window], segment_ids),
                             _ACTIVATION_AXES)
    return self.norm(x)

  def _scanned(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               query_slots: jax.Array, key_slots: jax.Array, cache: KVCache | None = None,
               segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[Any, Any] | None]:
    """The blocks run by `jax.lax.scan`, each on the previous one's output.

    What differs between layers enters as scanned inputs rather than Python
    branches: the window (0 for none) narrows the mask in the body, and the index
    of the layer's rotary embedding picks its (cos, sin).

    Returns:
      (hidden states, (keys, values) stacked [num_layers, ...] with `cache`, else None).
    """
    stacked = _Stacked.of(self.layers)
    windowed = any(window is not None for window in self.windows)
    windows = jnp.asarray([window or 0 for window in self.windows], jnp.int32)
    tables = None
    if self.ropes:
      angles = [rope(positions) for rope in self.ropes]
      tables = tuple(jnp.stack(part) for part in zip(*angles))  # ([R, B, L, d], same)
    xs = (stacked.states, stacked.rngs, windows, jnp.asarray(self.layer_ropes, jnp.int32))
    if cache is not None:
      xs += (jnp.stack(cache.keys), jnp.stack(cache.values))

    def body(x, xs):
      states, rngs, window, rope_index = xs[:4]
      layer = stacked.layer(states, rngs)
      cos, sin = (None, None) if tables is None else (t[rope_index] for t in tables)
      layer_mask = _window_mask(mask, window, query_slots, key_slots) if windowed else mask
      if cache is None:
        return sharding.constrain(layer(x, cos, sin, layer_mask, segment_ids),
                                  _ACTIVATION_AXES), None
      x, keys, values = layer.decode(x, cos, sin, layer_mask, *xs[4:], cache.index)
      return x, (keys, values)

    if cache is None:
      body = _remat(body, self.remat, module=False)
    return jax.lax.scan(body, x, xs)

  def decode(self, input_ids: jax.Array, positions: jax.Array, valid: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Hidden states of tokens appended to `cache`, and the cache holding them too.

    Args:
      input_ids: [B, L] new tokens, written to slots `cache.index` onwards.
      positions: their [B, L] rotary positions.
      valid: [B, L] bool, False for padding, which no later token attends to.
      cache: the keys and values of the earlier tokens.

    Returns:
      (hidden [B, L, hidden] after the final norm, updated cache).
    """
    x = self._embed(input_ids, positions)
    rotations = self._rotations(positions)
    length = input_ids.shape[1]
    slot_valid = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), (0, cache.index))
    slots = jnp.arange(cache.max_len)
    query_slots = cache.index + jnp.arange(length)
    earlier = slots[None, :] <= query_slots[:, None]  # [L, S]
    # A token sees the valid slots up to its own; its own slot is always kept, so
    # padding tokens attend to themselves and never produce NaNs.
    own = slots[None, :] == query_slots[:, None]
    # The window keeps the own slot too, so the same holds on sliding layers. Every
    # slot stays cached (no rolling buffer), so a window shorter than the cache
    # is exact.
    mask = (slot_valid[:, None, None, :] & earlier[None, None]) | own[None, None]
    if self.scan:
      x, (keys, values) = self._scanned(x, positions, mask, query_slots, slots, cache)
      return self.norm(x), KVCache(keys=keys, values=values, valid=slot_valid,
                                   index=cache.index + length)
    masks = self._masks(mask, query_slots, slots)
    keys, values = [], []
    for layer, window, (cos, sin), layer_keys, layer_values in zip(
        self.layers, self.windows, rotations, cache.keys, cache.values):
      x, layer_keys, layer_values = layer.decode(x, cos, sin, masks[window], layer_keys,
                                                 layer_values, cache.index)
      keys.append(layer_keys)
      values.append(layer_values)
    return self.norm(x), KVCache(keys=tuple(keys), values=tuple(values), valid=slot_valid,
                                 index=cache.index + length)


def _check_remat(remat: str) -> None:
  if remat != "none" and remat not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat={remat!r}: must be one of "
                      f"{['none', *REMAT_POLICIES]}")


class CausalLM(nnx.Module):
  """The decoder with a language-model head (tied to the embeddings or separate)."""

  def __init__(self, config: LlamaConfig, *, remat: str = "none", rngs: nnx.Rngs,
               scan_layers: bool = False, attention: str = "xla"):
    """Builds the model.

    Args:
      config: the architecture.
      remat: gradient checkpointing of each block: "none", "full" (recompute the
        whole block in the backward pass) or a policy of `REMAT_POLICIES` naming
        what to keep ("dots_saveable": every matmul output; "save_qkv_proj": the
        q/k/v projections; ...).
      rngs: initialises the parameters.
      scan_layers: run the blocks with `jax.lax.scan` (compiled once whatever the
        depth) rather than a Python loop; the parameters are the same.
      attention: the attention kernel (`ftjax.models.attention.IMPLEMENTATIONS`); rows
        may pack several examples.

    Raises:
      ConfigError: for an unknown `remat`, or a kernel that cannot compute a layer.
    """
    _check_remat(remat)
    self.model = Decoder(config, remat=remat, rngs=rngs, scan=scan_layers,
                         attention=attention, packed=True)
    self.tied = config.tie_word_embeddings
    self.final_softcap = config.final_logit_softcapping
    self.lm_head = (None if self.tied else
                    _linear(config.hidden_size, config.vocab_size, False, config, rngs))

  def features(self, batch: dict[str, Any]) -> jax.Array:
    """Final hidden states [B, L, hidden] (after the last norm), in the compute dtype.

    Args:
      batch: `input_ids`, `positions` and `segment_ids`, each [B, L] integers.
    """
    return self.model(batch["input_ids"], batch["positions"], batch["segment_ids"])

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens.

    Args:
      batch: rows.
      max_len: slots per row (prompt, padding included, plus generated tokens).
      dtype: of the keys and values; by default the embeddings' (the compute dtype).
    """
    attention = self.model.layers[0].self_attn
    return KVCache.empty(num_layers=len(self.model.layers), batch=batch, max_len=max_len,
                         num_kv_heads=attention.num_kv_heads, head_dim=attention.head_dim,
                         dtype=self.model.embed_tokens.embedding.dtype if dtype is None
                         else dtype, stacked=self.model.scan)

  def decode(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache,
             valid: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Final hidden states of tokens that continue the cached ones, and the new cache.

    `unembed` turns them into logits; only the last position's are needed to pick
    the next token.

    Args:
      input_ids: [B, L] tokens, stored in cache slots `cache.index` onwards.
      positions: their [B, L] positions (counted per row from its first real token).
      cache: the earlier tokens' keys and values (`init_cache` for none).
      valid: [B, L] bool, False for padding tokens (left padding of shorter
        prompts); all True by default.

    Returns:
      (hidden [B, L, hidden] in the compute dtype, updated cache).
    """
    if valid is None:
      valid = jnp.ones(input_ids.shape, bool)
    return self.model.decode(input_ids, positions, valid, cache)

  def unembed_kernel(self) -> jax.Array | None:
    """The [hidden, vocab] unembedding matrix, or None when the head is adapted
    (then only `unembed` computes its logits) or the logits are soft-capped."""
    if self.final_softcap is not None:
      return None
    if self.tied:
      return self.model.embed_tokens.embedding[...].T
    kernel = self.lm_head.kernel
    return kernel[...] if isinstance(kernel, nnx.Param) else None

  def unembed(self, hidden: jax.Array) -> jax.Array:
    """Float32 next-token logits [..., vocab] of hidden states [..., hidden]."""
    logits = self.model.embed_tokens.attend(hidden) if self.tied else self.lm_head(hidden)
    return attention_lib.capped(logits.astype(jnp.float32), self.final_softcap)

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Float32 next-token logits [B, L, vocab].

    Args:
      batch: `input_ids`, `positions` and `segment_ids`, each [B, L] integers.
      deterministic: part of the shared model interface; the decoder has no dropout.
      rngs: likewise unused.
    """
    del deterministic, rngs
    return self.unembed(self.features(batch))


class SequenceClassifier(nnx.Module):
  """The decoder with a linear `score` head (no bias) on each row's last real token.

  As in transformers' `LlamaForSequenceClassification`, the pooled token is the
  rightmost one that is not `config.pad_token_id` (so left and right padding both
  work, and a row of only padding pools its first token). Without a pad token,
  where transformers takes the last position (and refuses batches of more than
  one row), it is the last token the attention mask keeps.
  """

  def __init__(self, config: LlamaConfig, *, num_classes: int, head_init: str = "zeros",
               remat: str = "none", rngs: nnx.Rngs, scan_layers: bool = False,
               attention: str = "xla"):
    """Builds the model.

    Args:
      config: the decoder's architecture (its `pad_token_id` finds each row's end).
      num_classes: outputs of the `score` head (transformers' `num_labels`; 1 for a
        reward model).
      head_init: how a new head's kernel starts (`ftjax.models.heads`).
      remat: gradient checkpointing of each block, as for `CausalLM`.
      rngs: initialises the parameters.
      scan_layers: scanned blocks, as for `CausalLM`.
      attention: the attention kernel, as for `CausalLM`; each row is one example.

    Raises:
      ConfigError: for an unknown `remat` or `head_init`.
    """
    _check_remat(remat)
    self.model = Decoder(config, remat=remat, rngs=rngs, scan=scan_layers,
                         attention=attention, packed=False)
    self.pad_token_id = config.pad_token_id
    self.score = nnx.Linear(config.hidden_size, num_classes, use_bias=False,
                            kernel_init=heads.kernel_init(head_init, config.initializer_range),
                            rngs=rngs)

  def last_token(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The [B] index of each row's pooled token (see the class docstring)."""
    real = attention_mask != 0 if self.pad_token_id is None else input_ids != self.pad_token_id
    return jnp.argmax(jnp.arange(input_ids.shape[1]) * real, axis=-1)

  def __call__(self, batch: dict[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Float32 logits [B, num_classes].

    Args:
      batch: `input_ids` and `attention_mask` (1 for tokens, 0 for padding), each
        [B, L] integers; positions count from each row's first column, as in
        transformers when none are given.
      deterministic: part of the shared model interface; the decoder has no dropout.
      rngs: likewise unused.
    """
    del deterministic, rngs
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden = self.model(input_ids, positions, attention_mask.astype(jnp.int32))
    pooled = hidden[jnp.arange(input_ids.shape[0]), self.last_token(input_ids, attention_mask)]
    return self.score(pooled).astype(jnp.float32)

"""Causal self-attention kernels, chosen by `config.model.attention`.

Every kernel computes the same thing as `reference`: grouped-query attention of each
token to the earlier tokens of its own segment (`segment_ids`, 0 for padding), within a
sliding window where the layer has one, scores scaled by `scale` and optionally
soft-capped. They differ in how the masking reaches the hardware:

- "xla": `jax.nn.dot_product_attention` with a dense [B, 1, L, L] mask (an explicit
  float32 softmax where scores are soft-capped); any platform.
- "cudnn": cuDNN's fused attention (GPU), padding given as sequence lengths; it cannot
  keep packed examples apart, so only rows of one example each (classification) use it.
- "pallas": the Pallas flash-attention kernel with segment ids (GPU), for packed rows;
  no sliding window or soft-capping.
- "splash": the Pallas splash-attention kernel with segment ids (TPU), windows and
  soft-capping included.
- "auto": per layer, the fastest of these that is exact for the platform, the rows
  (packed or not) and the layer's window and cap; "xla" on CPU.

Off their platform the Pallas kernels run in interpret mode (exact, slow): that is how
the tests check them on CPU. The platform is `ftjax.models.target.platform()`: JAX's
default backend, or the target of an ahead-of-time compile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ftjax import sharding
from ftjax.models import target

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "splash")
_PLATFORMS = {"cudnn": "gpu", "pallas": "gpu", "splash": "tpu"}
_SPLASH_LANES = 128  # the splash kernel's blocks are multiples of this many tokens


def unsupported(implementation: str, *, window: int | None, softcap: float | None,
                packed: bool) -> str:
  """Why `implementation` cannot compute a layer exactly; "" when it can."""
  if implementation == "cudnn":
    if packed:
      return "cuDNN attention cannot keep packed examples apart (it takes padding as lengths)"
    if softcap is not None:
      return "cuDNN attention has no soft-capping of scores"
  if implementation == "pallas":
    if window is not None:
      return "the Pallas flash-attention kernel has no sliding window"
    if softcap is not None:
      return "the Pallas flash-attention kernel has no soft-capping of scores"
  return ""


def choose(implementation: str, *, platform: str, window: int | None,
           softcap: float | None, packed: bool) -> str:
  """The kernel a layer runs: `implementation`, or for "auto" the first exact one of the
  platform's (GPU: cuDNN, then Pallas; TPU: splash), else "xla"."""
  if implementation != "auto":
    return implementation
  candidates = {"gpu": ("cudnn", "pallas"), "tpu": ("splash",)}.get(platform, ())
  for candidate in candidates:
    if not unsupported(candidate, window=window, softcap=softcap, packed=packed):
      return candidate
  return "xla"


def capped(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): values kept smoothly within (-cap, cap); x when cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              is_causal: bool, scale: float | None, softcap: float | None) -> jax.Array:
  """Grouped-query attention [B, L, heads, d] of queries to keys and values
  [B, S, kv_heads, d] where `mask` [B, 1, L, S] (and, with `is_causal`, causality)
  allows; scores scaled by `scale` (default d ** -0.5) and soft-capped by `softcap`."""
  if softcap is None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  scores = capped(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale, softcap)
  if is_causal:
    mask = mask & jnp.tril(jnp.ones(scores.shape[-2:], bool))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _interpret(implementation: str) -> bool:
  return target.platform() != _PLATFORMS[implementation]


def _cudnn(q, k, v, segment_ids, *, window, scale):
  # Rows hold one example then padding: the example's length is its real tokens.
  lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation="cudnn",
      local_window_size=None if window is None else (window - 1, 0))


def _block(length: int, preferred: int) -> int:
  """The largest power-of-two block up to `preferred` that divides `length`."""
  block = preferred
  while block > 1 and length % block:
    block //= 2
  return block


def _pallas(q, k, v, segment_ids, *, scale):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  length = q.shape[1]
  forward, backward = _block(length, 128), _block(length, 32)
  blocks = gpu_attention.BlockSizes(block_q=forward, block_k=forward, block_q_dkv=backward,
                                    block_kv_dkv=backward, block_q_dq=backward,
                                    block_kv_dq=backward)
  return gpu_attention.mha(q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5
                           if scale is None else scale, causal=True, block_sizes=blocks,
                           interpret=_interpret("pallas"))


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, heads: int, window: int | None, softcap: float | None,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as masks)
  shape = (length, length)
  one = (masks.CausalMask(shape) if window is None
         else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0))
  block = _block(length, 512)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), head_shards=1,
                                q_seq_shards=1, block_sizes=sizes,
                                attn_logits_soft_cap=softcap, interpret=interpret)


def _splash(q, k, v, segment_ids, *, window, scale, softcap):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel  # pylint: disable=g-import-not-at-top
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # The kernel's blocks are multiples of 128 tokens: rows are padded to one with tokens
  # of a segment of their own (-1), which come last, so no real token attends to them.
  length = q.shape[1]
  extra = -length % _SPLASH_LANES
  pad = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
  segment_ids = jnp.pad(segment_ids, ((0, 0), (0, extra)), constant_values=-1)
  kernel = _splash_kernel(length + extra, q.shape[2], window, softcap, _interpret("splash"))
  # The kernel takes one example [heads, L, d] and leaves the scaling to its caller.
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(lambda q1, k1, v1, s1: kernel(
      q1, k1, v1, segment_ids=splash_attention_kernel.SegmentIds(q=s1, kv=s1)))(
          heads_first(pad(q * jnp.asarray(scale, q.dtype))), heads_first(pad(k)),
          heads_first(pad(v)), segment_ids)
  return heads_first(out)[:, :length]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str,
           mask: jax.Array, segment_ids: jax.Array, window: int | None,
           scale: float | None, softcap: float | None) -> jax.Array:
  """Causal attention [B, L, heads, d] of `q` to `k`, `v` [B, L, kv_heads, d] by the
  kernel `implementation` (already chosen: not "auto").

  Args:
    q: queries.
    k: keys.
    v: values.
    implementation: "xla", "cudnn", "pallas" or "splash".
    mask: [B, 1, L, L] the same segment (and window) as a dense mask, for "xla".
    segment_ids: [B, L] each token's example, 0 for padding, for the kernels.
    window: the layer's sliding window (the last `window` tokens, itself included).
    scale: the score scale; None for d ** -0.5.
    softcap: cap * tanh(score / cap) before the softmax; None for none.
  """
  if implementation == "xla":
    return reference(q, k, v, mask, is_causal=True, scale=scale, softcap=softcap)
  # The Pallas kernels take as many key / value heads as query heads; cuDNN takes fewer
  # (grouped queries) unless the devices' shares of heads would not keep the groups whole.
  if implementation != "cudnn" or k.shape[2] % sharding.ways("heads"):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  kernel = {"cudnn": functools.partial(_cudnn, window=window, scale=scale),
            "pallas": functools.partial(_pallas, scale=scale),
            "splash": functools.partial(_splash, window=window, scale=scale,
                                        softcap=softcap)}[implementation]
  # Each device attends its own rows and heads: the compiler cannot split a kernel's
  # custom call over a mesh itself.
  heads = ("batch", None, "heads", None)
  return sharding.per_device(kernel, (heads, heads, heads, ("batch", None)))(
      q, k, v, segment_ids)

"""Text generation from decoder-only language models (`llama_lm`), with a KV cache.

`generate` works on token ids: it left-pads a batch of prompts to a common
length, runs them through the model in one pass (the prefill) and then decodes
one token per step inside a compiled `jax.lax.while_loop`, which ends as soon as
every row has produced a stop token. Each row's positions count from its first
real token and its padding is masked out, so a prompt's continuation does not
depend on the prompts batched with it.

Compilation: one program per (model, batch size, prompt bucket, new-token
bucket, compute dtype, sampling mode). The buckets are the longest prompt and
`max_new_tokens` rounded up by `bucket_length` (the KV cache holds both); the
sampling mode is greedy, or sampling with a given `top_k` and with or without a
top-p filter. The prompts, `max_new_tokens` within its bucket, the stop tokens
(up to `MAX_STOP_TOKENS`), the temperature, the top-p mass and the seed are
inputs of the program: changing them does not compile again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax import models, runs
from ftjax import step as step_lib
from ftjax.errors import ConfigError
from ftjax.peft import lora

# Prompt and new-token lengths are rounded up to a power of two, at least this.
MIN_BUCKET = 16
# Up to this many stop tokens share one compiled program (more compile another).
MAX_STOP_TOKENS = 4


def bucket_length(length: int) -> int:
  """`length` rounded up to its compiled size: the next power of two, at least
  `MIN_BUCKET`."""
  return max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float | jax.Array = 1.0,
                  nucleus: bool | None = None) -> jax.Array:
  """Sets the logits outside the top-k and the top-p nucleus to -inf.

  As in transformers, top-k is applied first, then top-p: the nucleus is the
  smallest set of most likely tokens whose probabilities sum to at least
  `top_p`. Tokens tied with the last one kept are kept too.

  Args:
    logits: [..., vocab] float logits (already divided by the temperature).
    top_k: keep the `top_k` largest logits per row; 0 keeps all.
    top_p: the nucleus' probability mass, in (0, 1].
    nucleus: whether to apply the top-p filter; by default when `top_p` is a
      Python number below 1 (pass True when `top_p` is traced).

  Returns:
    Logits of the same shape, -inf where filtered out.
  """
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if nucleus is None:
    nucleus = not isinstance(top_p, (int, float)) or top_p < 1.0
  if nucleus:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    # Mass of the tokens ranked above each one: it belongs to the nucleus while below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: `before` starts at 0
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _next_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                *, greedy: bool, top_k: int, nucleus: bool) -> jax.Array:
  """The [B] int32 tokens chosen from float32 `logits` [B, vocab]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p, nucleus=nucleus)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "new_len", "greedy", "top_k",
                                             "nucleus", "compute_dtype"))
def _generate(params: Any, ids: jax.Array, valid: jax.Array, max_new_tokens: jax.Array,
              stop_tokens: jax.Array, pad_id: jax.Array, key: jax.Array,
              temperature: jax.Array, top_p: jax.Array, *, model: Any, new_len: int,
              greedy: bool, top_k: int, nucleus: bool,
              compute_dtype: str) -> tuple[jax.Array, jax.Array]:
  """Prefill and decode loop: (tokens [B, new_len], how many columns were generated).

  `stop_tokens` is padded with -1, which matches no token.
  """
  module = model.module(step_lib.cast_floats(params, jnp.dtype(compute_dtype)))
  models.set_call_mode(module, train=False, rngs=None)  # adapters, if any: no dropout
  batch, prompt_len = ids.shape
  choose = functools.partial(_next_token, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, nucleus=nucleus)

  def is_stop(tokens):
    return jnp.any(tokens[:, None] == stop_tokens[None, :], axis=-1)

  # The last prompt token is every row's last column: left padding lines them up.
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  cache = module.init_cache(batch, prompt_len + new_len - 1)
  hidden, cache = module.decode(ids, positions, cache, valid=valid)
  token = choose(module.unembed(hidden[:, -1]), jax.random.fold_in(key, 0))
  out = jnp.full((batch, new_len), pad_id, jnp.int32).at[:, 0].set(token)
  next_position = positions[:, -1] + 1

  def cond(carry):
    step, _, _, done, _ = carry
    return (step + 1 < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, cache, done, out = carry
    hidden, cache = module.decode(token[:, None], (next_position + step)[:, None], cache)
    token = choose(module.unembed(hidden[:, 0]), jax.random.fold_in(key, step + 1))
    token = jnp.where(done, pad_id, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step + 1))
    return step + 1, token, cache, done | is_stop(token), out

  carry = (jnp.zeros((), jnp.int32), token, cache, is_stop(token), out)
  step, _, _, _, out = jax.lax.while_loop(cond, body, carry)
  return out, step + 1


def generate(model: Any, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             seed: int = 0, compute_dtype: Any = jnp.float32) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: a language model (`ftjax.models.Model` of `llama_lm`), as built by
      `models.create`, adapters allowed (`load_model` merges a run's, which
      makes decoding faster).
    params: its parameters (nested dict; numpy arrays are copied to the device
      at every call, so pass `jax.device_put(params)` when calling repeatedly).
    prompts: token ids of each prompt (non-empty), of any lengths.
    max_new_tokens: the most tokens generated per prompt.
    temperature: 0 picks the most likely token (greedy); above 0, tokens are
      sampled from softmax(logits / temperature).
    top_k: when sampling, only from the `top_k` most likely tokens (0: all).
    top_p: when sampling, only from the nucleus of this probability mass.
    stop_tokens: a row ends after producing one of these (e.g. the EOS id).
    pad_id: the token id put in padding slots (masked out, so any id works).
    seed: the sampling seed: the same prompts, settings and seed give the same
      tokens.
    compute_dtype: the dtype of the parameters, activations and KV cache
      (logits are float32).

  Returns:
    Per prompt, the generated tokens without the prompt; a row that produced a
    stop token ends with it (as in transformers), others have `max_new_tokens`.

  Raises:
    ConfigError: for an empty prompt or an out-of-range setting.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("generate: every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: must be at least 1")
  if temperature < 0:
    raise ConfigError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
  if top_k < 0:
    raise ConfigError(f"top_k={top_k}: must be >= 0 (0 keeps every token)")
  if not 0.0 < top_p <= 1.0:
    raise ConfigError(f"top_p={top_p}: must be in (0, 1]")
  longest = max(len(p) for p in prompts) + max_new_tokens
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
  limit = model.module(abstract).model.max_positions
  if limit is not None and longest > limit:
    raise ConfigError(f"generate: the longest prompt plus max_new_tokens is {longest} "
                      f"tokens, but the model's position table has {limit} positions")
  stops = sorted({int(t) for t in stop_tokens})
  stop_ids = np.full(max(MAX_STOP_TOKENS, len(stops)), -1, np.int32)
  stop_ids[:len(stops)] = stops
  length = bucket_length(max(len(p) for p in prompts))
  ids = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    ids[row, length - len(prompt):] = prompt
    valid[row, length - len(prompt):] = True
  greedy = temperature == 0.0
  out, steps = _generate(
      params, ids, valid, np.int32(max_new_tokens), stop_ids, np.int32(pad_id),
      jax.random.key(seed), np.float32(temperature or 1.0), np.float32(top_p), model=model,
      new_len=bucket_length(max_new_tokens), greedy=greedy, top_k=0 if greedy else top_k,
      nucleus=not greedy and top_p < 1.0, compute_dtype=jnp.dtype(compute_dtype).name)
  out = np.asarray(out)[:, :int(steps)]
  stop_set = set(stops)
  results = []
  for row in out.tolist():
    end = next((i + 1 for i, token in enumerate(row) if token in stop_set), len(row))
    results.append(row[:end])
  return results


def load_model(*, workdir: str | None = None, pretrained: str | None = None
               ) -> tuple[ml_collections.ConfigDict, models.Model, Any, str]:
  """A language model to generate with: a trained run's, or a pretrained one.

  Args:
    workdir: a training run's workdir: its best parameters, with LoRA / DoRA /
      QLoRA adapters merged into the base kernels (so decoding pays nothing
      for them).
    pretrained: otherwise, a packaged model's name or a checkpoint folder.

  Returns:
    (model config, model, params, compute dtype name): params are on the
    default device; the dtype is the run's compute dtype, or "float32" for a
    pretrained model.

  Raises:
    ConfigError: if neither or both are given, or the model is not a language model.
  """
  if bool(workdir) == bool(pretrained):
    raise ConfigError("load_model: give either a workdir or a pretrained model")
  if workdir:
    config = runs.load_config(workdir)
    model_config, dtype = config.model, config.compute_dtype
  else:
    model_config = ml_collections.ConfigDict(dict(name="llama_lm", pretrained=pretrained,
                                                  dont_load=[], remat="none"))
    dtype = "float32"
  if model_config.name != "llama_lm":
    raise ConfigError(f"config.model.name={model_config.name!r}: generation needs a "
                      "language model (llama_lm)")
  if workdir:
    _, adapted, module = runs.restore_module(workdir)
    graphdef, state = nnx.split(lora.merge(module))
    model, params = dataclasses.replace(adapted, graphdef=graphdef), nnx.to_pure_dict(state)
  else:
    model, params = models.create(model_config, seed=0)
  return model_config, model, jax.device_put(params), dtype

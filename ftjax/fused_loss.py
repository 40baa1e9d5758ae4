"""Chunked next-token cross-entropy whose gradient is formed with its forward pass.

`ftjax.tasks.chunked_token_sums` computes the logits a chunk of tokens at a time
under `jax.checkpoint`, so its backward pass recomputes every chunk's logits:
four [tokens, hidden] x [hidden, vocab] matmuls in all (the logits, their
recomputation, the hidden-state gradient and the kernel gradient). `token_sums`
here gives the same sums with three (two when the kernel takes no gradient, as
under LoRA): a `jax.custom_vjp` whose forward rule, chunk by chunk, computes the
logits, their log-sum-exp and the softmax gradient (softmax - one-hot) x weight,
and from it at once the chunk's hidden-state gradient (dlogits @ W^T) and its
share of the kernel gradient (h^T @ dlogits, summed over chunks in float32).
The loss is a sum, so its gradient is linear in the incoming cotangent: the
backward rule only scales the saved gradients. A chunk's logits are never stored
past the chunk, so memory stays bounded by the chunk as before.

Levanter's blockwise cross-entropy (a custom VJP over vocabulary blocks) saves
the log-sum-exp and recomputes each block's logits in the backward pass: memory
first; this one spends one hidden-state-sized and one kernel-sized buffer between
the forward and the backward pass (both gradients exist in the backward pass anyway)
and saves the recomputation. Without differentiation (evaluation) only the primal
function runs: logits and sums, no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]


def _pieces(x: jax.Array, batch: int, pieces: int, span: int) -> jax.Array:
  """[B, pieces * span, ...] -> [pieces, B, span, ...]: chunks along the sequence."""
  return jnp.moveaxis(x.reshape(batch, pieces, span, *x.shape[2:]), 1, 0)


def join_chunks(x: jax.Array) -> jax.Array:
  """[pieces, B, span, ...] -> [B, pieces * span, ...]: the inverse of `split_chunks`'s
  chunking."""
  pieces, batch, span = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(batch, pieces * span, *x.shape[3:])


def _chunk_stats(h: jax.Array, kernel: jax.Array, t: jax.Array):
  """Float32 logits [..., V] of one chunk, their log-sum-exp, per-token losses and
  correctness."""
  logits = (h @ kernel).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, -1)
  losses = lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
  return logits, lse, losses, correct


def weighted_sums(losses: jax.Array, correct: jax.Array, w: jax.Array) -> Sums:
  """{"loss", "accuracy", "weight"}: the per-token losses and correctness summed with
  the token weights `w`."""
  return {"loss": (losses * w).sum(), "accuracy": (correct * w).sum(), "weight": w.sum()}


def logit_grads(logits: jax.Array, lse: jax.Array, onehot: jax.Array, w: jax.Array,
                dtype: jnp.dtype) -> jax.Array:
  """d(sum of w * loss) / dlogits = w * (softmax - one-hot) for float32 `logits` [..., V]
  with log-sum-exp `lse` [...], in the compute `dtype`, as autodiff of `unembed` would
  hand it to the head matmul's transposes."""
  return ((jnp.exp(logits - lse[..., None]) - onehot) * w[..., None]).astype(dtype)


def head_grads(h: jax.Array, kernel: jax.Array, dlogits: jax.Array,
               kernel_grad: jax.Array | None, *, want_hidden: bool, want_kernel: bool
               ) -> tuple[jax.Array | None, jax.Array | None]:
  """One chunk's head gradients from its `dlogits` [..., V]: the hidden states'
  dlogits @ W^T (None unless `want_hidden`), and `kernel_grad` plus the chunk's
  h^T @ dlogits summed in float32 (as given unless `want_kernel`)."""
  hidden_grad = dlogits @ kernel.T if want_hidden else None
  if want_kernel:
    kernel_grad = kernel_grad + jnp.einsum("...h,...v->hv", h, dlogits,
                                           preferred_element_type=jnp.float32)
  return hidden_grad, kernel_grad


def split_chunks(hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                 chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunks of about `chunk` tokens along the sequence, for a loop over them.

  Each chunk holds every row's next ceil(chunk / B) positions, so the batch
  dimension (split over devices) is never gathered; the sequence is padded to
  whole chunks with weight 0.

  Args:
    hidden: [B, L, H]; targets, weights: [B, L].
    chunk: tokens per chunk, > 0.

  Returns:
    hidden [pieces, B, span, H], targets and weights [pieces, B, span].
  """
  batch, length = targets.shape
  span = -(-chunk // batch)
  pad = -length % span  # padded positions carry weight 0
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  pieces = (length + pad) // span
  split = functools.partial(_pieces, batch=batch, pieces=pieces, span=span)
  return split(hidden), split(targets), split(weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _token_sums(hidden, kernel, targets, weights, chunk):
  def one(xs):
    h, t, w = xs
    _, _, losses, correct = _chunk_stats(h, kernel, t)
    return weighted_sums(losses, correct, w)

  sums = jax.lax.map(one, split_chunks(hidden, targets, weights, chunk))
  return jax.tree.map(lambda x: x.sum(0), sums)


def _forward(hidden, kernel, targets, weights, chunk):
  """The sums and, per chunk, the gradients of the loss sum for a cotangent of 1."""
  length = targets.value.shape[1]
  want_hidden, want_kernel = hidden.perturbed, kernel.perturbed
  hidden, kernel, targets, weights = hidden.value, kernel.value, targets.value, weights.value

  def one(kernel_grad, xs):
    h, t, w = xs
    logits, lse, losses, correct = _chunk_stats(h, kernel, t)
    dlogits = logit_grads(logits, lse, jnp.arange(logits.shape[-1]) == t[..., None], w,
                          h.dtype)
    hidden_grad, kernel_grad = head_grads(h, kernel, dlogits, kernel_grad,
                                          want_hidden=want_hidden, want_kernel=want_kernel)
    return kernel_grad, (weighted_sums(losses, correct, w), hidden_grad, losses, correct)

  init = jnp.zeros(kernel.shape, jnp.float32) if want_kernel else None
  kernel_grad, (sums, hidden_grad, losses, correct) = jax.lax.scan(
      one, init, split_chunks(hidden, targets, weights, chunk))
  sums = jax.tree.map(lambda x: x.sum(0), sums)
  unsplit = lambda x: join_chunks(x)[:, :length]
  if want_kernel:  # summed in float32, kept in the kernel's dtype as autodiff would
    kernel_grad = kernel_grad.astype(kernel.dtype)
  residuals = (unsplit(hidden_grad) if want_hidden else None, kernel_grad, unsplit(losses),
               unsplit(correct))
  return sums, residuals


def backward(residuals, cotangents):
  """The backward rule of a fused token loss: the gradients saved by its forward rule
  scaled by the cotangent of the loss sum (the sum is linear in it).

  Args:
    residuals: (hidden_grad [B, L, H], kernel_grad [H, V], per-token losses [B, L],
      per-token correctness [B, L]); a gradient is None where its input takes none (the
      hidden states of a frozen body, a frozen head).
    cotangents: {"loss", "accuracy", "weight"}, symbolic zeros allowed.

  Returns:
    The cotangents of (hidden, kernel, targets, weights).
  """
  hidden_grad, kernel_grad, losses, correct = residuals
  g = cotangents["loss"]
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    g = jnp.zeros((), jnp.float32)
  scale = lambda x: (g * x.astype(jnp.float32)).astype(x.dtype)
  d_hidden, d_kernel = (None if x is None else scale(x) for x in (hidden_grad, kernel_grad))
  # Each weight multiplies its token's loss and correctness, and counts once.
  d_weights = g * losses
  for key, per_token in (("accuracy", correct), ("weight", 1.0)):
    if not isinstance(cotangents[key], jax.custom_derivatives.SymbolicZero):
      d_weights = d_weights + cotangents[key] * per_token
  return d_hidden, d_kernel, None, d_weights


_token_sums.defvjp(_forward, lambda chunk, residuals, cotangents: backward(residuals, cotangents),
                   symbolic_zeros=True)


def token_sums(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
               chunk: int) -> Sums:
  """Summed next-token cross-entropy and accuracy, `chunk` tokens of logits at a time,
  with the head's gradients formed in the forward pass (no logits recomputed).

  Equal (sums and gradients) to `ftjax.tasks.chunked_token_sums(hidden, unembed,
  targets, weights, chunk)` with `unembed = lambda h: (h @ kernel).astype(jnp.float32)`;
  chunks run along the sequence in the same way, so the batch dimension (split over
  devices) is never gathered.

  Args:
    hidden: [B, L, H] final hidden states (compute dtype).
    kernel: [H, V] unembedding kernel (compute dtype).
    targets: [B, L] int target ids.
    weights: [B, L] float weights (0 for tokens that do not count).
    chunk: tokens per chunk of logits, > 0 (callers score small batches at once).

  Returns:
    {"loss", "accuracy", "weight"}: float32 sums over the weighted tokens.
  """
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  return _token_sums(hidden, kernel, targets.astype(jnp.int32), weights.astype(jnp.float32),
                     chunk)

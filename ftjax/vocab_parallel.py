"""Vocabulary-parallel next-token cross-entropy with hand-written collectives.

When the unembedding kernel [H, V] is sharded along the vocabulary over a mesh
axis (normally "tensor") and the batch over the batch axes (normally
("data", "fsdp")), each device holds the logits of its own tokens for its own
vocabulary slice only. `token_sums` scores them inside `jax.shard_map` without
ever gathering the vocabulary: per chunk of tokens it combines the local
maxima (pmax), sums of exponentials (psum), target logits (psum, taken by the
shard that holds the target) and argmax candidates (pmin) across the vocabulary
axis, then adds the sums over the batch axes. The result equals
`ftjax.tasks.chunked_token_sums` with `unembed = lambda h: (h @ kernel).astype(jnp.float32)`.

Its gradient comes one of two ways (`loss_grad`, as `config.loss_grad`):
"recompute" differentiates the chunk loop, whose backward pass recomputes each
chunk's logits (four head matmuls); "fused" forms the head's gradients chunk by
chunk in the forward pass as `ftjax.fused_loss` does (three, two for a frozen
head), in one `jax.custom_vjp` around the whole `shard_map`: its forward rule runs
the sharded loop, then sums the hidden-state gradient over the vocabulary shards
(each holds the part of its slice) and the kernel gradient over the batch shards,
and its backward rule only scales them, so no cotangent crosses the `shard_map`
boundary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from ftjax import fused_loss

Sums = dict[str, jax.Array]


def applies(mesh: Mesh, vocab_axis: str, vocab_size: int) -> bool:
  """Whether the vocabulary-parallel loss should be used.

  Args:
    mesh: the device mesh.
    vocab_axis: the mesh axis that would shard the vocabulary.
    vocab_size: the number of vocabulary entries V.

  Returns:
    True when `vocab_axis` is an axis of `mesh` with more than one device whose
    size divides `vocab_size`.
  """
  if vocab_axis not in mesh.axis_names:
    return False
  size = mesh.shape[vocab_axis]
  return size > 1 and vocab_size % size == 0


def _check(mesh: Mesh, vocab_axis: str, batch_axes: tuple[str, ...], batch: int,
           vocab: int) -> None:
  """Raises ValueError when the mesh cannot shard the batch and vocabulary evenly."""
  names = tuple(mesh.axis_names)
  for axis in (vocab_axis, *batch_axes):
    if axis not in names:
      raise ValueError(f"mesh axis {axis!r} is not in the mesh axes {names}")
  if vocab_axis in batch_axes:
    raise ValueError(f"the vocabulary axis {vocab_axis!r} is also a batch axis {batch_axes}")
  vocab_size = mesh.shape[vocab_axis]
  if vocab % vocab_size:
    raise ValueError(f"vocabulary size {vocab} is not divisible by the {vocab_size} devices "
                     f"of mesh axis {vocab_axis!r}")
  batch_size = int(np.prod([mesh.shape[a] for a in batch_axes], dtype=np.int64))
  if batch % batch_size:
    raise ValueError(f"batch size {batch} is not divisible by the {batch_size} devices of "
                     f"mesh axes {batch_axes}")


def _local_stats(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                 vocab_axis: str) -> tuple[jax.Array, ...]:
  """One chunk of local tokens scored against every vocabulary shard.

  Args:
    hidden: [T, H] hidden states of this device's tokens.
    kernel: [H, V_local] this device's slice of the unembedding kernel.
    targets: [T] global target ids.
    vocab_axis: the mesh axis that shards the vocabulary.

  Returns:
    (float32 local logits [T, V_local], the global log-sum-exp [T], per-token losses [T],
    per-token correctness [T] (1.0 where the global argmax is the target), this shard's
    first vocabulary index).
  """
  logits = (hidden @ kernel).astype(jnp.float32)  # [T, V_local]
  local_vocab = logits.shape[-1]
  offset = jax.lax.axis_index(vocab_axis) * local_vocab

  local_max = jnp.max(logits, -1)
  # Only a numerical shift: the loss does not depend on it (and pmax has no derivative).
  shift = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(local_max), vocab_axis))
  lse = jnp.log(jax.lax.psum(jnp.exp(logits - shift[:, None]).sum(-1), vocab_axis)) + shift

  local_target = targets - offset
  held = (local_target >= 0) & (local_target < local_vocab)
  picked = jnp.take_along_axis(logits, jnp.clip(local_target, 0, local_vocab - 1)[:, None],
                               -1)[:, 0]
  losses = lse - jax.lax.psum(jnp.where(held, picked, 0.0), vocab_axis)

  # The global argmax: the first index among the shards whose maximum is the global one.
  candidate = jnp.where(jax.lax.stop_gradient(local_max) == shift,
                        offset + jnp.argmax(jax.lax.stop_gradient(logits), -1),
                        jnp.iinfo(jnp.int32).max)
  prediction = jax.lax.pmin(candidate.astype(jnp.int32), vocab_axis)
  return logits, lse, losses, (prediction == targets).astype(jnp.float32), offset


def _local_tokens(hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                  chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This device's tokens as chunks: hidden [C, chunk, H], targets and weights
  [C, chunk], padded with weight-0 tokens; one chunk of all tokens when `chunk` <= 0 or
  holds them all."""
  hidden = hidden.reshape(-1, hidden.shape[-1])
  targets = targets.reshape(-1).astype(jnp.int32)
  weights = weights.reshape(-1).astype(jnp.float32)
  tokens = hidden.shape[0]
  chunk = tokens if chunk <= 0 or chunk >= tokens else chunk
  pad = -tokens % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
  return (hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk),
          weights.reshape(-1, chunk))


class _Placement(NamedTuple):
  """How the loss is laid out over the mesh (hashable: a custom VJP's static argument)."""

  mesh: Mesh
  vocab_axis: str
  batch_axes: tuple[str, ...]
  chunk: int

  def in_specs(self) -> tuple[P, ...]:
    """hidden, kernel, targets, weights."""
    batch = P(self.batch_axes or None)
    return batch, P(None, self.vocab_axis), batch, batch


def _recomputed_sums(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                     weights: jax.Array, placement: _Placement) -> Sums:
  """The sums, differentiable by autodiff: each chunk under `jax.checkpoint`."""
  vocab_axis, batch_axes = placement.vocab_axis, placement.batch_axes

  def local(hidden, kernel, targets, weights):
    def one(xs):
      h, t, w = xs
      _, _, losses, correct, _ = _local_stats(h, kernel, t, vocab_axis)
      return fused_loss.weighted_sums(losses, correct, w)

    chunks = _local_tokens(hidden, targets, weights, placement.chunk)
    if chunks[0].shape[0] == 1:  # one chunk: nothing to recompute
      sums = one(jax.tree.map(lambda x: x[0], chunks))
    else:  # the backward pass recomputes a chunk's logits instead of storing them
      sums = jax.tree.map(lambda x: x.sum(0), jax.lax.map(jax.checkpoint(one), chunks))
    return jax.lax.psum(sums, batch_axes) if batch_axes else sums

  return jax.shard_map(local, mesh=placement.mesh, in_specs=placement.in_specs(),
                       out_specs=P())(hidden, kernel, targets, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_sums(hidden, kernel, targets, weights, placement: _Placement) -> Sums:
  return _recomputed_sums(hidden, kernel, targets, weights, placement)


def _fused_forward(hidden, kernel, targets, weights, placement: _Placement):
  """The sums and the gradients of the loss sum for a cotangent of 1, formed chunk by
  chunk in one sharded loop."""
  want_hidden, want_kernel = hidden.perturbed, kernel.perturbed
  vocab_axis, batch_axes = placement.vocab_axis, placement.batch_axes

  def local(hidden, kernel, targets, weights):
    def one(kernel_grad, xs):
      h, t, w = xs
      logits, lse, losses, correct, offset = _local_stats(h, kernel, t, vocab_axis)
      onehot = offset + jnp.arange(logits.shape[-1]) == t[:, None]
      dlogits = fused_loss.logit_grads(logits, lse, onehot, w, h.dtype)
      hidden_grad, kernel_grad = fused_loss.head_grads(
          h, kernel, dlogits, kernel_grad, want_hidden=want_hidden, want_kernel=want_kernel)
      return kernel_grad, (fused_loss.weighted_sums(losses, correct, w), hidden_grad, losses,
                           correct)

    # The kernel gradient varies over every axis the tokens and the vocabulary do.
    init = (jax.lax.pcast(jnp.zeros(kernel.shape, jnp.float32), (*batch_axes, vocab_axis),
                          to="varying") if want_kernel else None)
    kernel_grad, (sums, hidden_grad, losses, correct) = jax.lax.scan(
        one, init, _local_tokens(hidden, targets, weights, placement.chunk))
    tokens = targets.size
    per_token = lambda x: x.reshape(-1)[:tokens].reshape(targets.shape)
    sums = jax.tree.map(lambda x: x.sum(0), sums)
    if batch_axes:
      sums = jax.lax.psum(sums, batch_axes)
    outputs = (sums, per_token(losses), per_token(correct))
    # The hidden states are the same on every vocabulary shard, which each hold the part
    # of the gradient from their slice; the kernel is the same on every batch shard.
    if want_hidden:
      outputs += (jax.lax.psum(hidden_grad.reshape(-1, hidden.shape[-1])[:tokens],
                               vocab_axis).reshape(hidden.shape),)
    if want_kernel:
      if batch_axes:
        kernel_grad = jax.lax.psum(kernel_grad, batch_axes)
      outputs += (kernel_grad.astype(kernel.dtype),)  # as autodiff keeps it
    return outputs

  batch, vocab = placement.in_specs()[:2]
  out_specs = ((P(), batch, batch) + ((batch,) if want_hidden else ())
               + ((vocab,) if want_kernel else ()))
  sums, losses, correct, *grads = jax.shard_map(
      local, mesh=placement.mesh, in_specs=placement.in_specs(), out_specs=out_specs)(
          hidden.value, kernel.value, targets.value, weights.value)
  hidden_grad = grads.pop(0) if want_hidden else None
  kernel_grad = grads.pop(0) if want_kernel else None
  return sums, (hidden_grad, kernel_grad, losses, correct)


_fused_sums.defvjp(_fused_forward,
                   lambda placement, residuals, cotangents: fused_loss.backward(residuals,
                                                                                cotangents),
                   symbolic_zeros=True)


def token_sums(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, *,
               mesh: Mesh, vocab_axis: str = "tensor",
               batch_axes: Sequence[str] = ("data", "fsdp"), chunk: int = 1024,
               loss_grad: str = "fused") -> Sums:
  """Summed next-token cross-entropy and accuracy with a vocabulary-sharded unembedding.

  Equal to `ftjax.tasks.chunked_token_sums(hidden, unembed, targets, weights, chunk)`
  with `unembed = lambda h: (h @ kernel).astype(jnp.float32)`, but each device
  computes the logits of its batch shard for its vocabulary slice only, `chunk`
  of its tokens at a time.

  Args:
    hidden: [B, L, H] final hidden states (compute dtype), batch sharded over `batch_axes`.
    kernel: [H, V] unembedding kernel (compute dtype), vocabulary sharded over `vocab_axis`.
    targets: [B, L] int32 target ids.
    weights: [B, L] float token weights (0 for tokens that do not count).
    mesh: the device mesh.
    vocab_axis: the mesh axis that shards the vocabulary.
    batch_axes: the mesh axes that shard the batch.
    chunk: local tokens per chunk of logits; <= 0 scores all local tokens at once.
    loss_grad: "fused" (the head's gradients formed in the forward pass) or
      "recompute" (the backward pass recomputes each chunk's logits).

  Returns:
    {"loss", "accuracy", "weight"}: float32 scalar sums over all weighted tokens,
    replicated on every device.

  Raises:
    ValueError: if an axis is missing from the mesh, V is not divisible by the
      size of `vocab_axis`, B by the product of the sizes of `batch_axes`, or for
      another `loss_grad`.
  """
  batch_axes = tuple(batch_axes)
  _check(mesh, vocab_axis, batch_axes, hidden.shape[0], kernel.shape[-1])
  if loss_grad not in ("fused", "recompute"):
    raise ValueError(f"loss_grad must be 'fused' or 'recompute', got {loss_grad!r}")
  placement = _Placement(mesh, vocab_axis, batch_axes, chunk)
  sums = _fused_sums if loss_grad == "fused" else _recomputed_sums
  return sums(hidden, kernel, targets.astype(jnp.int32), weights.astype(jnp.float32),
              placement)

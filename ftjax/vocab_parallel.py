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
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

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


def _local_sums(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
                vocab_axis: str) -> Sums:
  """Sums over one chunk of local tokens, combined across the vocabulary shards.

  Args:
    hidden: [T, H] hidden states of this device's tokens.
    kernel: [H, V_local] this device's slice of the unembedding kernel.
    targets: [T] global target ids.
    weights: [T] float32 token weights.
    vocab_axis: the mesh axis that shards the vocabulary.

  Returns:
    {"loss", "accuracy", "weight"}: sums over the chunk's weighted tokens, the
    same on every device of `vocab_axis`.
  """
  logits = (hidden @ kernel).astype(jnp.float32)  # [T, V_local]
  local_vocab = logits.shape[-1]
  offset = jax.lax.axis_index(vocab_axis) * local_vocab

  local_max = jnp.max(logits, -1)
  # Only a numerical shift: the loss does not depend on it (and pmax has no derivative).
  shift = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(local_max), vocab_axis))
  sum_exp = jax.lax.psum(jnp.exp(logits - shift[:, None]).sum(-1), vocab_axis)

  local_target = targets - offset
  held = (local_target >= 0) & (local_target < local_vocab)
  picked = jnp.take_along_axis(logits, jnp.clip(local_target, 0, local_vocab - 1)[:, None],
                               -1)[:, 0]
  target_logit = jax.lax.psum(jnp.where(held, picked, 0.0), vocab_axis)
  losses = jnp.log(sum_exp) + shift - target_logit

  # The global argmax: the first index among the shards whose maximum is the global one.
  candidate = jnp.where(jax.lax.stop_gradient(local_max) == shift,
                        offset + jnp.argmax(jax.lax.stop_gradient(logits), -1),
                        jnp.iinfo(jnp.int32).max)
  prediction = jax.lax.pmin(candidate.astype(jnp.int32), vocab_axis)
  correct = (prediction == targets).astype(jnp.float32)
  return {"loss": (losses * weights).sum(), "accuracy": (correct * weights).sum(),
          "weight": weights.sum()}


def token_sums(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, *,
               mesh: Mesh, vocab_axis: str = "tensor",
               batch_axes: Sequence[str] = ("data", "fsdp"), chunk: int = 1024) -> Sums:
  """Summed next-token cross-entropy and accuracy with a vocabulary-sharded unembedding.

  Equal to `ftjax.tasks.chunked_token_sums(hidden, unembed, targets, weights, chunk)`
  with `unembed = lambda h: (h @ kernel).astype(jnp.float32)`, but each device
  computes the logits of its batch shard for its vocabulary slice only, `chunk`
  of its tokens at a time under `jax.checkpoint`.

  Args:
    hidden: [B, L, H] final hidden states (compute dtype), batch sharded over `batch_axes`.
    kernel: [H, V] unembedding kernel (compute dtype), vocabulary sharded over `vocab_axis`.
    targets: [B, L] int32 target ids.
    weights: [B, L] float token weights (0 for tokens that do not count).
    mesh: the device mesh.
    vocab_axis: the mesh axis that shards the vocabulary.
    batch_axes: the mesh axes that shard the batch.
    chunk: local tokens per chunk of logits; <= 0 scores all local tokens at once.

  Returns:
    {"loss", "accuracy", "weight"}: float32 scalar sums over all weighted tokens,
    replicated on every device.

  Raises:
    ValueError: if an axis is missing from the mesh, V is not divisible by the
      size of `vocab_axis`, or B by the product of the sizes of `batch_axes`.
  """
  batch_axes = tuple(batch_axes)
  _check(mesh, vocab_axis, batch_axes, hidden.shape[0], kernel.shape[-1])
  batch_spec = P(batch_axes or None)

  def local(hidden, kernel, targets, weights):
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).astype(jnp.int32)
    weights = weights.reshape(-1).astype(jnp.float32)
    tokens = hidden.shape[0]
    if chunk <= 0 or chunk >= tokens:
      sums = _local_sums(hidden, kernel, targets, weights, vocab_axis)
    else:
      pad = -tokens % chunk  # padded tokens carry weight 0
      if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
      chunks = (hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk),
                weights.reshape(-1, chunk))

      @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of storing them
      def one(xs):
        h, t, w = xs
        return _local_sums(h, kernel, t, w, vocab_axis)

      sums = jax.tree.map(lambda x: x.sum(0), jax.lax.map(one, chunks))
    if batch_axes:
      sums = jax.lax.psum(sums, batch_axes)
    return sums

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(batch_spec, P(None, vocab_axis), batch_spec, batch_spec),
      out_specs=P())(hidden, kernel, targets, weights)

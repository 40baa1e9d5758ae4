"""Bucketed padding: each batch cut to the shortest of a few lengths that holds its rows.

Texts are tokenized (and language-model rows packed) to `config.data.max_length`
tokens; most batches need fewer. Before a batch goes to the device its token
arrays are cut to the shortest bucket length (`config.data.buckets`) that holds
its longest real row, so attention and the feed-forward layers skip most of the
padding, while the jitted steps see only a few shapes, each compiled once.

Token arrays hold their tokens on the last axis ([B, L], or [B, 2, L] for
preference pairs). A row's real length is one past its last token that the attention mask (or, for
packed rows, the segment ids) marks real; everything after it is padding, which
the models never attend to, so the outputs on a row do not depend on the cut.
The bucket is a function of the global batch alone: with several processes each
one's longest row is gathered and the maximum taken, so every process cuts its
share to the same length, and a resumed run cuts each batch as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from ftjax.errors import ConfigError

# The per-token arrays of a batch (`registry.batch_spec`): tokenized texts and packed
# language-model rows. Which of them marks real tokens (nonzero), first found wins.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "targets", "loss_mask",
                 "positions", "segment_ids")
_REAL_TOKENS = ("attention_mask", "segment_ids")
# The default ("auto"): `_MAX_BUCKETS` lengths, quarters of max_length rounded up to a
# multiple of `_ALIGN` tokens (which suits accelerators' tiles). Each length costs a compile
# of each step (on a 2-core CPU about as long as 15 MiniLM training steps at 64 tokens):
# eighths would pad the demo's batches to 56 tokens on average instead of quarters' 60, but
# compile twice as many steps.
_ALIGN = 8
_MAX_BUCKETS = 4


def lengths(setting: str, max_length: int) -> tuple[int, ...]:
  """The bucket lengths of `config.data.buckets`, ascending, the last `max_length`.

  Args:
    setting: "auto" (the multiples of max_length / 4 rounded up to a multiple of
      8 tokens, up to max_length: 16, 32, 48, 64 at 64), "off" (only
      max_length: one shape) or comma-separated lengths ("32,48"; max_length is
      added).
    max_length: `config.data.max_length`.

  Raises:
    ConfigError: a setting that is none of these, or a length outside (0, max_length].
  """
  setting = setting.strip()
  if setting == "off":
    return (max_length,)
  if setting == "auto":
    step = max(_ALIGN, -(-max_length // (_MAX_BUCKETS * _ALIGN)) * _ALIGN)
    return tuple(range(step, max_length, step)) + (max_length,)
  try:
    chosen = [int(part) for part in setting.split(",") if part.strip()]
  except ValueError:
    chosen = []
  if not chosen or any(not 0 < n <= max_length for n in chosen):
    raise ConfigError(f"config.data.buckets={setting!r}: 'auto', 'off' or comma-separated "
                      f"lengths in [1, config.data.max_length={max_length}] (e.g. '32,48')")
  return tuple(sorted(set(chosen) | {max_length}))


def setting_problem(value: str) -> str:
  """The schema rule of `config.data.buckets` (its form; lengths are checked against
  `max_length` by `lengths`)."""
  value = value.strip()
  if value in ("auto", "off") or all(p.strip().isdigit() for p in value.split(",")):
    return ""
  return "must be 'auto', 'off' or comma-separated lengths (e.g. '32,48')"


def real_length(batch: dict[str, np.ndarray]) -> int | None:
  """One past the last real token of the longest row of `batch`; None for a batch
  without token arrays (images)."""
  for key in _REAL_TOKENS:
    if key in batch:
      real = np.asarray(batch[key]) != 0
      if not real.size:
        return 0
      real = real.reshape(-1, real.shape[-1])  # pairs' [B, 2, L]: each sequence a row
      last = real.shape[1] - np.argmax(real[:, ::-1], axis=1)
      return int(np.max(np.where(real.any(axis=1), last, 0)))
  return None


def agreed(length: int) -> int:
  """The longest of every process's `length` (each sees only its rows of a global batch)."""
  if jax.process_count() == 1:
    return length
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with jax.transfer_guard("allow"):  # a scalar to and from the devices, on purpose
    return int(np.max(multihost_utils.process_allgather(np.int32(length))))


class Bucketing:
  """Cuts batches to the shortest bucket holding their longest row (`__call__`)."""

  def __init__(self, bucket_lengths: Sequence[int]):
    self.lengths = tuple(bucket_lengths)

  def length_for(self, needed: int) -> int:
    """The shortest bucket of at least `needed` tokens (the longest when none is)."""
    return next((n for n in self.lengths if n >= needed), self.lengths[-1])

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` with its token arrays cut to the bucket of its global batch's longest row.

    Every process must call this for each global batch (a collective with several).
    """
    needed = real_length(batch)
    if needed is None or len(self.lengths) == 1:
      return batch
    length = self.length_for(agreed(needed))
    return {key: value[..., :length] if key in SEQUENCE_KEYS else value
            for key, value in batch.items()}


def at_length(batch_spec: dict[str, tuple[tuple[int, ...], object]], length: int | None
              ) -> dict[str, tuple[tuple[int, ...], object]]:
  """`batch_spec` with its token arrays `length` long (None: as it is)."""
  if length is None:
    return dict(batch_spec)
  return {key: (shape[:-1] + (length,), dtype) if key in SEQUENCE_KEYS else (shape, dtype)
          for key, (shape, dtype) in batch_spec.items()}


def batch_shape(batch: dict[str, object]) -> tuple[int, int] | None:
  """(rows, length) of a batch's token arrays (arrays or shapes); None without them."""
  key = next((k for k in SEQUENCE_KEYS if k in batch), None)
  return None if key is None else (batch[key].shape[0], batch[key].shape[-1])

"""Packed classification batches: a batch's texts laid end to end in rows, no padding.

A batch of B tokenized texts ([B, max_length] token arrays, most of each row padding)
becomes a few rows of `max_length` tokens, each holding whole texts one after another
(first-fit decreasing by length), at most `SLOTS` texts per row. Per token, `segment_ids`
numbers the texts of its row from 1 (0: padding) and `positions` counts from 0 within
each text; the model attends only within a text and numbers positions per text, so each
text's outputs are those of the padded batch (up to the order of float sums), and it
pools each text's tokens into its slot. What belongs to a text rather than its tokens
(`label`, `mask`, a multi-task run's `task`) moves to the text's slot: [rows, SLOTS],
`mask` False on empty slots.

The rows a batch needs vary a little from batch to batch (with the sum of its texts'
lengths); they are rounded up to the next of a few row counts, the multiples of an
eighth of the batch from the one that all but a tenth of the batches need (`fewest_rows`,
on a sample of the training texts), so the steps see few shapes. With several processes
each packs its own texts and the largest count is taken. The layout is a function of the
batch and of how it is split (processes, devices on the batch axes, micro-batches): a run
resumed on the same mesh packs each batch as before; on another mesh, dropout masks are
drawn for another layout (without dropout the results agree).

Tokens computed per batch fall from B * max_length (or B times the longest text, padding
each batch to its longest) to about the batch's real tokens, rounded up to whole rows.
Attention is computed over whole rows (masked to each text), which costs more than
attention over each text alone where rows are long and texts short. Models that read
packed batches: `ftjax.models.READS_PACKED`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ftjax.data import buckets
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import ConfigError

SETTINGS = ("auto", "on", "off")
# Data kinds whose examples `ftjax.data.lm` packs into rows of max_length tokens anyway.
LANGUAGE_MODEL_KINDS = ("chat", "text", "preference")
# Texts per row at most: the width of the per-text arrays ([rows, SLOTS]).
SLOTS = 16
# The per-token arrays a packed batch adds: the text of each token, its place in the text.
PACKED_KEYS = ("segment_ids", "positions")
# Row counts: the multiples of the batch's rows / _ROW_STEPS, from the one that holds the
# batches needing the fewest rows but for `_RARE_PERCENT` (estimated on `_DRAWS` batches
# of a sample of the texts): a batch needing fewer rows is padded to it rather than
# compiling the steps again for a shape few batches have.
_ROW_STEPS = 8
_RARE_PERCENT = 10
_DRAWS = 32


def enabled(setting: str, kind: str, model_name: str, reads_packed: bool) -> bool:
  """Whether a run packs its batches (`config.data.packing`).

  Args:
    setting: "auto" (pack where the data and the model allow), "on" or "off".
    kind: the data kind (`ftjax.data.inputs.Inputs.kind`): only text classification
      packs.
    model_name: the resolved `config.model.name`, for the error.
    reads_packed: whether that model reads packed batches.

  Raises:
    ConfigError: "on" for data or a model that cannot be packed.
  """
  if setting not in SETTINGS:
    raise ConfigError(f"config.data.packing={setting!r}: choose from {list(SETTINGS)}")
  packs = kind == "classification" and reads_packed
  if setting == "on" and not packs:
    why = (f"config.model.name={model_name!r} does not read packed batches"
           if kind == "classification" else f"{kind} data is not text classification"
           + (" (language-model rows are packed anyway)" if kind in LANGUAGE_MODEL_KINDS
              else ""))
    raise ConfigError(f"config.data.packing='on': {why}; packing applies to text "
                      "classification with BERT-family encoders (bert, distilbert, electra, "
                      "roberta, xlm-roberta) and ModernBERT; use 'auto' or 'off'")
  return setting != "off" and packs


def batch_spec(spec: dict[str, tuple[tuple[int, ...], Any]]
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """A classification `batch_spec` (`ftjax.data.registry.batch_spec`), packed: the
  token arrays as they are plus `PACKED_KEYS`, every per-text array a row of `SLOTS`."""
  token_shape = spec["input_ids"][0]
  packed = {key: ((*shape, SLOTS) if key not in buckets.SEQUENCE_KEYS else shape, dtype)
            for key, (shape, dtype) in spec.items()}
  packed.update({key: (token_shape, np.int32) for key in PACKED_KEYS})
  return packed


def text_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Each text's tokens: one past its last real token (the attention mask)."""
  real = np.asarray(batch["attention_mask"]) != 0
  return np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)


def place(lengths: np.ndarray, row_length: int, slots: int = SLOTS
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """First-fit decreasing: (row, slot, offset) of each text of `lengths` tokens in rows
  of `row_length` tokens holding at most `slots` texts each. Texts of length 0 (masked
  out) are placed nowhere (row -1)."""
  row = np.full(len(lengths), -1, np.int64)
  slot, offset = np.zeros_like(row), np.zeros_like(row)
  used: list[int] = []  # tokens taken in each row
  count: list[int] = []  # texts in each row
  for i in np.argsort(-lengths, kind="stable"):
    if lengths[i] == 0:
      break
    r = next((r for r, n in enumerate(used)
              if n + lengths[i] <= row_length and count[r] < slots), len(used))
    if r == len(used):
      used.append(0)
      count.append(0)
    row[i], slot[i], offset[i] = r, count[r], used[r]
    used[r] += int(lengths[i])
    count[r] += 1
  return row, slot, offset


def pack(batch: dict[str, np.ndarray],
         rows_for: Callable[[int], int] = lambda needed: needed) -> dict[str, np.ndarray]:
  """A tokenized classification batch (with its `mask`) packed into `rows_for(needed)`
  rows, `needed` being the rows its texts take (by default, just those). Texts with mask
  False are left out; a text without a real token still takes a slot (and one token), so
  it counts as in a padded batch.

  Raises:
    ValueError: when the texts need more rows than `rows_for` gives.
  """
  row_length = batch["input_ids"].shape[1]
  lengths = np.maximum(text_lengths(batch), 1) * np.asarray(batch["mask"], bool)
  row, slot, offset = place(lengths, row_length)
  needed = int(row.max()) + 1 if len(row) else 0
  rows = rows_for(needed)
  if needed > rows:
    raise ValueError(f"the batch's texts need {needed} rows of {row_length} tokens, not {rows}")
  token_keys = [key for key in tokenizer_lib.OUTPUT_KEYS if key in batch]
  out = {key: np.zeros((rows, row_length), batch[key].dtype) for key in token_keys}
  out.update({key: np.zeros((rows, row_length), np.int32) for key in PACKED_KEYS})
  for key, value in batch.items():
    if key not in token_keys:
      out[key] = np.zeros((rows, SLOTS, *value.shape[1:]), value.dtype)
  for i in np.flatnonzero(row >= 0):
    r, s, o, n = row[i], slot[i], offset[i], lengths[i]
    for key in token_keys:
      out[key][r, o:o + n] = batch[key][i, :n]
    out["segment_ids"][r, o:o + n] = (s + 1) * (batch["attention_mask"][i, :n] != 0)
    out["positions"][r, o:o + n] = np.arange(n)
    for key, value in batch.items():
      if key not in token_keys:
        out[key][r, s] = value[i]
  return out


def fewest_rows(lengths: np.ndarray, batch_size: int, row_length: int, seed: int = 0) -> int:
  """The rows that all but `_RARE_PERCENT`% of random batches of `batch_size` texts need at
  least, the texts drawn from a sample of their `lengths`."""
  rng = np.random.default_rng(seed)
  needed = [place(rng.choice(lengths, batch_size), row_length)[0].max() + 1
            for _ in range(_DRAWS)] if len(lengths) else [0]
  return int(np.percentile(needed, _RARE_PERCENT))


class Packing:
  """Packs batches into the fewest rows of a few row counts (`__call__`)."""

  def __init__(self, batch_size: int, multiple: int = 1, fewest: int = 0):
    """
    Args:
      batch_size: this process's texts per batch (at most one row each).
      multiple: row counts are multiples of it (the process's batch shards, times the
        micro-batches of gradient accumulation).
      fewest: the smallest row count used is the first holding this many rows
        (`fewest_rows`).
    """
    step = -(-max(1, -(-batch_size // _ROW_STEPS)) // multiple) * multiple
    last = -(-batch_size // multiple) * multiple
    counts = tuple(range(step, last, step)) + (last,)
    self.row_counts = counts[next(i for i, n in enumerate(counts) if n >= min(fewest, last)):]

  def rows_for(self, needed: int) -> int:
    """The fewest rows of `row_counts` holding `needed`."""
    return next((n for n in self.row_counts if n >= needed), self.row_counts[-1])

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` packed into its global batch's row count.

    Every process must call this for each global batch (a collective with several).
    """
    return pack(batch, lambda needed: self.rows_for(buckets.agreed(needed)))

"""Preference pairs tokenized for a model: pair rows for a language model, text pairs
for a reward model.

A pair (`ftjax.data.file_preference`) is a prompt with a chosen and a rejected
completion. For a language model (preference tuning: DPO and its variants) each
pair becomes one row of two sequences, [chosen, rejected], each the prompt
followed by that completion, tokenized as TRL tokenizes them: a conversation is
rendered with the model's chat template (the prompt with the assistant's
generation prompt, then prompt + completion, the completion starting where the
two token sequences part), a string completion gets the end-of-sequence token
appended when it lacks one. Each sequence carries the arrays of a packed row
(`ftjax.data.lm.ROW_KEYS`), so a batch of B pairs is a batch of 2B language-model
rows; `loss_mask` marks the completion's targets. A row also holds its
`pair_index` and `ref_logps` [2], the reference model's log-probabilities of the
two completions (filled by `ftjax.reference` before training when the loss needs
them).

A sequence longer than `max_length` keeps its start (TRL's `keep_start`) unless
`config.data.overlong` is "skip" or "error"; a pair whose prompt alone fills
`max_length` is dropped (nothing of a completion would be left). Both are counted
and reported by the data check, as are pairs whose chosen and rejected are
identical (they carry no preference).

For a reward model (a sequence classifier with one output) a pair stays text:
each side is the pair (prompt, completion) for the model's tokenizer, or for a
conversation the text its chat template renders of prompt + completion; batches
hold the tokenizer's arrays as [B, 2, L].
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ftjax.data import file_preference, lm, pipeline
from ftjax.data.tokenizer import TextTokenizer
from ftjax.errors import DataError

@dataclasses.dataclass
class PairStats:
  """What tokenizing a split's pairs did; every number counts pairs or tokens."""

  row_length: int
  pairs: int = 0
  rows: int = 0
  identical: int = 0           # chosen == rejected: no preference to learn
  truncated: int = 0           # pairs with a side cut to max_length
  skipped_overlong: int = 0    # overlong pairs skipped (overlong="skip")
  skipped_prompt: int = 0      # the prompt alone fills max_length
  prompt_mismatch: int = 0     # the prompt's tokens are not a prefix of prompt + completion
  lengths: list[int] = dataclasses.field(default_factory=list, repr=False)  # longer side

  def summary(self, name: str) -> str:
    parts = [f"{name}: {self.pairs} pairs -> {self.rows} rows of 2 x {self.row_length} tokens"]
    if self.lengths:
      parts.append(f"tokens per sequence: median {int(np.median(self.lengths))}, "
                   f"max {max(self.lengths)}")
    for key in ("identical", "truncated", "skipped_overlong", "skipped_prompt",
                "prompt_mismatch"):
      if getattr(self, key):
        parts.append(f"{key.replace('_', ' ')}: {getattr(self, key)}")
    return "; ".join(parts)


def decode_pair(example: dict[str, Any]) -> dict[str, Any]:
  """The prompt, chosen and rejected of a prepared example (JSON text each)."""
  return {side: json.loads(lm.decode_text(example[side]))
          for side in ("prompt", "chosen", "rejected")}


class PairTokenizer:
  """Token ids of a pair's prompt and completions (module docstring), as TRL makes them."""

  def __init__(self, tokenizer: Any, formatter: lm.ChatFormatter | None):
    """`formatter` renders conversations (None: the data must be strings)."""
    self._tokenizer, self._formatter = tokenizer, formatter

  def encode(self, pair: dict[str, Any], where: str
             ) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, chosen ids, rejected ids, whether the prompt's tokens were a prefix
    of both prompt + completion sequences)."""
    prompt = pair["prompt"]
    if isinstance(prompt, str):
      eos = self._tokenizer.eos_token or ""
      ends = lambda text: text if text.endswith(eos) else text + eos
      prompt_ids = self._tokenizer(prompt)["input_ids"]
      full = [self._tokenizer(prompt + ends(pair[side]))["input_ids"]
              for side in ("chosen", "rejected")]
    else:
      if self._formatter is None:
        raise DataError(f"{where}: conversations need a chat template")
      prompt_ids = self._formatter.prompt_ids(prompt)
      full = [self._formatter.conversation_ids(prompt + pair[side], where)
              for side in ("chosen", "rejected")]
    shared = min(file_preference.common_length(prompt_ids, ids) for ids in full)
    return (list(prompt_ids[:shared]), list(full[0][shared:]), list(full[1][shared:]),
            shared == len(prompt_ids))


class PairRows(lm.PackedRows):
  """Tokenized pairs as a random-access source: row i is {key: array [2, L]} for the
  `lm.ROW_KEYS`, with its `pair_index` and `ref_logps` [2]; `stats` is a `PairStats`."""

  def set_reference(self, logps: np.ndarray) -> None:
    """The reference log-probabilities [N, 2] of the chosen and rejected completions."""
    if logps.shape != self.arrays["ref_logps"].shape:
      raise ValueError(f"reference log-probabilities of shape {logps.shape}; expected "
                       f"{self.arrays['ref_logps'].shape}")
    self.arrays["ref_logps"] = logps.astype(np.float32)


def _sequence(prompt: list[int], completion: list[int], length: int, pad_id: int
              ) -> dict[str, np.ndarray]:
  """One side's row arrays: prompt + completion (cut to `length`), padded."""
  ids = np.asarray((prompt + completion)[:length], np.int32)
  n = len(ids)
  row = {"input_ids": np.full(length, pad_id, np.int32),
         "targets": np.full(length, pad_id, np.int32),
         "loss_mask": np.zeros(length, bool),
         "positions": np.zeros(length, np.int32),
         "segment_ids": np.zeros(length, np.int32)}
  row["input_ids"][:n] = ids
  row["targets"][:n - 1] = ids[1:]
  row["loss_mask"][max(len(prompt) - 1, 0):n - 1] = True  # targets that are completion tokens
  row["positions"][:n] = np.arange(n)
  row["segment_ids"][:n] = 1
  return row


def tokenize_pairs(source: Sequence[dict[str, Any]], tokenizer: PairTokenizer, *,
                   max_length: int, pad_id: int, overlong: str = "truncate") -> PairRows:
  """Tokenizes the pairs of `source` (prepared examples) into pair rows, in order.

  Args:
    source: random-access examples {"id", "prompt", "chosen", "rejected"}.
    tokenizer: the pair tokenizer of the model.
    max_length: tokens per sequence.
    pad_id: the id written into padding slots.
    overlong: for a sequence longer than `max_length`: "error" raises, "skip" drops
      the pair, anything else ("truncate", or the chat default "split": a pair
      cannot be split) keeps its start.

  Returns:
    The rows, with their `PairStats`.
  """
  stats, rows = PairStats(max_length), []
  for index in range(len(source)):
    example = source[index]
    where = f"pair {lm.decode_text(example.get('id', index))}"
    pair = decode_pair(example)
    stats.pairs += 1
    stats.identical += pair["chosen"] == pair["rejected"]
    prompt, chosen, rejected, prefix = tokenizer.encode(pair, where)
    stats.prompt_mismatch += not prefix
    longest = len(prompt) + max(len(chosen), len(rejected))
    stats.lengths.append(longest)
    if len(prompt) >= max_length:
      stats.skipped_prompt += 1
      continue
    if longest > max_length:
      if overlong == "error":
        raise DataError(f"{where}: {longest} tokens, more than "
                        f"config.data.max_length={max_length}")
      if overlong == "skip":
        stats.skipped_overlong += 1
        continue
      stats.truncated += 1
    sides = [_sequence(prompt, completion, max_length, pad_id)
             for completion in (chosen, rejected)]
    rows.append({key: np.stack([side[key] for side in sides]) for key in lm.ROW_KEYS})
  stats.rows = len(rows)
  if not rows:
    raise DataError(f"no pair left to train on: {stats.summary('split')}")
  arrays = {key: np.stack([row[key] for row in rows]) for key in lm.ROW_KEYS}
  arrays["pair_index"] = np.arange(len(rows), dtype=np.int32)
  arrays["ref_logps"] = np.zeros((len(rows), 2), np.float32)
  return PairRows(arrays, stats)


Render = Callable[[list[dict[str, Any]]], str]


def _reward_texts(pairs: list[dict[str, Any]], side: str, render: Render
                  ) -> list[tuple[list[int], list[str], list[str] | None]]:
  """One side of each pair for a reward model, in groups the tokenizer takes at once:
  (rows, texts, second texts) of the string pairs (the text pair (prompt,
  completion)) and (rows, texts, None) of the conversations (prompt + completion
  rendered by the chat template as one text)."""
  strings = [i for i, pair in enumerate(pairs) if isinstance(pair[side], str)]
  talks = [i for i, pair in enumerate(pairs) if not isinstance(pair[side], str)]
  groups = []
  if strings:
    groups.append((strings, [pairs[i]["prompt"] for i in strings],
                   [pairs[i][side] for i in strings]))
  if talks:
    groups.append((talks, [render(pairs[i]["prompt"] + pairs[i][side]) for i in talks], None))
  return groups


def _in_pair_order(groups: list[tuple[list[int], Any, Any]], values: list[Any]) -> np.ndarray:
  """Each group's `values` (leading axis: its rows) put back in the pairs' order."""
  order = np.argsort(np.concatenate([np.asarray(rows, np.int64) for rows, _, _ in groups]))
  return np.concatenate([np.asarray(v) for v in values])[order]


def reward_stats(source: Sequence[dict[str, Any]], tokenizer: TextTokenizer,
                 render: Render) -> PairStats:
  """What a reward model's tokenizer makes of a split's pairs (identical sides, each
  side's token count, those longer than `max_length`)."""
  stats = PairStats(tokenizer.max_length)
  for start in range(0, len(source), 512):
    pairs = [decode_pair(source[i]) for i in range(start, min(start + 512, len(source)))]
    counts = []
    for side in ("chosen", "rejected"):
      groups = _reward_texts(pairs, side, render)
      counts.append(_in_pair_order(groups, [tokenizer.token_counts(texts, seconds)
                                            for _, texts, seconds in groups]))
    for pair, chosen, rejected in zip(pairs, *counts):
      longest = int(max(chosen, rejected))
      stats.pairs += 1
      stats.identical += pair["chosen"] == pair["rejected"]
      stats.lengths.append(longest)
      stats.truncated += longest > tokenizer.max_length
  stats.rows = stats.pairs
  return stats


def reward_preprocess(tokenizer: TextTokenizer, render: Render) -> pipeline.Preprocess:
  """A preprocess of pairs for a reward model: each side of a string pair tokenized as the
  text pair (prompt, completion), of a conversation as the text `render` makes of
  prompt + completion (the chat template); arrays [B, 2, L]."""

  def preprocess(batch: pipeline.Batch) -> pipeline.Batch:
    pairs = [decode_pair({side: batch[side][i] for side in ("prompt", "chosen", "rejected")})
             for i in range(len(batch["prompt"]))]
    sides = []
    for side in ("chosen", "rejected"):
      groups = _reward_texts(pairs, side, render)
      encoded = [tokenizer.encode(texts, seconds) for _, texts, seconds in groups]
      sides.append({key: _in_pair_order(groups, [e[key] for e in encoded])
                    for key in encoded[0]})
    return {key: np.stack([side[key] for side in sides], axis=1) for key in sides[0]}

  return preprocess

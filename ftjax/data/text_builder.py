"""What the local text-classification data sets share: their features, split and keys.

Such a data set reads its corpus into examples {"id": int, "text": str,
"label": int}, an example's `id` staying the same when other rows of the file
change, and assigns them to train, validation and test with a seeded
stratified 80/10/10 split of the ids.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import local_builder
from ftjax.errors import DataError

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 0


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
  parts = local_builder.stratified_split(labels.tolist(), [int(i) for i in ids], fractions,
                                         seed)
  return tuple(np.asarray(part, np.int64) for part in parts)


class TextClassificationBuilder(local_builder.LocalBuilder, skip_registration=True):
  """A builder of labelled texts split by `stratified_split` of their ids.

  A subclass sets, besides what `LocalBuilder` asks for, `LABEL_NAMES`,
  `LICENSE` and `SHUFFLE_SPLITS`, and implements `_read_examples`.

  Attributes:
    LABEL_NAMES: the name of each label, in label order.
    LICENSE: the license of the data.
    SHUFFLE_SPLITS: False keeps each split in file order, an example keyed by
      its id; True puts each split in a seeded random order (for a file sorted
      by label, so that the first N examples of a split are a fair sample of
      it), an example keyed by its position, since TFDS stores a split sorted
      by key.
  """

  LABEL_NAMES: tuple[str, ...] = ()
  LICENSE = ""
  SHUFFLE_SPLITS = False

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info({
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=list(self.LABEL_NAMES)),
    }, license_text=self.LICENSE, supervised_keys=("text", "label"))

  @abc.abstractmethod
  def _read_examples(self, source_path: str | None) -> list[dict[str, Any]]:
    """Returns the examples of a source (None: the packaged corpus), in file order."""

  def _read_splits(self, source_path: str | None) -> list[list[local_builder.KeyedExample]]:
    examples = self._read_examples(source_path)
    splits = stratified_split([e["label"] for e in examples], SPLIT_FRACTIONS, SPLIT_SEED,
                              ids=[e["id"] for e in examples])
    for name, indices in zip(local_builder.SPLIT_NAMES, splits):
      if not len(indices):  # tfds cannot write an empty split.
        raise DataError(f"{source_path or f'packaged {self.name} corpus'}: {len(examples)} "
                        f"labelled examples leave the {name} split empty; a stratified "
                        "80/10/10 split needs about 10 or more")
    if not self.SHUFFLE_SPLITS:
      return [[(examples[i]["id"], examples[i]) for i in indices] for indices in splits]
    rng = np.random.default_rng(SPLIT_SEED)
    return [list(enumerate(examples[i] for i in rng.permutation(indices))) for indices in splits]

  def _examples(self, item: local_builder.KeyedExample) -> Iterator[local_builder.KeyedExample]:
    yield item

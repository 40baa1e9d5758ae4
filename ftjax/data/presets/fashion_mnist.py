"""Fashion-MNIST: 28 x 28 grayscale images of Zalando's articles in 10 classes.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017,
https://github.com/zalandoresearch/fashion-mnist) holds 60,000 training and
10,000 test images of 28 x 28 pixels with 256 grey levels (0 is the
background), each labelled with one of 10 classes: T-shirt/top, Trouser,
Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot. Every class
has 6,000 training and 1,000 test images.

The packaged source is the Debian package `dataset-fashion-mnist`, which
installs the four IDX files train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz under /usr/share/datasets/fashion-mnist (or the
same path under ~/.cache/ftjax/debian, where the package can be extracted
without root). A custom source is a folder holding the same four files,
each gzip-compressed or not (then named without ".gz").

Splits: validation is a seeded stratified twelfth of the training images
(5,000: 500 per class), train the other 55,000, and test the official
10,000 test images. Each split keeps the order of its file.

Each example is {"id": its index in the training file, or for a test image
the number of training images plus its index in the test file, so ids are
unique across splits; "image": uint8 [28, 28]; "label": the class index}.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import idx, local_builder, registry
from ftjax.errors import DataError

LABEL_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
IMAGE_SHAPE = (28, 28)
# The validation split's share of the training file: 5,000 of 60,000.
VALIDATION_FRACTION = 1 / 12
SPLIT_SEED = 0
# Where the Debian package's files lie: installed, or extracted without root.
PACKAGE_DIRS = ("/usr/share/datasets/fashion-mnist",
                "~/.cache/ftjax/debian/usr/share/datasets/fashion-mnist")
# The IDX files of a part ("train" or "t10k"), without the optional ".gz".
_IMAGES_FILE = "{part}-images-idx3-ubyte"
_LABELS_FILE = "{part}-labels-idx1-ubyte"
_PARTS = ("train", "t10k")

# One example: (id, image [28, 28], label).
Item = tuple[int, np.ndarray, int]


def source_dir() -> str:
  """Returns the folder of the packaged IDX files.

  Raises:
    DataError: when the Debian package is neither installed nor extracted,
      saying how to get it.
  """
  for folder in PACKAGE_DIRS:
    path = os.path.expanduser(folder)
    if os.path.isdir(path):
      return path
  looked = " or ".join(os.path.expanduser(folder) for folder in PACKAGE_DIRS)
  raise DataError(f"the Fashion-MNIST files are not installed (looked in {looked}): "
                  f"run `apt-get install dataset-fashion-mnist` as root, or `make data`, "
                  f"which extracts the package under ~/.cache/ftjax/debian")


def _file_names() -> list[str]:
  return [pattern.format(part=part) for part in _PARTS for pattern in (_IMAGES_FILE,
                                                                     _LABELS_FILE)]


def _find(folder: str, name: str) -> str:
  """Returns the path of `name`.gz, or of `name`, in `folder`."""
  for candidate in (f"{name}.gz", name):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(f"{folder}: holds neither {name}.gz nor {name}; a Fashion-MNIST folder "
                  f"holds {', '.join(_file_names())} (each optionally .gz)")


def read_part(folder: str, part: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the images and labels of one part of a Fashion-MNIST folder.

  Args:
    folder: holds the IDX files.
    part: "train" or "t10k".

  Returns:
    (uint8 images [N, 28, 28], int64 labels [N]).

  Raises:
    DataError: naming the file for a missing or malformed file, images that
      are not 28 x 28, image and label counts that differ, or a label outside
      the 10 classes (naming its index).
  """
  images_path = _find(folder, _IMAGES_FILE.format(part=part))
  labels_path = _find(folder, _LABELS_FILE.format(part=part))
  images = idx.read_images(images_path)
  labels = idx.read_labels(labels_path).astype(np.int64)
  if images.shape[1:] != IMAGE_SHAPE:
    raise DataError(f"{images_path}: images of {images.shape[1]} x {images.shape[2]} "
                    f"pixels; expected {IMAGE_SHAPE[0]} x {IMAGE_SHAPE[1]}")
  if not len(images):
    raise DataError(f"{images_path}: holds no images")
  if len(images) != len(labels):
    raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                    f"{len(labels)} labels; expected one label per image")
  bad = np.flatnonzero(labels >= len(LABEL_NAMES))
  if bad.size:
    raise DataError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]}; expected "
                    f"0 to {len(LABEL_NAMES) - 1}")
  return images, labels


def _items(images: np.ndarray, labels: np.ndarray, indices: Sequence[int],
           offset: int) -> list[Item]:
  return [(offset + i, images[i], int(labels[i])) for i in indices]


def read_splits(folder: str) -> list[list[Item]]:
  """Reads a Fashion-MNIST folder and splits it (see the module docstring).

  Args:
    folder: holds the four IDX files.

  Returns:
    The (id, image, label) items of train, validation and test, each in file
    order.

  Raises:
    DataError: for a path that is not a folder, or a missing or malformed file
      (see `read_part`).
  """
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: not a folder; expected a folder holding "
                    f"{', '.join(_file_names())} (each optionally .gz)")
  train_images, train_labels = read_part(folder, "train")
  test_images, test_labels = read_part(folder, "t10k")
  n = len(train_images)
  train, validation = local_builder.stratified_split(
      train_labels.tolist(), list(range(n)), (1 - VALIDATION_FRACTION, VALIDATION_FRACTION),
      SPLIT_SEED)
  return [_items(train_images, train_labels, train, 0),
          _items(train_images, train_labels, validation, 0),
          _items(test_images, test_labels, range(len(test_images)), n)]


class FashionMnist(local_builder.LocalBuilder):
  """Fashion-MNIST images of 10 clothing classes (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official test split; seeded stratified 5,000 validation "
                            "images (seed 0) held out of the 60,000 training images."}
  BUILDER_CONFIGS = [local_builder.SourceConfig(name="default",
                                                description="The Debian package's files.")]

  @classmethod
  def _source_signature(cls, path: str) -> str:
    """Returns the names, sizes and modification times of a folder's IDX files."""
    if not os.path.isdir(path):
      return super()._source_signature(path)
    entries = []
    for name in _file_names():
      for candidate in (f"{name}.gz", name):
        file = os.path.join(path, candidate)
        if os.path.isfile(file):
          stat = os.stat(file)
          entries.append(f"{candidate}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\0".join(entries)

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info({
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
    }, license_text="MIT", supervised_keys=("image", "label"))

  def _read_splits(self, source_path: str | None) -> list[list[Item]]:
    return read_splits(source_path or source_dir())

  def _examples(self, item: Item) -> Iterator[local_builder.KeyedExample]:
    example_id, image, label = item
    yield example_id, {"id": example_id, "image": image, "label": label}


PRESET = registry.Preset(
    "fashion_mnist", "image", FashionMnist, "Fashion-MNIST read from {path}",
    class_names=LABEL_NAMES)

"""Labelled images from the user's own files: a folder of class folders, or a table of paths.

`config.data.name` is `imagefolder` (torchvision's `ImageFolder`, Keras's
`image_dataset_from_directory`): `config.data.files.train` (and `.validation`,
`.test`) is a folder holding one folder per class, the images below each (in
sub-folders too). Or it is a table format (`csv`, `tsv`, `json`, `parquet`)
whose rows name an image file (`config.data.columns.image`, default "image"; a
relative path is taken from the table's folder) and its label
(`config.data.columns.label`, default "label"). An image cell may also hold the
image itself as `datasets`' `Image` feature stores it, {"bytes", "path"}: so
reads `hf_disk` (a `save_to_disk` folder, whose ClassLabel column keeps its
class order) and Parquet files written by `datasets`.

Images are JPEG, PNG, BMP, GIF or WebP files, stored as their encoded bytes and
decoded with Pillow when batches are made (`ftjax.data.images`); every image
is opened once while preparing, so an unreadable one is an error naming the
file. The classes, the splits cut from train for the splits without files
(stratified by label, by a hash of the image bytes, so exact copies share a
split) and the errors follow `ftjax.data.file_builder`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ftjax.data import file_builder, table_files
from ftjax.errors import DataError

FOLDER_FORMAT = "imagefolder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class ImageFilesConfig(tfds.core.BuilderConfig):
  """What to read: the format, the files or folders of each split, columns and classes."""

  format: str = FOLDER_FORMAT
  files: tuple[tuple[str, ...], ...] = ((), (), ())  # train, validation, test
  image_column: str = "image"
  label_column: str = "label"
  labels: tuple[str, ...] = ()  # empty: from the training data
  fractions: tuple[float, ...] = (0.8, 0.1, 0.1)


def expand(fmt: str, spec: str, key: str) -> list[str]:
  """The folders (imagefolder) or table files that a files setting names."""
  if fmt != FOLDER_FORMAT:
    return table_files.expand(spec, key)
  folders = [part.strip() for part in spec.split(",") if part.strip()]
  for folder in folders:
    if not os.path.isdir(folder):
      raise DataError(f"{key}={spec!r}: {folder}: " + (
          "a file, not a folder of class folders" if os.path.exists(folder)
          else "folder not found"))
  return folders


def _folder_images(folder: str) -> list[tuple[str, str]]:
  """(image path, class folder name) of every image below `folder`'s class folders."""
  found = []
  for name in sorted(os.listdir(folder)):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      continue
    for root, dirs, files in os.walk(class_dir):
      dirs.sort()
      found += [(os.path.join(root, f), name) for f in sorted(files)
                if f.lower().endswith(IMAGE_SUFFIXES)]
  if not found:
    raise DataError(f"{folder}: no images in class folders (expected {folder}/<class>/<image>, "
                    f"with suffixes {list(IMAGE_SUFFIXES)})")
  return found


def config_for(fmt: str, files: Sequence[Sequence[str]], columns: dict[str, str],
               labels: Sequence[Any], fractions: Sequence[float]) -> ImageFilesConfig:
  """The builder config of a set of folders or tables, named after their contents."""
  files = tuple(tuple(paths) for paths in files)
  labels = tuple(file_builder.label_name(label, "config.data.labels") for label in labels)
  if not labels and fmt == table_files.HF_DISK:  # a ClassLabel column keeps its order
    labels = table_files.class_label_names(files[0][0], columns["label"])
  # A folder's version: the images it holds, and each one's size and time.
  listing = [[(path, table_files.signature(path)) for folder in paths
              for path, _ in _folder_images(folder)] for paths in files
             ] if fmt == FOLDER_FORMAT else []
  name = table_files.config_name(fmt, files if fmt != FOLDER_FORMAT else (), listing,
                                 columns["image"], columns["label"], labels, tuple(fractions))
  return ImageFilesConfig(name=name, description=f"{fmt} {files}", format=fmt, files=files,
                          image_column=columns["image"], label_column=columns["label"],
                          labels=labels, fractions=tuple(fractions))


def _read_image(path: str, where: str) -> bytes:
  """The bytes of an image file that Pillow can decode."""
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise DataError(f"{where}: cannot read image {path}: {e.strerror or e}") from e
  return _decodable(data, path, where)


def _decodable(data: bytes, path: str, where: str) -> bytes:
  """`data` (the image `path`), checked to be an image that Pillow can decode."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise DataError(f"{where}: {path} is not an image Pillow can decode: {e}") from e
  return data


def _cell_image(cell: Any, table: str, where: str, column: str) -> dict[str, Any]:
  """{"image": bytes, "path"} of a table cell: an image path (relative: to the `table`'s
  folder), or `datasets`' Image value {"bytes", "path"} (bytes, else read from path)."""
  if isinstance(cell, dict) and {"bytes", "path"} <= set(cell):
    path = cell["path"] or where
    if cell["bytes"] is not None:
      return {"image": _decodable(cell["bytes"], path, where), "path": path}
    cell = cell["path"]
  if not isinstance(cell, str) or not cell.strip():
    raise DataError(f"{where}: column {column!r}: expected an image path or a datasets Image "
                    "value {'bytes', 'path'}")
  if "://" not in cell and not os.path.isabs(cell):
    cell = os.path.join(os.path.dirname(table), cell)
  return {"image": _read_image(cell, where), "path": cell}


class FileImages(file_builder.FilesBuilder, skip_registration=True):
  """Labelled images read from folders or tables named by an `ImageFilesConfig`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images in class folders, or named with their labels in CSV, "
                            "TSV, JSON or Parquet tables."}
  BUILDER_CONFIGS = [ImageFilesConfig(name="default")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info({
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "image": tfds.features.Text(),  # the encoded file, decoded when batches are made
        "path": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=list(self.builder_config.labels) or None),
    }, license_text="", supervised_keys=("image", "label"))

  def _examples_of(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {"image": the file's bytes, "path", "label": class name}) of each image of
    the folders or tables `paths`."""
    config = self.builder_config
    for path in paths:
      if config.format == FOLDER_FORMAT:
        for image, name in _folder_images(path):
          yield image, {"image": _read_image(image, image), "path": image, "label": name}
        continue
      for where, row in table_files.read_rows(path, config.format):
        image = table_files.column_value(where, row, config.image_column, "image")
        label = table_files.column_value(where, row, config.label_column, "label")
        label = file_builder.label_name(label, f"{where}: column {config.label_column!r}")
        yield where, {**_cell_image(image, path, where, config.image_column), "label": label}

  def _content(self, example: dict[str, Any]) -> bytes:
    return example["image"]

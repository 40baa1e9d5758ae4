"""Labelled texts from the user's own files (CSV, TSV, JSON Lines / JSON, Parquet).

`config.data.name` is the format, `config.data.files.train` / `.validation` /
`.test` name the files (paths, globs or comma-separated lists) and
`config.data.columns.text` / `.text_pair` / `.label` the columns (defaults
"text", "", "label"; a `text_pair` column makes sentence-pair examples).

Labels are strings or integers. The class names are `config.data.labels` when
given (in label order), else the distinct labels of the training file(s):
integers (also written as strings, as in a CSV) in numeric order, other labels
in sorted order. A validation or test label that is not a class is an error
naming its file and row.

A split without a file of its own is cut from the training file(s): a seeded
(seed 0) split stratified by label, by the fractions `config.data.split`
(default 80/10/10) of the splits that have no file, the same on every machine.
An example is placed by a hash of its text (and text pair), so exact
duplicates share a split and editing other rows moves no example.

The files are read twice while preparing (labels first, then examples), one row
at a time; the prepared splits keep the files' row order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import file_builder, table_files
from ftjax.errors import DataError


@dataclasses.dataclass
class FilesConfig(tfds.core.BuilderConfig):
  """What to read: the format, the files of each split, the columns and the classes."""

  format: str = "csv"
  files: tuple[tuple[str, ...], ...] = ((), (), ())  # train, validation, test
  text_column: str = "text"
  text_pair_column: str = ""
  label_column: str = "label"
  labels: tuple[str, ...] = ()  # empty: from the training files
  fractions: tuple[float, ...] = (0.8, 0.1, 0.1)


def config_for(fmt: str, files: Sequence[Sequence[str]], columns: dict[str, str],
               labels: Sequence[Any], fractions: Sequence[float]) -> FilesConfig:
  """The builder config of a set of files, named after them, their versions and settings.

  Args:
    fmt: one of `table_files.FORMATS`.
    files: the files of train, validation and test (empty: cut from train).
    columns: {"text", "text_pair", "label"}: the column of each field.
    labels: the class names in label order; empty: from the training files.
    fractions: train / validation / test fractions for the splits without files.
  """
  files = tuple(tuple(paths) for paths in files)
  labels = tuple(file_builder.label_name(label, "config.data.labels") for label in labels)
  if not labels and fmt == table_files.HF_DISK:  # a ClassLabel column keeps its order
    labels = table_files.class_label_names(files[0][0], columns["label"])
  name = table_files.config_name(fmt, files, columns, labels, tuple(fractions))
  return FilesConfig(name=name, description=f"{fmt} files {files}",
                     format=fmt, files=files, text_column=columns["text"],
                     text_pair_column=columns["text_pair"], label_column=columns["label"],
                     labels=labels, fractions=tuple(fractions))


class FileClassification(file_builder.FilesBuilder, skip_registration=True):
  """Labelled texts read from files named by a `FilesConfig`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Texts (and text pairs) with labels from CSV, TSV, JSON or "
                            "Parquet files."}
  BUILDER_CONFIGS = [FilesConfig(name="default")]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    features: dict[str, tfds.features.FeatureConnector] = {
        "id": tfds.features.Tensor(shape=(), dtype=np.int64), "text": tfds.features.Text()}
    if config.text_pair_column:
      features["text_pair"] = tfds.features.Text()
    # Without given names, preparation sets them; a prepared data set reads them back.
    features["label"] = tfds.features.ClassLabel(names=list(config.labels) or None)
    return self._dataset_info(features, license_text="", supervised_keys=("text", "label"))

  def _examples_of(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, {"text", ["text_pair"], "label": class name}) of each row of `paths`."""
    config = self.builder_config
    fields = [("text", config.text_column), ("label", config.label_column)]
    if config.text_pair_column:
      fields.insert(1, ("text_pair", config.text_pair_column))
    for path in paths:
      for where, row in table_files.read_rows(path, config.format):
        example = {}
        for field, column in fields:
          value = table_files.column_value(where, row, column, field)
          if field == "label":
            example[field] = file_builder.label_name(value, f"{where}: column {column!r}")
          elif not isinstance(value, str):
            raise DataError(f"{where}: column {column!r} holds a {type(value).__name__}; "
                            "expected text")
          elif not value.strip():
            raise DataError(f"{where}: column {column!r}: empty text")
          else:
            example[field] = value
        yield where, example

  def _content(self, example: dict[str, Any]) -> str:
    return f"{example['text']}\0{example.get('text_pair', '')}"

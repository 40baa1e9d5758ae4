"""Data sets by name: prepare a TFDS builder once, then read it randomly.

Preparation writes ArrayRecord files under `data_dir`; reading goes through
`as_data_source()`, the random-access path that grain reads and that works
without TensorFlow.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow_datasets as tfds

from ftjax.data import registry
from ftjax.errors import ConfigError, DataError
from ftjax.metrics import log_line

SPLITS = ("train", "validation", "test")

class _NoCustomConfigWarnings(logging.Filter):
  """Drops TFDS's warning about a builder config its builder does not list: every
  prepared copy of the user's files (and of a custom source) has one, named after
  the files, and the warning repeats the whole config at each load."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_NoCustomConfigWarnings())


def dataset_names() -> list[str]:
  """Returns the names `load_splits` accepts: the packaged data sets."""
  return sorted(registry.presets())


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """Holds an exclusive lock on `path` so one process prepares at a time."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # tfds renames a finished preparation into place, so the directory only
  # exists once every file in it is complete.
  return builder.data_path.exists()


def _prepare(make_builder: Callable[[], tfds.core.DatasetBuilder], data_dir: str,
             lock_name: str) -> tfds.core.DatasetBuilder:
  """Returns a prepared builder, preparing it under a lock if needed."""
  builder = make_builder()
  if _is_prepared(builder):
    return builder
  if "://" in data_dir:  # A remote store takes no file lock; prepare directly.
    _download_and_prepare(builder)
    return builder
  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(os.path.join(data_dir, f".{lock_name}.lock")):
    # Another process may have finished while this one waited for the lock;
    # a fresh builder then reads its dataset_info instead of the stale one.
    builder = make_builder()
    if not _is_prepared(builder):
      _download_and_prepare(builder)
  return builder


def _download_and_prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares `builder` as ArrayRecord files, with a line before and after (TFDS's
  progress bars only on a terminal: in a log file they are escape codes)."""
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  name = f"{builder.name}/{builder.builder_config.name}"
  log_line(f"preparing {name} in {builder.data_dir} (once)")
  started = time.perf_counter()
  builder.download_and_prepare(file_format="array_record")
  seconds = time.perf_counter() - started
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  log_line(f"prepared {name}: {counts} examples in {seconds:.1f} s "
           f"({sum(counts.values()) / max(seconds, 1e-9):,.0f} examples/s)")


def load_splits(name: str, data_dir: str, source_path: str | None = None
                ) -> dict[str, Any]:
  """Prepares data set `name` in `data_dir` if needed, and opens its splits.

  Preparation is idempotent and safe when several processes (pytest-xdist
  workers, hosts sharing a disk) call this at once on the same `data_dir`.

  Args:
    name: a registered data set, one of `dataset_names()`.
    data_dir: the TFDS data directory holding prepared data sets.
    source_path: the raw file (for "shakespeare", a folder of .txt files) to
      prepare from; None means the packaged one. A custom source is prepared
      under its own config name, derived from its path and modification time.

  Returns:
    {"train", "validation", "test"}: random-access sources (`len(src)`,
    `src[i]`) whose elements are dicts of numpy values; Text features are
    bytes.

  Raises:
    ConfigError: for an unknown name.
    DataError: for a missing or malformed source.
  """
  if name not in registry.presets():
    raise ConfigError(f"unknown data set {name!r}; valid names: {dataset_names()}")
  if source_path is not None and not os.path.exists(source_path):
    raise DataError(f"{source_path}: file not found")
  preset = registry.presets()[name]
  config = preset.builder_config(source_path)
  builder = _prepare(lambda: preset.builder(data_dir=data_dir, config=config),
                     os.fspath(data_dir), f"{name}-{config.name}")
  sources = builder.as_data_source()
  return {split: sources[split] for split in SPLITS}


def load_file_splits(builder_cls: type[tfds.core.DatasetBuilder],
                     config: tfds.core.BuilderConfig, data_dir: str
                     ) -> tuple[dict[str, Any], tfds.core.DatasetInfo]:
  """Prepares the data of the user's files (`builder_cls`: a `file_builder.FilesBuilder`)
  in `data_dir` if needed, under the config's name, which changes with the files'
  versions, and opens their splits.

  Returns:
    ({"train", "validation", "test"}: random-access sources as `load_splits`
    returns them, the prepared data set's info).
  """
  builder = _prepare(lambda: builder_cls(data_dir=data_dir, config=config),
                     os.fspath(data_dir), f"{builder_cls.name}-{config.name}")
  sources = builder.as_data_source()
  return {split: sources[split] for split in SPLITS}, builder.info

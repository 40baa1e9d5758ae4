"""Data sets by name: one registry of packaged presets, and references to the user's files.

`config.data.name` names what a run reads, each part of a "+"-joined name (a
multi-task run) and each entry of `config.data.extra_eval` being one of:

- a **preset**: a packaged data set, one module of `ftjax.data.presets` that
  declares its `PRESET` (adding a preset is adding that one file);
- a **file format** (`csv`, `tsv`, `json`, `parquet`, `hf_disk`, `imagefolder`):
  the files of `config.data.files`, read through `config.data.columns`, with the
  classes of `config.data.labels` (else the data's) and the splits that have no
  file cut from the training files by `config.data.split`;
- **`<format>:<files>`** (`csv:tickets.csv`, `json:chats/*.jsonl`,
  `hf_disk:/data/sst2`): those files, read through `config.data.columns`, with
  their own classes; as a task of a multi-task run its validation and test
  splits are cut from it by `config.data.split`; as an extra evaluation set
  every row of it is evaluated. Its name in metrics is the first file's name
  without its extension (`tickets`).

What a batch of a kind of data holds (`batch_spec`) is known from the config
alone, so a program can be compiled before any data is read.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pkgutil
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import file_images, lm, local_builder, mixture, table_files
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import ConfigError

# Kind of data -> the task its examples are scored by. "language_model_files" are the
# user's language-model files before they are read: chat or text, as their rows say.
KIND_TASKS = {"classification": "classification", "image": "classification",
              "chat": "causal_lm", "text": "causal_lm", "language_model_files": "causal_lm"}
FORMATS = (*table_files.FORMATS, file_images.FOLDER_FORMAT)
FILE_SETTINGS = tuple(f"config.data.files.{split}" for split in local_builder.SPLIT_NAMES)

# The config.data keys that each kind of data reads (files also read _FILE_KEYS).
_KIND_KEYS = {
    "classification": ("max_length", "max_eval_examples", "tokenizer"),
    "image": ("image_size", "mean", "std", "shots", "augment", "max_eval_examples"),
    "chat": ("max_length", "max_eval_examples", "tokenizer"),
    "text": ("max_length", "max_eval_examples", "tokenizer"),
    "language_model_files": ("max_length", "max_eval_examples", "tokenizer"),
}
_FILE_KEYS = ("files", "columns", "split")
_PRESET_KEYS = ("source_path",)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A packaged data set.

  Attributes:
    name: its `config.data.name`.
    kind: "classification" (texts with labels), "image", "chat" or "text".
    builder: the TFDS builder that prepares it (a `local_builder.LocalBuilder`).
    source: what a custom source (`config.data.source_path`) is, "{path}" standing
      for its path: the description of the prepared copy.
    class_names: the name of each class in label order (classification data).
  """

  name: str
  kind: str
  builder: type[tfds.core.DatasetBuilder]
  source: str
  class_names: tuple[str, ...] = ()

  @property
  def task(self) -> str:
    return KIND_TASKS[self.kind]

  def builder_config(self, source_path: str | None) -> tfds.core.BuilderConfig:
    """The builder config of a custom source; None: the packaged corpus."""
    return self.builder.config_for(source_path, self.source)


@functools.cache
def presets() -> dict[str, Preset]:
  """Every packaged data set, by name: the `PRESET` of each module of `ftjax.data.presets`."""
  from ftjax.data import presets as package  # its modules import this one
  found = {}
  for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
    preset = importlib.import_module(f"{package.__name__}.{module}").PRESET
    found[preset.name] = preset
  return found


@dataclasses.dataclass(frozen=True)
class DataSet:
  """A data set a run reads, resolved from its name (see the module docstring).

  Attributes:
    name: its name in metrics and logs.
    kind: a key of `KIND_TASKS`.
    preset: the packaged data set, or None for files.
    format: the files' format (one of `FORMATS`), or "" for a preset.
    files: the files setting of train, validation and test ("" for none).
    own_classes: whether the classes come from these files alone, not
      `config.data.labels` (a `<format>:<files>` reference).
    settings: where each split's files setting was written, for error messages
      (`config.data.files.<split>`, or the reference as given).
  """

  name: str
  kind: str
  preset: Preset | None = None
  format: str = ""
  files: tuple[str, str, str] = ("", "", "")
  own_classes: bool = False
  settings: tuple[str, str, str] = FILE_SETTINGS

  @property
  def task(self) -> str:
    return KIND_TASKS[self.kind]


def _file_kind(fmt: str, config: ml_collections.ConfigDict) -> str:
  """The kind of the files of format `fmt` under `config` (task and columns)."""
  if fmt == file_images.FOLDER_FORMAT or "image" in config.data.get("columns", {}):
    return "image"
  return "language_model_files" if config.task == "causal_lm" else "classification"


def _files_reference(name: str) -> tuple[str, str] | None:
  """(format, files) of a `<format>:<files>` name; None for another name."""
  fmt, _, spec = name.partition(":")
  return (fmt, spec.strip()) if fmt in FORMATS and spec.strip() else None


def is_files(name: str) -> bool:
  """Whether `name` names the user's files: a file format or `<format>:<files>`."""
  return name in FORMATS or _files_reference(name) is not None


def data_set_name(name: str) -> str:
  """The name in metrics of what `name` names: `<format>:<files>`'s first file without
  its folder and extension, else `name`."""
  reference = _files_reference(name)
  if reference is None:
    return name
  first = reference[1].split(",")[0].strip().rstrip("/")
  return os.path.basename(first).split(".")[0] or first


def resolve(name: str, config: ml_collections.ConfigDict) -> DataSet:
  """The data set that `name` (a preset, a format or `<format>:<files>`) names.

  Raises:
    ConfigError: for a name that is none of them.
  """
  if name in presets():
    preset = presets()[name]
    return DataSet(name, preset.kind, preset=preset)
  if name in FORMATS:
    files = config.data.get("files", {})
    return DataSet(name, _file_kind(name, config), format=name,
                   files=tuple(files.get(split, "") for split in local_builder.SPLIT_NAMES))
  reference = _files_reference(name)
  if reference is not None:
    fmt, spec = reference
    return DataSet(data_set_name(name), _file_kind(fmt, config), format=fmt,
                   files=(spec, "", ""), own_classes=True,
                   settings=(f"data set {name!r}",) * 3)
  raise ConfigError(f"config.data.name={name!r}: unknown data set; known: {sorted(presets())}, "
                    f"a file format {list(FORMATS)} (reading config.data.files), or "
                    "'<format>:<files>' (e.g. 'csv:tickets.csv')")


def check(config: ml_collections.ConfigDict) -> list[DataSet]:
  """Checks what `config.data` names without reading any data; returns its data sets.

  Raises:
    ConfigError: an unknown name, data of another task, a config without the keys its
      data reads, multi-task settings of a single data set (or the other way round), a
      task that is not text classification in a multi-task run, or a class count of
      packaged tasks that is not `config.model.num_classes`.
  """
  data = config.data
  sets = [resolve(name, config) for name in mixture.task_names(data.name)]
  names = [s.name for s in sets]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.data.name={data.name!r}: two data sets named alike {names}")
  for data_set in sets:
    if len(sets) > 1 and data_set.kind != "classification":
      raise ConfigError(f"config.data.name={data.name!r}: {data_set.name!r} cannot be a task "
                        "of a multi-task run: tasks are text classification data (presets "
                        f"{sorted(n for n, p in presets().items() if p.kind == 'classification')}"
                        ", a file format or '<format>:<files>')")
    _check_keys(config, data_set)
  _check_fisher_task(config, names)
  if len(sets) == 1:
    for key in ("weights", "train_examples"):
      if data.get(key):
        raise ConfigError(f"config.data.{key}={tuple(data[key])!r}: only for multi-task runs "
                          f"(config.data.name joining data sets with '+'), not {data.name!r}")
    return sets
  _check_tasks(config, sets)
  return sets


def _check_keys(config: ml_collections.ConfigDict, data_set: DataSet) -> None:
  data = config.data
  named = f"config.data.name={data.name!r}" + (
      "" if data.name == data_set.name else f": {data_set.name!r}")  # a part of the name
  if config.task != data_set.task:
    raise ConfigError(f"{named} is {data_set.kind} data, scored by task {data_set.task!r}, "
                      f"but config.task={config.task!r}")
  needed = _KIND_KEYS[data_set.kind] + (_PRESET_KEYS if data_set.preset else _FILE_KEYS)
  missing = [key for key in needed if key not in data]
  if missing:
    raise ConfigError(f"{named} is {data_set.kind} data, which needs config.data keys "
                      f"{missing} that this config lacks (a config of another kind of data?)")
  if not data_set.preset and not data_set.files[0]:
    raise ConfigError(f"config.data.name={data.name!r} reads files: set "
                      "config.data.files.train (and optionally .validation, .test)")


def _check_tasks(config: ml_collections.ConfigDict, sets: list[DataSet]) -> None:
  """The checks of a multi-task run (several data sets joined with "+")."""
  data = config.data
  if data.get("source_path"):
    raise ConfigError(f"config.data.source_path={data.source_path!r}: multi-task runs read "
                      "each data set's own source; set it only for a single data set")
  if data.get("columns", {}).get("text_pair"):
    raise ConfigError(f"config.data.columns.text_pair={data.columns.text_pair!r}: sentence "
                      "pairs are read in runs of a single data set, not multi-task runs")
  if sum(not s.preset and not s.own_classes for s in sets) > 1:
    raise ConfigError(f"config.data.name={data.name!r}: only one task can read "
                      "config.data.files; name the others' files as '<format>:<files>'")
  counts = preset_class_counts(config)
  if counts and config.model.num_classes not in (0, sum(c for _, c in counts)):
    raise ConfigError(f"config.model.num_classes={config.model.num_classes}: the tasks of "
                      f"{data.name!r} have {sum(c for _, c in counts)} classes together "
                      f"({', '.join(f'{n}: {c}' for n, c in counts)})")
  names = [s.name for s in sets]
  mixture.check_weights(data.get("mixing", "proportional"), data.get("weights", ()), names)
  train_examples = data.get("train_examples", ())
  if train_examples and (len(train_examples) != len(names)
                         or any(not isinstance(n, int) or n < 0 for n in train_examples)):
    raise ConfigError(f"config.data.train_examples={tuple(train_examples)!r}: needs a count "
                      f">= 0 per task of {names} (0: all)")


def _check_fisher_task(config: ml_collections.ConfigDict, names: list[str]) -> None:
  regularizer = config.get("regularizer")
  if regularizer is not None and regularizer.kind == "ewc" and (
      regularizer.fisher_task not in names):
    raise ConfigError(f"config.regularizer.fisher_task={regularizer.fisher_task!r}: not a "
                      f"task of this run; choose from {names}")


def preset_class_counts(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """(name, number of classes) of each task of a multi-task run whose tasks are all
  presets (known without reading data); [] for one data set or when a task is files."""
  names = mixture.task_names(config.data.name)
  if len(names) == 1 or any(name not in presets() for name in names):
    return []
  return [(name, len(presets()[name].class_names)) for name in names]


def batch_spec(kind: str, data: ml_collections.ConfigDict, multi_task: bool = False
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Each array of a batch of `kind` data: {key: (shape after the batch dim, dtype)}.

  Tokenized classification examples (with their `task` in a multi-task run), images
  with their labels, or packed language-model rows (`lm.ROW_KEYS`), plus the
  pipeline's `mask`; known from the config's data section alone.
  """
  if kind == "classification":
    length = (data.max_length,)
    spec = {key: (length, np.int32) for key in tokenizer_lib.OUTPUT_KEYS}
    spec["label"] = ((), np.int32)
    if multi_task:
      spec["task"] = ((), np.int32)
  elif kind == "image":
    size = data.image_size
    spec = {"image": ((size, size, 3), np.float32), "label": ((), np.int32),
            "label_mix": ((), np.int32), "mix": ((), np.float32)}
  else:
    length = (data.max_length,)
    spec = {key: (length, np.bool_ if key == "loss_mask" else np.int32) for key in lm.ROW_KEYS}
  spec["mask"] = ((), np.bool_)
  return spec


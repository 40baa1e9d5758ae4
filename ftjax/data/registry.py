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

from ftjax import models, schema
from ftjax.data import (augment, buckets, file_images, lm, local_builder, mixture, packing,
                        table_files)
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import ConfigError

# Kind of data -> the task its examples are scored by. "language_model_files" are the
# user's language-model files before they are read: chat or text, as their rows say.
KIND_TASKS = {"classification": "classification", "image": "classification",
              "chat": "causal_lm", "text": "causal_lm", "language_model_files": "causal_lm",
              "preference": "preference", "reward": "reward"}
FORMATS = (*table_files.FORMATS, file_images.FOLDER_FORMAT)
FILE_SETTINGS = tuple(f"config.data.files.{split}" for split in local_builder.SPLIT_NAMES)

# Kind of data -> what a model must read to take it (`ftjax.models.INPUTS`).
KIND_INPUTS = {"classification": "text", "image": "image", "chat": "tokens", "text": "tokens",
               "language_model_files": "tokens", "preference": "tokens", "reward": "text"}


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
  if fmt == file_images.FOLDER_FORMAT or config.data.columns.image:
    return "image"
  if config.task in ("preference", "reward"):  # pairs, tokenized for the task's model
    return config.task
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
    files = config.data.files
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
  buckets.lengths(data.buckets, data.max_length)
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
    _check_kind(config, data_set)
  if len(sets) == 1:
    for key in ("weights", "train_examples"):
      if data[key]:
        raise ConfigError(f"config.data.{key}={tuple(data[key])!r}: only for multi-task runs "
                          f"(config.data.name joining data sets with '+'), not {data.name!r}")
    return sets
  _check_tasks(config, sets)
  return sets


def _check_kind(config: ml_collections.ConfigDict, data_set: DataSet) -> None:
  """The data's task is the run's, and the model reads that kind of data."""
  data = config.data
  named = f"config.data.name={data.name!r}" + (
      "" if data.name == data_set.name else f": {data_set.name!r}")  # a part of the name
  if config.task != data_set.task:
    raise ConfigError(f"{named} is {data_set.kind} data, scored by task {data_set.task!r}, "
                      f"but config.task={config.task!r}")
  model = models.resolve_name(config.model, config.task)
  needs, reads = KIND_INPUTS[data_set.kind], models.INPUTS[model]
  if needs != reads:
    fitting = sorted(name for name, kind in models.INPUTS.items() if kind == needs)
    resolved = "" if model == config.model.name else f" ({model} for this checkpoint)"
    raise ConfigError(f"{named} is {data_set.kind} data, but config.model.name="
                      f"{config.model.name!r}{resolved} reads {reads}; models for it: "
                      f"{fitting}")
  if not data_set.preset and not data_set.files[0]:
    raise ConfigError(f"config.data.name={data.name!r} reads files: set "
                      "config.data.files.train (and optionally .validation, .test)")


def _check_tasks(config: ml_collections.ConfigDict, sets: list[DataSet]) -> None:
  """The checks of a multi-task run (several data sets joined with "+")."""
  data = config.data
  if data.source_path:
    raise ConfigError(f"config.data.source_path={data.source_path!r}: multi-task runs read "
                      "each data set's own source; set it only for a single data set")
  if data.columns.text_pair:
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
  mixture.check_weights(data.mixing, data.weights, names)
  train_examples = data.train_examples
  if train_examples and (len(train_examples) != len(names)
                         or any(not isinstance(n, int) or n < 0 for n in train_examples)):
    raise ConfigError(f"config.data.train_examples={tuple(train_examples)!r}: needs a count "
                      f">= 0 per task of {names} (0: all)")


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
  with their labels, packed language-model rows (`lm.ROW_KEYS`), preference pairs
  (two such rows each, with their index and reference log-probabilities) or reward
  pairs (two tokenized texts each), plus the pipeline's `mask`; known from the
  config's data section alone.
  """
  if kind == "classification":
    length = (data.max_length,)
    spec = {key: (length, np.int32) for key in tokenizer_lib.OUTPUT_KEYS}
    spec["label"] = ((), np.int32)
    if multi_task:
      spec["task"] = ((), np.int32)
  elif kind == "preference":
    pair = (2, data.max_length)
    spec = {key: (pair, np.bool_ if key == "loss_mask" else np.int32) for key in lm.ROW_KEYS}
    spec.update(pair_index=((), np.int32), ref_logps=((2,), np.float32))
  elif kind == "reward":
    spec = {key: ((2, data.max_length), np.int32) for key in tokenizer_lib.OUTPUT_KEYS}
  elif kind == "image":
    size = data.image_size
    spec = {"image": ((size, size, 3), np.float32), "label": ((), np.int32),
            "label_mix": ((), np.int32), "mix": ((), np.float32)}
  else:
    length = (data.max_length,)
    spec = {key: (length, np.bool_ if key == "loss_mask" else np.int32) for key in lm.ROW_KEYS}
  spec["mask"] = ((), np.bool_)
  return spec



def _split_problem(value: Any) -> str:
  fractions = tuple(value)
  ok = (len(fractions) == 3 and all(schema.is_number(f) and f >= 0 for f in fractions)
        and fractions[0] > 0 and abs(sum(fractions) - 1) < 1e-6)
  return "" if ok else "must be three fractions (train, validation, test) summing to 1"


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

SCHEMA = schema.Section("data", "What a run reads and how examples become batches.", {
    "name": schema.Key("rotten_tomatoes", "a packaged data set, a file format reading "
                       "`files`, or '<format>:<files>'; '+' joins the tasks of a multi-task "
                       "run"),
    "data_dir": schema.Key("~/.cache/ftjax/tensorflow_datasets", "where prepared data sets "
                           "are kept"),
    "source_path": schema.Key("", "a packaged data set's source read from here instead "
                              "(empty: the packaged files)"),
    "files": {split: schema.Key("", f"file formats: the {split} files (paths, globs or "
                                "comma-separated lists)" + ("" if split == "train" else
                                "; empty: cut from train by `split`"))
              for split in local_builder.SPLIT_NAMES},
    "columns": {
        "text": schema.Key("text", "the column of texts (classification) or passages "
                           "(language models)"),
        "text_pair": schema.Key("", "the column of second texts of sentence pairs (empty: "
                                "single texts)"),
        "label": schema.Key("label", "the column of labels"),
        "image": schema.Key("", "the column of image paths or bytes (set: the files are "
                            "images)"),
        "messages": schema.Key("messages", "language models: the column of chat messages "
                               "(OpenAI format)"),
        "prompt": schema.Key("prompt", "language models: the column of prompts"),
        "completion": schema.Key("completion", "language models: the column of completions "
                                 "(the only tokens trained)"),
        "chosen": schema.Key("chosen", "preference pairs: the column of preferred "
                             "completions"),
        "rejected": schema.Key("rejected", "preference pairs: the column of rejected "
                               "completions"),
    },
    "labels": schema.Key((), "class names in label order (empty: the sorted labels of the "
                         "training files)"),
    "split": schema.Key((0.8, 0.1, 0.1), "fractions of the training files cut into train, "
                        "validation and test (stratified by label, seed 0)",
                        rule=_split_problem),
    "extra_eval": schema.Key((), "further evaluation sets reported under their names: "
                             "packaged data sets or '<format>:<files>'"),
    "tokenizer": schema.Key("", "a packaged model name or folder whose tokenizer to use "
                            "(empty: the model's own)"),
    "chat_template": schema.Key("", "chat data: how conversations are rendered: empty, the "
                                "tokenizer's own template; 'gemma' or 'chatml'; or a Jinja "
                                "file (a base model's tokenizer has none)",
                                rule=lm.chat_template_problem),
    "max_length": schema.Key(64, "tokens per example (classification) or packed row "
                             "(language models)", rule=schema.positive),
    "buckets": schema.Key("auto", "token arrays of each batch cut to the shortest of these "
                          "lengths holding its longest row: 'auto' (quarters of max_length "
                          "in multiples of 8 tokens), 'off' (always max_length) or "
                          "comma-separated lengths ('32,48')", rule=buckets.setting_problem),
    "packing": schema.Key("auto", "text classification: each batch's texts laid end to end "
                          "in rows of max_length tokens, attending only within each text "
                          "(little padding computed): 'auto' (where the model reads packed rows: "
                          "BERT-family encoders, ModernBERT), 'on' (refused elsewhere) or "
                          "'off' (padded, data.buckets)", choices=packing.SETTINGS),
    "overlong": schema.Key("split", "language models: a chat longer than a row",
                           choices=lm.OVERLONG),
    "max_train_examples": schema.Key(0, "language models: train on the first N examples "
                                     "only (0: all)", rule=schema.at_least(0)),
    "max_eval_examples": schema.Key(0, "evaluate on the first N examples of each split "
                                    "only (0: all)", rule=schema.at_least(0)),
    "mixing": schema.Key("proportional", "multi-task runs: tasks mixed in proportion to "
                         "their sizes, or by `weights`", choices=mixture.MIXINGS),
    "weights": schema.Key((), "multi-task runs with mixing='weights': one weight per task "
                          "(0: evaluated, not trained)"),
    "train_examples": schema.Key((), "multi-task runs: per task, keep the first N training "
                                 "examples (0: all)"),
    "image_size": schema.Key(64, "images: the side they are resized to",
                             rule=schema.positive),
    "mean": schema.Key(_IMAGENET_MEAN, "images: per-channel mean subtracted (ImageNet's)"),
    "std": schema.Key(_IMAGENET_STD, "images: per-channel standard deviation divided by"),
    "shots": schema.Key(0, "images: > 0 trains on k images per class (fixed by the seed)",
                        rule=schema.at_least(0)),
    "augment": augment.KEYS,
}, check=check)

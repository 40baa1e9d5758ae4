"""What a run feeds its model: the splits, the per-batch preprocessing and the tokenizer.

Data sets come in four kinds. Classification data (texts with labels) is
tokenized batch by batch to a fixed length. Image data (images with labels) is
resized and normalised batch by batch for the model (`ftjax.data.images`), and
training batches may be augmented (`ftjax.data.augment`); `config.data.shots`
> 0 trains on that many examples per class. Chat and plain-text data for
language models is tokenized and packed once, when the run starts, into rows
of `config.data.max_length` tokens (see `ftjax.data.lm`); the packed rows are
then the examples the grain pipelines shuffle, shard across hosts and batch.

Text classification data sets joined by "+" (`"rotten_tomatoes+tweets"`) make a
multi-task run: one model, each task its own block of `config.model.num_classes`
(in the order named), examples tagged with their task and mixed for training
as `config.data.mixing` says (see `ftjax.data.mixture`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from ftjax.data import augment as augment_lib
from ftjax.data import (fashion_mnist, file_classification, file_images, file_lm, images, lm,
                        local_builder, mixture, mnist_digits, pipeline, rotten_tomatoes, sources,
                        table_files, tweets)
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import ConfigError
from ftjax.hub import assets
from ftjax.metrics import log_line

# data set -> (kind, the task its examples are scored by)
KINDS = {
    "rotten_tomatoes": ("classification", "classification"),
    "tweets": ("classification", "classification"),
    "fashion_mnist": ("image", "classification"),
    "mnist_digits": ("image", "classification"),
    "chat": ("chat", "causal_lm"),
    "shakespeare": ("text", "causal_lm"),
}

# The config.data keys each kind of data reads.
_DATA_KEYS = {
    "classification": ("max_length", "max_eval_examples", "source_path", "tokenizer"),
    "classification_files": ("max_length", "max_eval_examples", "tokenizer", "files", "columns",
                             "labels", "split"),
    "language_model_files": ("max_length", "max_eval_examples", "tokenizer", "files", "columns",
                             "split"),
    "image_files": ("image_size", "mean", "std", "shots", "augment", "max_eval_examples",
                    "files", "columns", "labels", "split"),
    "image": ("image_size", "mean", "std", "shots", "augment", "max_eval_examples",
              "source_path"),
    "chat": ("max_length", "max_eval_examples", "source_path", "tokenizer"),
    "text": ("max_length", "max_eval_examples", "source_path", "tokenizer"),
}

# Text classification data sets that can be tasks of a multi-task run: their classes.
TEXT_CLASSES = {"rotten_tomatoes": rotten_tomatoes.LABEL_NAMES, "tweets": tweets.LABEL_NAMES}
# The class names of the packaged classification data sets.
_CLASS_NAMES = {**TEXT_CLASSES, "fashion_mnist": fashion_mnist.LABEL_NAMES,
                "mnist_digits": mnist_digits.LABEL_NAMES}


def data_kind(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(kind of data, the task its examples are scored by) of `config.data.name`: a
  packaged data set (`KINDS`) or a file format (`table_files.FORMATS`).

  Raises:
    ConfigError: for an unknown name, or files for a task that cannot read them yet.
  """
  name = mixture.task_names(config.data.name)[0]
  if name in KINDS:
    return KINDS[name]
  if name == file_images.FOLDER_FORMAT or (
      name in table_files.FORMATS and "image" in config.data.get("columns", {})):
    return "image", "classification"
  if name in table_files.FORMATS:
    if config.task == "causal_lm":
      return "language_model_files", "causal_lm"  # chat or text: the files' rows say
    return "classification", "classification"
  raise ConfigError(f"config.data.name={name!r}: unknown data set; known: {sorted(KINDS)}, "
                    f"or a file format: {[*table_files.FORMATS, file_images.FOLDER_FORMAT]}")


def task_classes(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """(name, number of classes) of each task of a multi-task run; [] for one data set.

  Raises:
    ConfigError: a task that is not a text classification data set, or
      `config.model.num_classes` that is not the tasks' classes together.
  """
  if "data" not in config:
    return []
  data = config.data
  names = mixture.task_names(data.name)
  _check_fisher_task(config, names)
  if len(names) == 1:
    for key in ("weights", "train_examples"):
      if data.get(key):
        raise ConfigError(f"config.data.{key}={tuple(data[key])!r}: only for multi-task runs "
                          f"(config.data.name joining data sets with '+'), not {data.name!r}")
    return []
  if data.get("source_path"):
    raise ConfigError(f"config.data.source_path={data.source_path!r}: multi-task runs read "
                      "the packaged data sets; set it only for a single data set")
  for name in names:
    if name not in TEXT_CLASSES:
      raise ConfigError(f"config.data.name={config.data.name!r}: {name!r} cannot be a task of "
                        f"a multi-task run; choose from {sorted(TEXT_CLASSES)}")
  classes = [(name, len(TEXT_CLASSES[name])) for name in names]
  total = sum(count for _, count in classes)
  if config.model.num_classes not in (0, total):  # 0: the tasks' count
    raise ConfigError(f"config.model.num_classes={config.model.num_classes}: the tasks of "
                      f"{config.data.name!r} have {total} classes together "
                      f"({', '.join(f'{n}: {c}' for n, c in classes)})")
  mixture.check_weights(data.get("mixing", "proportional"), data.get("weights", ()), names)
  train_examples = data.get("train_examples", ())
  if train_examples and (len(train_examples) != len(names)
                         or any(not isinstance(n, int) or n < 0 for n in train_examples)):
    raise ConfigError(f"config.data.train_examples={tuple(train_examples)!r}: needs a count "
                      f">= 0 per task of {names} (0: all)")
  return classes


def _check_fisher_task(config: ml_collections.ConfigDict, names: list[str]) -> None:
  regularizer = config.get("regularizer")
  if regularizer is not None and regularizer.kind == "ewc" and (
      regularizer.fisher_task not in names):
    raise ConfigError(f"config.regularizer.fisher_task={regularizer.fisher_task!r}: not a "
                      f"task of this run; choose from {names}")


@dataclasses.dataclass
class Inputs:
  """A run's input side.

  Attributes:
    kind: "classification", "image", "chat" or "text".
    splits: {"train", "validation", "test"}: random-access sources of examples
      (packed rows for language models); evaluation splits hold at most
      `config.data.max_eval_examples` examples when that is positive.
    preprocess: a batch of examples -> model inputs (see `ftjax.data.pipeline`).
    tokenizer: the tokenizer (a transformers tokenizer for language models; None
      for images).
    raw: the unpacked splits (language models only: prompts for samples).
    chat: renders conversations with the model's chat template (chat data only).
    augment: random augmentation of training batches (images only), or None.
    task_train: a multi-task run's training examples of each task, tagged, by
      data set name; empty for other runs.
    class_names: the name of each class in label order (classification data;
      a multi-task run's in task order); empty for language-model data.
  """

  kind: str
  splits: dict[str, Sequence[Any]]
  preprocess: pipeline.Preprocess
  tokenizer: Any
  raw: dict[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  chat: lm.ChatFormatter | None = None
  augment: pipeline.Augment | None = None
  task_train: dict[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] = ()


def sample_prompts(inputs: Inputs, split: str, count: int, prompt_tokens: int
                   ) -> list[list[int]]:
  """Token ids of prompts for sampled completions: the first `count` examples of `split`.

  A chat prompt is a conversation up to its first assistant message, followed
  by the assistant's generation prompt; a text prompt is the first
  `prompt_tokens` tokens of a passage.
  """
  source = inputs.raw[split]
  prompts = []
  for index in range(min(count, len(source))):
    example = source[index]
    if inputs.chat is not None:
      where = f"example {lm.decode_text(example.get('id', index))}"
      messages = lm.parse_messages(example["messages"], where)
      first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
      prompts.append(inputs.chat.prompt_ids(messages[:first_answer]))
    else:
      passage = lm.decode_text(example["text"])
      prompts.append(inputs.tokenizer(passage, add_special_tokens=False)["input_ids"]
                     [:prompt_tokens])
  return prompts


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Each array of a batch of `config`'s data: {key: (shape after the batch dim, dtype)}.

  Tokenized classification examples, images with their labels, or packed
  language-model rows (`lm.ROW_KEYS`), plus the pipeline's `mask`; known from
  the config alone.

  Raises:
    ConfigError: for an unknown data set.
  """
  kind = data_kind(config)[0]
  if kind == "classification":
    length = (config.data.max_length,)
    spec = {key: (length, np.int32) for key in tokenizer_lib.OUTPUT_KEYS}
    spec["label"] = ((), np.int32)
    if task_classes(config):
      spec["task"] = ((), np.int32)
  elif kind == "image":
    size = config.data.image_size
    spec = {"image": ((size, size, 3), np.float32), "label": ((), np.int32),
            "label_mix": ((), np.int32), "mix": ((), np.float32)}
  else:
    length = (config.data.max_length,)
    spec = {key: (length, np.bool_ if key == "loss_mask" else np.int32) for key in lm.ROW_KEYS}
  spec["mask"] = ((), np.bool_)
  return spec


def build_extra_evals(config: ml_collections.ConfigDict, inputs: Inputs
                      ) -> dict[str, Inputs]:
  """The data sets of `config.data.extra_eval`, by name: each a packaged data set whose
  validation split is evaluated beside the run's own (e.g. `shakespeare` perplexity
  while chat-tuning), prepared as `config.data` says for the run's data.

  Raises:
    ConfigError: for a name that is the run's data set, a split name or repeated, data of
      another task, or classification data with other classes.
  """
  extra = {}
  for name in config.data.extra_eval:
    if name in (config.data.name, "train", "validation", "test", "samples") or name in extra:
      raise ConfigError(f"config.data.extra_eval={tuple(config.data.extra_eval)!r}: {name!r} "
                        "is the run's data set, a split name or named twice")
    other = config.copy_and_resolve_references()
    with other.unlocked():
      other.data.name, other.data.source_path, other.data.extra_eval = name, "", ()
    other.lock()
    if name not in KINDS or data_kind(other)[1] != config.task:
      raise ConfigError(f"config.data.extra_eval: {name!r} is not a packaged data set of the "
                        f"task {config.task!r}; choose from "
                        f"{sorted(n for n, (_, t) in KINDS.items() if t == config.task)}")
    extra[name] = build(other)
    if extra[name].class_names != inputs.class_names:
      raise ConfigError(f"config.data.extra_eval: {name!r} has the classes "
                        f"{list(extra[name].class_names)}, the run's data "
                        f"{list(inputs.class_names)}")
  return extra


def with_class_count(config: ml_collections.ConfigDict, inputs: Inputs
                     ) -> ml_collections.ConfigDict:
  """`config` with `model.num_classes` set to the data's class count where it is 0.

  Raises:
    ConfigError: a class count that is neither 0 nor the data's.
  """
  if config.task != "classification" or not inputs.class_names:
    return config
  count = len(inputs.class_names)
  if config.model.num_classes == count:
    return config
  if config.model.num_classes != 0:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes}: the data has "
                      f"{count} classes {list(inputs.class_names)}; set it to {count}, or to "
                      "0 to take the data's count")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.num_classes = count
  config.lock()
  return config


def _rows_unchanged(batch: pipeline.Batch) -> pipeline.Batch:
  return batch


def build(config: ml_collections.ConfigDict) -> Inputs:
  """Loads the data set of `config.data` and prepares it for the model.

  Text is tokenized with the tokenizer of the pretrained model folder
  (`config.model.pretrained`) unless `config.data.tokenizer` names one (a
  tokenizer file for classification; a model folder or packaged model name for
  language models).

  Args:
    config: a run config (`task`, `seed`, `model` and the `data` section are read).

  Returns:
    The run's Inputs.
  """
  data = config.data
  if task_classes(config):
    return _multi_task_inputs(config)
  kind, task = data_kind(config)
  if config.task != task:
    raise ConfigError(f"config.data.name={data.name!r} is {kind} data, scored by task "
                      f"{task!r}, but config.task={config.task!r}")
  files = data.name in (*table_files.FORMATS, file_images.FOLDER_FORMAT)
  reads = {"classification": "classification_files", "image": "image_files"}.get(
      kind, kind) if files else kind
  missing = [key for key in _DATA_KEYS[reads] if key not in data]
  if missing:
    raise ConfigError(f"config.data.name={data.name!r} is {kind} data, which needs "
                      f"config.data keys {missing} that this config lacks (a config of "
                      "another kind of data?)")
  if files:
    splits, class_names, kind = _file_splits(data, kind)
  else:
    splits = sources.load_splits(data.name, os.path.expanduser(data.data_dir),
                                 data.source_path or None)
    class_names = _CLASS_NAMES.get(data.name, ())
  if kind == "image":
    return _image_inputs(config, splits, class_names, encoded=files)
  if kind == "classification":
    tokenizer = _text_tokenizer(config)
    for split in ("validation", "test"):
      splits[split] = pipeline.Head(splits[split], data.max_eval_examples)
    pair_key = "text_pair" if files and data.columns.text_pair else None
    return Inputs(kind, splits, pipeline.text_classification_preprocess(
        tokenizer, pair_key=pair_key), tokenizer, class_names=class_names)
  tokenizer_dir = assets.model_dir(data.tokenizer or config.model.pretrained) if (
      data.tokenizer or config.model.pretrained) else ""
  return _language_model_inputs(config, kind, splits, tokenizer_dir)


def _file_splits(data: ml_collections.ConfigDict, kind: str
                 ) -> tuple[dict[str, Any], tuple[str, ...], str]:
  """The splits of `config.data.files`, their class names (classification) and kind of
  data ("classification", "image", or for language-model files "chat" or "text")."""
  if not data.files.train:
    raise ConfigError(f"config.data.name={data.name!r} reads files: set "
                      "config.data.files.train (and optionally .validation, .test)")
  if data.name == table_files.HF_DISK:
    files = _hf_disk_files(data.files)
  else:
    expand = (functools.partial(file_images.expand, data.name) if kind == "image"
              else table_files.expand)
    files = [expand(data.files[split], f"config.data.files.{split}") if data.files[split]
             else [] for split in sources.SPLITS]
  if len(data.split) != 3:
    raise ConfigError(f"config.data.split={tuple(data.split)!r}: needs train, validation and "
                      "test fractions")
  data_dir = os.path.expanduser(data.data_dir)
  try:
    local_builder.check_fractions(data.split)
  except ValueError as e:
    raise ConfigError(f"config.data.split={tuple(data.split)!r}: {e}") from e
  if kind == "language_model_files":
    config = file_lm.config_for(data.name, files, dict(data.columns), data.split)
    splits, _ = sources.load_file_splits(file_lm.FileLanguageModel, config, data_dir)
    return splits, (), "text" if config.kind == "text" else "chat"
  module, builder = ((file_images, file_images.FileImages) if kind == "image" else
                     (file_classification, file_classification.FileClassification))
  config = module.config_for(data.name, files, dict(data.columns), data.labels, data.split)
  splits, info = sources.load_file_splits(builder, config, data_dir)
  return splits, tuple(info.features["label"].names), kind


_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"),
                "test": ("test",)}


def _hf_disk_files(files: ml_collections.ConfigDict) -> list[list[str]]:
  """The Dataset folders of each split: `files.<split>`, a Dataset folder or a DatasetDict
  folder's same-named split; a split not named is taken from a DatasetDict in
  `files.train` when it has one (validation: also "valid" or "dev")."""
  train = table_files.hf_disk_splits(files.train, "config.data.files.train")
  folders = []
  for split in sources.SPLITS:
    key = f"config.data.files.{split}"
    found = table_files.hf_disk_splits(files[split], key) if files[split] else (
        {} if "" in train else train)
    if "" in found:
      folders.append([found[""]])
      continue
    named = [found[n] for n in _SPLIT_NAMES[split] if n in found]
    if not named and (files[split] or split == "train"):
      raise ConfigError(f"{key}={files[split]!r}: a DatasetDict without a {split} split "
                        f"(it has {sorted(found)})")
    folders.append(named[:1])
  return folders


def _text_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.TextTokenizer:
  """The tokenizer file `config.data.tokenizer`, else the pretrained model's."""
  pretrained = config.model.pretrained
  path = config.data.tokenizer or os.path.join(
      assets.model_dir(pretrained) if pretrained else "", "tokenizer.json")
  return tokenizer_lib.load_tokenizer(path, config.data.max_length)


def _multi_task_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """Every task's splits, tagged with the task; training examples mixed (`mixture`)."""
  data = config.data
  names = mixture.task_names(data.name)
  train_examples = tuple(data.get("train_examples", ())) or (0,) * len(names)
  mixing = data.get("mixing", "proportional")
  parts: dict[str, list[Sequence[Any]]] = {"train": [], "validation": [], "test": []}
  for task, name in enumerate(names):
    splits = sources.load_splits(name, os.path.expanduser(data.data_dir), None)
    splits["train"] = pipeline.Head(splits["train"], train_examples[task])
    for split in ("validation", "test"):
      splits[split] = pipeline.Head(splits[split], data.max_eval_examples)
    for split, source in splits.items():
      parts[split].append(mixture.Tagged(source, task))
  splits = {"train": mixture.training_mixture(parts["train"], mixing,
                                              data.get("weights", ()), config.seed),
            "validation": mixture.Concatenation(parts["validation"]),
            "test": mixture.Concatenation(parts["test"])}
  log_line(f"tasks {names}: {len(splits['train'])} training entries ({mixing} mixing of "
           f"{[len(p) for p in parts['train']]} examples), "
           f"{[len(p) for p in parts['validation']]} validation examples")
  tokenizer = _text_tokenizer(config)
  return Inputs("classification", splits, pipeline.text_classification_preprocess(tokenizer),
                tokenizer, task_train=dict(zip(names, parts["train"])),
                class_names=tuple(f"{name}/{label}" for name in names
                                  for label in TEXT_CLASSES[name]))


def _image_inputs(config: ml_collections.ConfigDict, splits: dict[str, Sequence[Any]],
                  class_names: tuple[str, ...], encoded: bool) -> Inputs:
  """`encoded`: the images are image files' bytes (the user's own files)."""
  data = config.data
  num_classes = config.model.num_classes or len(class_names)  # 0: the data's count
  if data.shots > 0:
    splits["train"] = images.few_shot(splits["train"], data.shots, config.seed, num_classes)
    log_line(f"{data.name}: training on {data.shots} examples per class "
             f"({len(splits['train'])} in all, seed {config.seed})")
  for split in ("validation", "test"):
    splits[split] = pipeline.Head(splits[split], data.max_eval_examples)
  preprocess = images.image_classification_preprocess(data.image_size, data.mean, data.std,
                                                      num_classes, encoded=encoded)
  return Inputs("image", splits, preprocess, None,
                augment=augment_lib.from_config(data.augment), class_names=class_names)


def _language_model_inputs(config: ml_collections.ConfigDict, kind: str,
                           splits: dict[str, Sequence[Any]], tokenizer_dir: str) -> Inputs:
  data = config.data
  if not tokenizer_dir:
    raise ConfigError("config.data.tokenizer is empty and the model has no pretrained "
                      "folder: language-model data needs a tokenizer")
  tokenizer = tokenizer_lib.load_hf_tokenizer(tokenizer_dir)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  formatter = lm.ChatFormatter(tokenizer) if kind == "chat" else None
  raw = {"train": pipeline.Head(splits["train"], data.get("max_train_examples", 0))}
  for split in ("validation", "test"):
    raw[split] = pipeline.Head(splits[split], data.max_eval_examples)
  packed = {}
  for split, source in raw.items():
    seed = config.seed if split == "train" else None
    if kind == "chat":
      packed[split] = lm.pack_chat(source, formatter, max_length=data.max_length,
                                   pad_id=pad_id, overlong=data.get("overlong", "split"),
                                   order_seed=seed)
    else:
      packed[split] = lm.pack_text(source, tokenizer, max_length=data.max_length,
                                   pad_id=pad_id, order_seed=seed)
    log_line(packed[split].stats.summary(f"{data.name} {split}"))
  return Inputs(kind, packed, _rows_unchanged, tokenizer, raw, formatter)

"""What a run feeds its model: the splits, the per-batch preprocessing and the tokenizer.

Data sets come in four kinds. Classification data (texts with labels) is
tokenized batch by batch to a fixed length. Image data (images with labels) is
resized and normalised batch by batch for the model (`ftjax.data.images`), and
training batches may be augmented (`ftjax.data.augment`); `config.data.shots`
> 0 trains on that many examples per class. Chat and plain-text data for
language models is tokenized and packed once, when the run starts, into rows
of `config.data.max_length` tokens (see `ftjax.data.lm`); the packed rows are
then the examples the grain pipelines shuffle, shard across hosts and batch.

What `config.data.name` may name is `ftjax.data.registry`'s. Text
classification data sets joined by "+" (`"rotten_tomatoes+tweets"`,
`"tweets+csv:tickets.csv"`) make a multi-task run: one model, each task its own
block of the classes (in the order named), examples tagged with their task and
mixed for training as `config.data.mixing` says (see `ftjax.data.mixture`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from ftjax.data import augment as augment_lib
from ftjax.data import (file_classification, file_images, file_lm, file_preference, images,
                        lm, local_builder, mixture, pipeline, preference, registry, sources,
                        table_files)
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import ConfigError, DataError
from ftjax.hub import assets
from ftjax.metrics import log_line

@dataclasses.dataclass
class Inputs:
  """A run's input side.

  Attributes:
    kind: "classification", "image", "chat", "text", "preference" (pair rows for a
      language model) or "reward" (text pairs for a reward model).
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
      a multi-task run's "<task>/<class>" in task order); empty for language-model
      data.
    task_classes: (name, number of classes) of each task of a multi-task run, in
      order; empty for other runs.
    batch_spec: what a batch holds (`registry.batch_spec`).
    render: reward data: a conversation -> its text under the chat template (the
      tokenizer loaded on first use); None for other data.
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
  task_classes: tuple[tuple[str, int], ...] = ()
  batch_spec: dict[str, tuple[tuple[int, ...], Any]] = dataclasses.field(default_factory=dict)
  render: Any = None


def sample_prompts(inputs: Inputs, split: str, count: int, prompt_tokens: int
                   ) -> list[list[int]]:
  """Token ids of prompts for sampled completions: the first `count` examples of `split`.

  A chat prompt is a conversation up to its first assistant message, followed
  by the assistant's generation prompt; a text prompt is the first
  `prompt_tokens` tokens of a passage; a preference pair's prompt is tokenized as
  in training (pairs without a prompt are passed over).
  """
  source = inputs.raw[split]
  prompts = []
  for index in range(len(source)):
    if len(prompts) == count:
      break
    example = source[index]
    if inputs.kind == "preference":
      prompt = preference.decode_pair(example)["prompt"]
      ids = (inputs.tokenizer(prompt)["input_ids"] if isinstance(prompt, str)
             else inputs.chat.prompt_ids(prompt))
      if ids:
        prompts.append(ids)
    elif inputs.chat is not None:
      where = f"example {lm.decode_text(example.get('id', index))}"
      messages = lm.parse_messages(example["messages"], where)
      first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
      prompts.append(inputs.chat.prompt_ids(messages[:first_answer]))
    else:
      passage = lm.decode_text(example["text"])
      prompts.append(inputs.tokenizer(passage, add_special_tokens=False)["input_ids"]
                     [:prompt_tokens])
  return prompts


def build_extra_evals(config: ml_collections.ConfigDict, inputs: Inputs
                      ) -> dict[str, Inputs]:
  """The data sets of `config.data.extra_eval`, by name, evaluated beside the run's
  validation split (e.g. `shakespeare` perplexity while chat-tuning): a packaged data
  set's validation split, or every row of `<format>:<files>` (classification: labels
  among the run's classes), prepared as `config.data` says for the run's data.

  Raises:
    ConfigError: for a name that is the run's data set, a split name or repeated, a bare
      file format, data of another task, or classification data with other classes.
  """
  extra = {}
  for name in config.data.extra_eval:
    data_set = registry.resolve(name, config)
    if (name in (config.data.name, "train", "validation", "test", "samples")
        or data_set.name in extra):
      raise ConfigError(f"config.data.extra_eval={tuple(config.data.extra_eval)!r}: {name!r} "
                        "is the run's data set, a split name or named twice")
    if not data_set.preset and not data_set.own_classes:
      raise ConfigError(f"config.data.extra_eval: {name!r} would read config.data.files, "
                        "the run's own data; name files as '<format>:<files>'")
    if data_set.task != config.task:
      raise ConfigError(f"config.data.extra_eval: {name!r} is {data_set.kind} data, not data "
                        f"of the task {config.task!r}; packaged data sets of that task: "
                        f"{sorted(n for n, p in registry.presets().items() if p.task == config.task)}")
    if data_set.own_classes:  # every row evaluated, under the run's classes
      data_set = dataclasses.replace(data_set, files=(data_set.files[0],) * 3,
                                     own_classes=False)
    extra[data_set.name] = _data_set_inputs(config, data_set, source_path=None,
                                            labels=inputs.class_names)
    if extra[data_set.name].class_names != inputs.class_names:
      raise ConfigError(f"config.data.extra_eval: {name!r} has the classes "
                        f"{list(extra[data_set.name].class_names)}, the run's data "
                        f"{list(inputs.class_names)}")
  return extra


def with_class_count(config: ml_collections.ConfigDict, inputs: Inputs
                     ) -> ml_collections.ConfigDict:
  """`config` with `model.num_classes` set to the data's class count where it is 0.

  Raises:
    ConfigError: a class count that is neither 0 nor the data's.
  """
  if config.task not in ("classification", "reward") or not inputs.class_names:
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
  """Loads the data set(s) of `config.data` and prepares them for the model.

  Text is tokenized with the tokenizer of the pretrained model folder
  (`config.model.pretrained`) unless `config.data.tokenizer` names one (a
  tokenizer file for classification; a model folder or packaged model name for
  language models).

  Args:
    config: a run config (`task`, `seed`, `model` and the `data` section are read).

  Returns:
    The run's Inputs.

  Raises:
    ConfigError: for what `registry.check` refuses.
  """
  sets = registry.check(config)
  if len(sets) > 1:
    return _multi_task_inputs(config, sets)
  return _data_set_inputs(config, sets[0], source_path=config.data.source_path or None,
                          labels=config.data.labels)


def _data_set_inputs(config: ml_collections.ConfigDict, data_set: registry.DataSet,
                     source_path: str | None, labels: Sequence[Any]) -> Inputs:
  """The Inputs of one data set (`source_path`: a preset's custom source; `labels`: the
  class names of files whose classes are not their own)."""
  data = config.data
  splits, class_names, kind = _load_splits(data, data_set, source_path, labels)
  if kind == "image":
    return _image_inputs(config, splits, class_names, encoded=not data_set.preset)
  if kind == "reward":
    tokenizer = _text_tokenizer(config)
    for split in ("validation", "test"):
      splits[split] = pipeline.Head(splits[split], data.max_eval_examples)
    # One output, named "reward" (an export's `id2label`: transformers' num_labels=1).
    render = _renderer(config)
    return Inputs(kind, splits, preference.reward_preprocess(tokenizer, render), tokenizer,
                  raw=dict(splits), class_names=("reward",), render=render,
                  batch_spec=registry.batch_spec(kind, data))
  if kind == "classification":
    tokenizer = _text_tokenizer(config)
    for split in ("validation", "test"):
      splits[split] = pipeline.Head(splits[split], data.max_eval_examples)
    pair_key = "text_pair" if not data_set.preset and data.columns.text_pair else None
    return Inputs(kind, splits, pipeline.text_classification_preprocess(
        tokenizer, pair_key=pair_key), tokenizer, class_names=class_names,
                  batch_spec=registry.batch_spec(kind, data))
  tokenizer_dir = assets.model_dir(data.tokenizer or config.model.pretrained) if (
      data.tokenizer or config.model.pretrained) else ""
  return _language_model_inputs(config, kind, splits, tokenizer_dir)


def _load_splits(data: ml_collections.ConfigDict, data_set: registry.DataSet,
                 source_path: str | None, labels: Sequence[Any]
                 ) -> tuple[dict[str, Any], tuple[str, ...], str]:
  """The splits of a data set, its class names (classification) and kind of data
  ("classification", "image", "chat" or "text"), prepared in `config.data.data_dir`."""
  data_dir = os.path.expanduser(data.data_dir)
  if data_set.preset:
    splits = sources.load_splits(data_set.preset.name, data_dir, source_path)
    return splits, data_set.preset.class_names, data_set.kind
  if data_set.format == table_files.HF_DISK:
    files = _hf_disk_files(data_set.files, data_set.settings)
  else:
    expand = (functools.partial(file_images.expand, data_set.format)
              if data_set.kind == "image" else table_files.expand)
    files = [expand(spec, setting) if spec else []
             for spec, setting in zip(data_set.files, data_set.settings)]
  if len(data.split) != 3:
    raise ConfigError(f"config.data.split={tuple(data.split)!r}: needs train, validation and "
                      "test fractions")
  try:
    local_builder.check_fractions(data.split)
  except ValueError as e:
    raise ConfigError(f"config.data.split={tuple(data.split)!r}: {e}") from e
  if data_set.kind in ("preference", "reward"):
    config = file_preference.config_for(data_set.format, files, dict(data.columns), data.split)
    try:
      splits, _ = sources.load_file_splits(file_preference.FilePreference, config, data_dir)
    except DataError as e:  # list every malformed row
      raise file_preference.every_problem(e, config) from e
    return splits, (), data_set.kind
  if data_set.kind == "language_model_files":
    config = file_lm.config_for(data_set.format, files, dict(data.columns), data.split)
    try:
      splits, _ = sources.load_file_splits(file_lm.FileLanguageModel, config, data_dir)
    except DataError as e:  # list every malformed row, as OpenAI's file check does
      raise file_lm.every_problem(e, config) from e
    return splits, (), "text" if config.kind == "text" else "chat"
  module, builder = ((file_images, file_images.FileImages) if data_set.kind == "image" else
                     (file_classification, file_classification.FileClassification))
  config = module.config_for(data_set.format, files, dict(data.columns),
                             () if data_set.own_classes else labels, data.split)
  splits, info = sources.load_file_splits(builder, config, data_dir)
  return splits, tuple(info.features["label"].names), data_set.kind


_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"),
                "test": ("test",)}


def _hf_disk_files(files: Sequence[str], settings: Sequence[str] = registry.FILE_SETTINGS
                   ) -> list[list[str]]:
  """The Dataset folders of each split: its files setting, a Dataset folder or a
  DatasetDict folder's same-named split; a split not named is taken from a DatasetDict
  in the train setting when it has one (validation: also "valid" or "dev"). `settings`
  name each split's setting in errors."""
  train = table_files.hf_disk_splits(files[0], settings[0])
  folders = []
  for spec, split, key in zip(files, local_builder.SPLIT_NAMES, settings):
    found = table_files.hf_disk_splits(spec, key) if spec else ({} if "" in train else train)
    if "" in found:
      folders.append([found[""]])
      continue
    named = [found[n] for n in _SPLIT_NAMES[split] if n in found]
    if not named and (spec or split == "train"):
      raise ConfigError(f"{key}={spec!r}: a DatasetDict without a {split} split "
                        f"(it has {sorted(found)})")
    folders.append(named[:1])
  return folders


def _renderer(config: ml_collections.ConfigDict) -> preference.Render:
  """Renders a conversation as text with the chat template of `config.data.chat_template`
  or the model's tokenizer (loaded on first use; a tokenizer without one is refused)."""

  @functools.cache
  def formatter() -> lm.ChatFormatter:
    source = config.data.tokenizer or config.model.pretrained
    tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir(source))
    return lm.ChatFormatter(tokenizer, *lm.chat_template(config.data.chat_template))

  return lambda messages: formatter().render(messages)


def _text_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.TextTokenizer:
  """The tokenizer of `config.data.tokenizer` (a packaged model name, a folder or a
  tokenizer.json file), else the pretrained model's."""
  source = config.data.tokenizer or config.model.pretrained
  path = source if os.path.isfile(source) else tokenizer_lib.tokenizer_file(
      assets.model_dir(source) if source else "")
  return tokenizer_lib.load_tokenizer(path, config.data.max_length)


def _multi_task_inputs(config: ml_collections.ConfigDict, sets: list[registry.DataSet]
                       ) -> Inputs:
  """Every task's splits, tagged with the task; training examples mixed (`mixture`)."""
  data = config.data
  names = [data_set.name for data_set in sets]
  train_examples = tuple(data.train_examples) or (0,) * len(names)
  mixing = data.mixing
  parts: dict[str, list[Sequence[Any]]] = {"train": [], "validation": [], "test": []}
  class_names, task_classes = [], []
  for task, data_set in enumerate(sets):
    splits, classes, _ = _load_splits(data, data_set, None, data.labels)
    class_names += [f"{data_set.name}/{label}" for label in classes]
    task_classes.append((data_set.name, len(classes)))
    splits["train"] = pipeline.Head(splits["train"], train_examples[task])
    for split in ("validation", "test"):
      splits[split] = pipeline.Head(splits[split], data.max_eval_examples)
    for split, source in splits.items():
      parts[split].append(mixture.Tagged(source, task))
  splits = {"train": mixture.training_mixture(parts["train"], mixing,
                                              data.weights, config.seed),
            "validation": mixture.Concatenation(parts["validation"]),
            "test": mixture.Concatenation(parts["test"])}
  log_line(f"tasks {names}: {len(splits['train'])} training entries ({mixing} mixing of "
           f"{[len(p) for p in parts['train']]} examples), "
           f"{[len(p) for p in parts['validation']]} validation examples")
  tokenizer = _text_tokenizer(config)
  return Inputs("classification", splits, pipeline.text_classification_preprocess(
      tokenizer), tokenizer, task_train=dict(zip(names, parts["train"])),
                class_names=tuple(class_names), task_classes=tuple(task_classes),
                batch_spec=registry.batch_spec("classification", data, multi_task=True))


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
                augment=augment_lib.from_config(data.augment), class_names=class_names,
                batch_spec=registry.batch_spec("image", data))


def _language_model_inputs(config: ml_collections.ConfigDict, kind: str,
                           splits: dict[str, Sequence[Any]], tokenizer_dir: str) -> Inputs:
  data = config.data
  if not tokenizer_dir:
    raise ConfigError("config.data.tokenizer is empty and the model has no pretrained "
                      "folder: language-model data needs a tokenizer")
  tokenizer = tokenizer_lib.load_hf_tokenizer(tokenizer_dir)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  formatter = (lm.ChatFormatter(tokenizer, *lm.chat_template(data.chat_template))
               if kind == "chat" or (kind == "preference" and _has_template(tokenizer, data))
               else None)
  raw = {"train": pipeline.Head(splits["train"], data.max_train_examples)}
  for split in ("validation", "test"):
    raw[split] = pipeline.Head(splits[split], data.max_eval_examples)
  packed = {}
  for split, source in raw.items():
    seed = config.seed if split == "train" else None
    if kind == "preference":  # one row per pair, in order: the reference cache follows it
      packed[split] = preference.tokenize_pairs(
          source, preference.PairTokenizer(tokenizer, formatter), max_length=data.max_length,
          pad_id=pad_id, overlong=data.overlong)
    elif kind == "chat":
      packed[split] = lm.pack_chat(source, formatter, max_length=data.max_length,
                                   pad_id=pad_id, overlong=data.overlong,
                                   order_seed=seed)
    else:
      packed[split] = lm.pack_text(source, tokenizer, max_length=data.max_length,
                                   pad_id=pad_id, order_seed=seed)
    log_line(packed[split].stats.summary(f"{data.name} {split}"))
  return Inputs(kind, packed, _rows_unchanged, tokenizer, raw, formatter,
                batch_spec=registry.batch_spec(kind, data))


def _has_template(tokenizer: Any, data: ml_collections.ConfigDict) -> bool:
  """Whether conversations can be rendered: config.data.chat_template or the tokenizer's."""
  return bool(data.chat_template or getattr(tokenizer, "chat_template", None))

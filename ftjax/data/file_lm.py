"""Language-model data from the user's own files (JSON Lines / JSON, CSV, TSV, Parquet).

`config.data.name` is the format and `config.data.files.train` / `.validation`
/ `.test` name the files, as for classification (`file_classification`). What a
row holds is named by `config.data.columns`:

- `messages` (default "messages"): a conversation in OpenAI's fine-tuning chat
  format, a list of {"role": "system" | "user" | "assistant", "content"} (an
  optional first system message, then user and assistant alternating; an
  assistant message's "weight" 0 leaves it untrained), or its JSON text in a
  CSV / TSV cell;
- `prompt` and `completion` (TRL's prompt-completion and OpenAI's legacy
  format): strings, or lists of messages (the prompt's ending on a user turn,
  the completion's of assistant turns); only the completion is trained;
- `text`: a passage for domain adaptation, every token trained.

The first of these whose columns the first training row has (`messages`,
then `prompt` with `completion`, then `text`; a column set to "" is never
used) decides, as TRL tells its data formats apart. Chat
examples are {"id", "source", "messages"} like the packaged chat data set's,
text examples {"id", "text"}. A split without a file of its own is cut from the
training files: seeded (seed 0) by the fractions `config.data.split` of the
splits that have no file, an example placed by a hash of its content, so exact
duplicates share a split. Rows stream through twice while preparing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from ftjax.data import file_builder, openai_chat, table_files
from ftjax.errors import DataError

KINDS = ("messages", "prompt_completion", "text")


@dataclasses.dataclass
class LmFilesConfig(tfds.core.BuilderConfig):
  """What to read: the format, the files of each split, the columns and their kind."""

  format: str = "json"
  files: tuple[tuple[str, ...], ...] = ((), (), ())  # train, validation, test
  kind: str = "messages"  # one of KINDS
  columns: tuple[str, ...] = ("messages",)  # the kind's columns
  fractions: tuple[float, ...] = (0.9, 0.05, 0.05)


def kind_of(fmt: str, first_file: str, columns: dict[str, str]) -> tuple[str, tuple[str, ...]]:
  """(kind, its columns): the first kind whose columns the first row of `first_file` has.

  Raises:
    DataError: naming the row when it has none of them.
  """
  candidates = (("messages", (columns["messages"],)),
                ("prompt_completion", (columns["prompt"], columns["completion"])),
                ("text", (columns["text"],)))
  return table_files.first_row_kind(first_file, fmt, candidates, lambda where, row: (
      f"{where}: the row has the columns {sorted(row)}, none of config.data.columns' "
      f"messages ({columns['messages']!r}), prompt and completion ({columns['prompt']!r}, "
      f"{columns['completion']!r}) or text ({columns['text']!r})"))


def config_for(fmt: str, files: Sequence[Sequence[str]], columns: dict[str, str],
               fractions: Sequence[float]) -> LmFilesConfig:
  """The builder config of a set of files, named after them, their versions and settings."""
  files = tuple(tuple(paths) for paths in files)
  kind, used = kind_of(fmt, files[0][0], columns)
  name = table_files.config_name(fmt, files, kind, used, tuple(fractions))
  return LmFilesConfig(name=name, description=f"{fmt} files {files}", format=fmt,
                       files=files, kind=kind, columns=used, fractions=tuple(fractions))


def _messages(where: str, value: Any, column: str) -> list[Any]:
  """A list of messages from a cell: a list, or JSON text of one (CSV / TSV)."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: column {column!r}: not a JSON list of messages: {e.msg}") from e
  if not isinstance(value, list):
    raise DataError(f"{where}: column {column!r}: expected a list of messages, found a "
                    f"{type(value).__name__}")
  return value


def _prompt_completion(where: str, prompt: Any, completion: Any, columns: Sequence[str]
                       ) -> list[Any]:
  """The conversation of a prompt and its completion (strings or message lists)."""
  if isinstance(prompt, str) and isinstance(completion, str):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
  if isinstance(prompt, str) or isinstance(completion, str):
    raise DataError(f"{where}: columns {list(columns)}: give both as strings or both as "
                    "lists of messages")
  completion = _messages(where, completion, columns[1])
  if not completion or any(not isinstance(m, dict) or m.get("role") != "assistant"
                           for m in completion):
    raise DataError(f"{where}: column {columns[1]!r}: the completion must be assistant "
                    "messages")
  return _messages(where, prompt, columns[0]) + completion


def _example(config: LmFilesConfig, where: str, number: int, row: dict[str, Any]
             ) -> dict[str, str] | None:
  """The example of the `number`-th row of a file, at `where`; None for a conversation
  without an assistant turn.

  Raises:
    DataError: naming `where` and the column for a malformed row.
  """
  missing = [c for c in config.columns if row.get(c) is None]
  if missing:
    raise DataError(f"{where}: no value in column(s) {missing}; the row has columns "
                    f"{sorted(row)}")
  values = [row[c] for c in config.columns]
  if config.kind == "text":
    if not isinstance(values[0], str) or not values[0].strip():
      raise DataError(f"{where}: column {config.columns[0]!r}: expected a non-empty text")
    return {"text": values[0]}
  messages = (_messages(where, values[0], config.columns[0]) if config.kind == "messages"
              else _prompt_completion(where, *values, config.columns))
  conversation = openai_chat.parse_record(where, number, {"messages": messages})
  if not any(m["role"] == "assistant" for m in conversation["messages"]):
    return None
  return {"source": "custom", "messages": json.dumps(conversation["messages"],
                                                     ensure_ascii=False)}


def every_problem(error: DataError, config: LmFilesConfig) -> DataError:
  """`error`, or one listing every malformed row of `config`'s files when there are more."""
  return table_files.every_problem(
      error, config.files, config.format,
      lambda where, number, row: _example(config, where, number, row))


class FileLanguageModel(file_builder.FilesBuilder, skip_registration=True):
  """Conversations or passages read from files named by an `LmFilesConfig`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Chat, prompt-completion and text rows from JSON, CSV, TSV or "
                            "Parquet files."}
  BUILDER_CONFIGS = [LmFilesConfig(name="default")]
  LABELLED = False

  def _info(self) -> tfds.core.DatasetInfo:
    names = ("id", "text") if self.builder_config.kind == "text" else ("id", "source",
                                                                        "messages")
    return self._dataset_info({name: tfds.features.Text() for name in names}, license_text="")

  def _examples_of(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, example) of each row of `paths` that makes one (chats without an
    assistant turn are skipped)."""
    config = self.builder_config
    for path in paths:
      for number, (where, row) in enumerate(table_files.read_rows(path, config.format), 1):
        example = _example(config, where, number, row)
        if example is not None:
          yield where, example

  def _content(self, example: dict[str, Any]) -> str:
    return json.dumps(example, sort_keys=True)

  def _example_id(self, split: str, index: int) -> str:
    return f"{split}/{index}"

"""Preference pairs from the user's own files (JSON Lines / JSON, CSV, TSV, Parquet).

A pair is a prompt with a chosen and a rejected completion. Rows come in the
formats TRL and OpenAI's fine-tuning API read, told apart by the first training
row's columns (names from `config.data.columns`):

- explicit prompt: `prompt`, `chosen`, `rejected`: three strings, or three
  lists of messages (the prompt's ending on a user turn, each completion
  assistant turns);
- implicit prompt: `chosen` and `rejected` only: two strings or two whole
  conversations; the prompt is what they share at the start (the leading
  messages both have, or the longest common prefix of the strings, as TRL's
  `extract_prompt` cuts it);
- OpenAI's preference format: `input` ({"messages": [...]}: the prompt),
  `preferred_output` and `non_preferred_output` (lists of assistant messages).

A row missing a side, a completion that is not assistant turns, a prompt and
completions of different forms (a string and messages), or anything else
malformed stops preparation with an error naming the file, the row and the
column; every malformed row is listed (`every_problem`). Pairs whose chosen and
rejected are identical are kept and reported by the data check. Examples are
{"id", "prompt", "chosen", "rejected"}, each side as JSON text (a string or a
list of messages). A split without a file of its own is cut from the training
files by `config.data.split`, pairs placed by their prompt, so the pairs of one
prompt share a split.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from ftjax.data import file_builder, openai_chat, table_files
from ftjax.errors import DataError

OPENAI_COLUMNS = ("input", "preferred_output", "non_preferred_output")
KINDS = ("explicit", "implicit", "openai")
SIDES = ("prompt", "chosen", "rejected")


@dataclasses.dataclass
class PreferenceFilesConfig(tfds.core.BuilderConfig):
  """What to read: the format, the files of each split, the row kind and its columns."""

  format: str = "json"
  files: tuple[tuple[str, ...], ...] = ((), (), ())  # train, validation, test
  kind: str = "explicit"  # one of KINDS
  columns: tuple[str, ...] = ("prompt", "chosen", "rejected")
  fractions: tuple[float, ...] = (0.9, 0.05, 0.05)


def kind_of(fmt: str, first_file: str, columns: dict[str, str]) -> tuple[str, tuple[str, ...]]:
  """(kind, its columns) of the first row of `first_file`.

  Raises:
    DataError: naming the row when it has none of the formats' columns.
  """
  explicit = (columns["prompt"], columns["chosen"], columns["rejected"])
  candidates = (("openai", OPENAI_COLUMNS), ("explicit", explicit), ("implicit", explicit[1:]))
  return table_files.first_row_kind(first_file, fmt, candidates, lambda where, row: (
      f"{where}: the row has the columns {sorted(row)}; preference data needs prompt, chosen "
      f"and rejected ({list(explicit)}, config.data.columns), chosen and rejected alone (the "
      f"prompt implicit), or OpenAI's {list(OPENAI_COLUMNS)}"))


def config_for(fmt: str, files: Sequence[Sequence[str]], columns: dict[str, str],
               fractions: Sequence[float]) -> PreferenceFilesConfig:
  """The builder config of a set of files, named after them, their versions and settings."""
  files = tuple(tuple(paths) for paths in files)
  kind, used = kind_of(fmt, files[0][0], columns)
  name = table_files.config_name(fmt, files, "preference", kind, used, tuple(fractions))
  return PreferenceFilesConfig(name=name, description=f"{fmt} preference files {files}",
                               format=fmt, files=files, kind=kind, columns=used,
                               fractions=tuple(fractions))


def _messages(where: str, value: Any, column: str, roles: Sequence[str]) -> list[dict]:
  """A non-empty list of {"role", "content"} messages whose roles are among `roles`."""
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: column {column!r}: expected a non-empty list of messages, "
                    f"found {type(value).__name__ if value != [] else 'an empty list'}")
  for i, message in enumerate(value):
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
      raise DataError(f"{where}: column {column!r}: message {i}: expected an object with "
                      "the keys 'role' and 'content' only")
    if message["role"] not in roles:
      raise DataError(f"{where}: column {column!r}: message {i}: role {message['role']!r}; "
                      f"expected {' or '.join(map(repr, roles))}")
  return [dict(m) for m in value]


def common_length(a: Sequence[Any], b: Sequence[Any]) -> int:
  """How many leading items (messages, characters or token ids) `a` and `b` share."""
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _common_prefix(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
  """How many leading items (messages or characters) the two share, backed off a space
  before the first difference of strings (TRL's `extract_prompt`)."""
  n = common_length(chosen, rejected)
  if isinstance(chosen, str) and n < min(len(chosen), len(rejected)) and n and (
      chosen[n - 1] == " "):
    n -= 1
  return n


def _implicit(where: str, chosen: Any, rejected: Any, columns: Sequence[str]
              ) -> tuple[Any, Any, Any]:
  """(prompt, chosen, rejected) of two whole strings or conversations."""
  if isinstance(chosen, str) and isinstance(rejected, str):
    n = _common_prefix(chosen, rejected)
    if chosen == rejected:  # identical: kept whole, reported by the data check
      n = 0
    return chosen[:n], chosen[n:], rejected[n:]
  if isinstance(chosen, str) or isinstance(rejected, str):
    raise DataError(f"{where}: columns {list(columns)}: give both as strings or both as "
                    "lists of messages")
  chosen = _messages(where, chosen, columns[0], ("system", "user", "assistant"))
  rejected = _messages(where, rejected, columns[1], ("system", "user", "assistant"))
  n = _common_prefix(chosen, rejected)
  if chosen == rejected:  # identical: the last turn is the completion
    n = len(chosen) - 1
  if n == 0:
    raise DataError(f"{where}: columns {list(columns)}: the conversations share no leading "
                    "messages, so there is no prompt")
  return chosen[:n], chosen[n:], rejected[n:]


def _explicit(where: str, prompt: Any, chosen: Any, rejected: Any, columns: Sequence[str]
              ) -> tuple[Any, Any, Any]:
  """(prompt, chosen, rejected) checked: three strings or three message lists."""
  values = (prompt, chosen, rejected)
  strings = [isinstance(v, str) for v in values]
  if all(strings):
    return prompt, chosen, rejected
  if any(strings):
    raise DataError(f"{where}: columns {list(columns)}: give all three as strings or all "
                    "three as lists of messages")
  return (_messages(where, prompt, columns[0], ("system", "user", "assistant")),
          _messages(where, chosen, columns[1], ("assistant",)),
          _messages(where, rejected, columns[2], ("assistant",)))


def _openai(where: str, record: Any, preferred: Any, rejected: Any) -> tuple[Any, Any, Any]:
  if not isinstance(record, dict) or "messages" not in record:
    raise DataError(f"{where}: column 'input': expected an object with 'messages'")
  if record.get("tools") or record.get("functions"):
    raise DataError(f"{where}: column 'input': tools and functions are not supported")
  return (_messages(where, record["messages"], "input.messages",
                    ("system", "user", "assistant")),
          _messages(where, preferred, "preferred_output", ("assistant",)),
          _messages(where, rejected, "non_preferred_output", ("assistant",)))


def pair_of(kind: str, columns: Sequence[str], where: str, number: int,
            row: dict[str, Any]) -> dict[str, Any]:
  """The pair {"prompt", "chosen", "rejected"} of a row (strings, or message lists).

  Raises:
    DataError: naming `where` and the column for a malformed row.
  """
  missing = [c for c in columns if row.get(c) is None]
  if missing:
    raise DataError(f"{where}: no value in column(s) {missing}; a preference pair needs "
                    f"{list(columns)}")
  values = [row[c] for c in columns]
  if kind == "openai":
    pair = _openai(where, *values)
  elif kind == "implicit":
    pair = _implicit(where, *values, columns)
  else:
    pair = _explicit(where, *values, columns)
  prompt, chosen, rejected = pair
  if isinstance(chosen, str):
    for column, text in zip(columns[-2:], (chosen, rejected)):
      if not text.strip():
        raise DataError(f"{where}: column {column!r}: the completion is empty")
    return dict(zip(SIDES, pair))
  if prompt[-1]["role"] != "user":
    raise DataError(f"{where}: the prompt ends with a {prompt[-1]['role']!r} message; it "
                    "must end with the user's turn")
  for completion in (chosen, rejected):  # each whole conversation well formed
    openai_chat.parse_record(where, number, {"messages": prompt + completion})
  return dict(zip(SIDES, pair))


def every_problem(error: DataError, config: PreferenceFilesConfig) -> DataError:
  """`error`, or one listing every malformed row of `config`'s files when there are more."""
  return table_files.every_problem(
      error, config.files, config.format,
      lambda where, number, row: pair_of(config.kind, config.columns, where, number, row))


class FilePreference(file_builder.FilesBuilder, skip_registration=True):
  """Preference pairs read from files named by a `PreferenceFilesConfig`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prompt / chosen / rejected pairs from JSON, CSV, TSV or "
                            "Parquet files (TRL's and OpenAI's preference formats)."}
  BUILDER_CONFIGS = [PreferenceFilesConfig(name="default")]
  LABELLED = False

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info({name: tfds.features.Text() for name in ("id", *SIDES)},
                              license_text="")

  def _examples_of(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    config = self.builder_config
    for path in paths:
      for number, (where, row) in enumerate(table_files.read_rows(path, config.format), 1):
        pair = pair_of(config.kind, config.columns, where, number, row)
        yield where, {side: json.dumps(pair[side], ensure_ascii=False) for side in SIDES}

  def _content(self, example: dict[str, Any]) -> str:
    if example["prompt"] == '""':  # no prompt: placed by the whole pair
      return json.dumps(example, sort_keys=True)
    return example["prompt"]  # the pairs of one prompt share a split

  def _example_id(self, split: str, index: int) -> str:
    return f"{split}/{index}"

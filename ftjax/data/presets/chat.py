"""Two-party conversations for instruction tuning, as a local TFDS data set.

The packaged corpus joins two sources, both read from installed packages that
are located, never imported:

* `chitchat_dataset` (the Chit Chat Challenge): `dataset.json` maps a key to
  {"messages": [[{"text", "timestamp", "sender"}, ...], ...], ...}, each inner
  list being consecutive messages by one sender. Texts are stripped and empty
  ones dropped; a turn is then a maximal run of messages by one sender, its
  texts joined with "\\n" (these are exactly the inner lists, except that a
  turn of only empty texts disappears and the turns either side of it, by the
  same sender, merge). The first sender is the "user", the other the
  "assistant". Conversations with one sender (an opening message nobody
  answered) or more than two are skipped. The `prompt`, `ratings` and
  timestamps are not kept.
* `chatterbot_corpus`: `data/english/*.yml`, each with `conversations:`, a
  list of lists of strings alternating user / assistant. An entry that is a
  bare string instead of a list (a YAML indentation slip) is a conversation
  of one user message; like any conversation without an assistant turn it is
  skipped. Texts are stripped; an empty one, or one that is not a string (an
  unquoted YAML number, say), is an error.

Every skipped conversation and dropped message is counted and logged. Exact
duplicate conversations (same roles and contents) would leak between splits;
all but the first in reading order are dropped and counted too. Of the
packaged 7,168 chitchat conversations 4,013 remain (3,151 have no reply, 4
are duplicates); of the 2,026 chatterbot ones 898 remain (1 bare string and
1,127 duplicates, 1,040 of them in `tech_support.yml`, whose 1,050 entries
hold 10 distinct exchanges).

A custom source is a JSONL file, one conversation per line, in OpenAI's
fine-tuning chat format: {"messages": [{"role": "system" | "user" |
"assistant", "content": str}, ...]}, an optional first system message, then
roles alternating and starting with "user"; an assistant message may carry
"weight": 0 (context, not trained) or 1 (the default). Optionally "id" (a
unique string; default "line<N>") and "source" (a string; default "custom");
other keys are ignored. Contents are kept as written. A conversation without
an assistant message is skipped and counted.

Each example is {"id", "source", "messages"}, `messages` being a JSON list of
{"role", "content"} (and "weight" where given); every conversation starts with
an optional system message and a user turn, alternates, and has at least one
assistant turn (it may end on an unanswered user turn).
The split is a seeded 90/5/5 split of conversations, stratified by source:
within each source conversations are ordered by a hash of (seed, id) and
cut at the rounded cumulative fractions, so the split does not depend on the
order of files, entries or lines.
Ids are "chitchat/<key>", "chatterbot/<file stem>/<index>" (indices count
from 0) or "custom/<id>".
"""

from __future__ import annotations

import collections
import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds
import yaml

from ftjax.data import local_builder, openai_chat, registry
from ftjax.errors import DataError

SPLIT_FRACTIONS = (0.9, 0.05, 0.05)
SPLIT_SEED = 0



def _package_dir(package: str, pip_name: str) -> str:
  """Returns the directory of an installed package, without importing it."""
  return local_builder.package_dir(package, "part of the chat corpus", pip_name)


def chitchat_file() -> str:
  """Returns the path of `dataset.json` inside the `chitchat_dataset` package."""
  return os.path.join(_package_dir("chitchat_dataset", "chitchat-dataset==0.9.0"),
                      "dataset.json")


def chatterbot_dir() -> str:
  """Returns the folder of English YAML files inside the `chatterbot_corpus` package."""
  return os.path.join(_package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3"),
                      "data", "english")


# --- Chit Chat ---------------------------------------------------------------


def _chitchat_messages(where: str, entry: Any) -> tuple[list[tuple[str, str]], int]:
  """Returns an entry's (sender, text) messages in order, and its count of non-empty turns."""
  if not isinstance(entry, dict) or not isinstance(entry.get("messages"), list):
    raise DataError(f"{where}: expected an object with a list 'messages'")
  messages = []
  turns = 0
  for t, turn in enumerate(entry["messages"]):
    if not isinstance(turn, list):
      raise DataError(f"{where}: turn {t}: expected a list of messages, "
                      f"found {type(turn).__name__}")
    for m, message in enumerate(turn):
      if not (isinstance(message, dict) and isinstance(message.get("text"), str)
              and isinstance(message.get("sender"), str)):
        raise DataError(f"{where}: turn {t}, message {m}: expected an object with "
                        f"string 'text' and 'sender'")
      messages.append((message["sender"], message["text"]))
    turns += any(message["text"].strip() for message in turn)
  return messages, turns


def read_chitchat(path: str) -> tuple[list[openai_chat.Conversation], collections.Counter]:
  """Reads the conversations of a Chit Chat Challenge `dataset.json`.

  Args:
    path: the JSON file.

  Returns:
    The conversations in key order, and counts of what was dropped, keyed
    "chitchat: <reason>".

  Raises:
    DataError: naming the file and the entry for a missing or empty file,
      invalid JSON or an entry of the wrong structure.
  """
  text = openai_chat.read_utf8(path)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from e
  if not isinstance(data, dict):
    raise DataError(f"{path}: expected a JSON object mapping ids to conversations, "
                    f"found {type(data).__name__}")
  conversations = []
  counts: collections.Counter = collections.Counter()
  for key in sorted(data):
    messages, raw_turns = _chitchat_messages(f"{path}: entry {key!r}", data[key])
    kept = [(sender, text.strip()) for sender, text in messages if text.strip()]
    if len(kept) < len(messages):
      openai_chat.count(counts, "chitchat", "empty messages dropped", len(messages) - len(kept))
    senders = list(dict.fromkeys(sender for sender, _ in kept))
    if len(senders) > 2:
      openai_chat.count(counts, "chitchat", "more than two senders (skipped)")
      continue
    if len(senders) < 2:
      openai_chat.count(counts, "chitchat", "no assistant turn (skipped)")
      continue
    turns: list[dict[str, str]] = []
    previous = None
    for sender, text in kept:
      if sender == previous:
        turns[-1]["content"] += "\n" + text
      else:
        turns.append({"role": openai_chat.ROLES[senders.index(sender)], "content": text})
      previous = sender
    if len(turns) < raw_turns:
      openai_chat.count(counts, "chitchat", "turns merged across a dropped empty turn",
             raw_turns - len(turns))
    conversations.append({"id": f"chitchat/{key}", "source": "chitchat", "messages": turns})
  return conversations, counts


# --- ChatterBot --------------------------------------------------------------


def _load_yaml(path: str) -> tuple[Any, yaml.Node | None]:
  """Returns a YAML file's value and its node tree (for line numbers)."""
  text = openai_chat.read_utf8(path)
  loader = yaml.SafeLoader(text)
  try:
    node = loader.get_single_node()
    value = loader.construct_document(node) if node is not None else None
  except yaml.YAMLError as e:
    raise DataError(f"{path}: not valid YAML: {e}") from e
  finally:
    loader.dispose()
  return value, node


def _entry_lines(node: yaml.Node | None) -> list[int]:
  """Returns the 1-based line of each item of the top-level `conversations` list."""
  if isinstance(node, yaml.MappingNode):
    for key, value in node.value:
      if key.value == "conversations" and isinstance(value, yaml.SequenceNode):
        return [item.start_mark.line + 1 for item in value.value]
  return []


def read_chatterbot_file(path: str) -> tuple[list[openai_chat.Conversation], collections.Counter]:
  """Reads the conversations of one ChatterBot corpus YAML file.

  Args:
    path: a YAML file with a top-level `conversations:` list; each entry a
      list of strings alternating user / assistant.

  Returns:
    The conversations in file order, and counts of what was skipped, keyed
    "chatterbot: <reason>".

  Raises:
    DataError: naming the file (and the entry and its line) for a missing or
      empty file, invalid YAML, no `conversations` list, an entry that is not
      a list of strings, or an empty message.
  """
  value, node = _load_yaml(path)
  if not isinstance(value, dict) or not isinstance(value.get("conversations"), list):
    raise DataError(f"{path}: expected a mapping with a list 'conversations'")
  lines = _entry_lines(node)
  stem = os.path.splitext(os.path.basename(path))[0]
  conversations = []
  counts: collections.Counter = collections.Counter()
  for index, entry in enumerate(value["conversations"]):
    where = f"{path}: conversation {index} (line {lines[index] if index < len(lines) else '?'})"
    if isinstance(entry, str):
      logging.warning("%s: a string, not a list; read as one user message", where)
      openai_chat.count(counts, "chatterbot", "string entries")
      entry = [entry]
    if not isinstance(entry, list):
      raise DataError(f"{where}: expected a list of strings, found {type(entry).__name__}")
    for position, text in enumerate(entry):
      if not isinstance(text, str):
        raise DataError(f"{where}: message {position} is {type(text).__name__} {text!r}, "
                        f"not a string (quote it in the YAML)")
      if not text.strip():
        raise DataError(f"{where}: message {position} is empty")
    if len(entry) < 2:
      openai_chat.count(counts, "chatterbot", "no assistant turn (skipped)")
      continue
    messages = [{"role": openai_chat.ROLES[i % 2], "content": text.strip()} for i, text in enumerate(entry)]
    conversations.append({"id": f"chatterbot/{stem}/{index}", "source": "chatterbot",
                          "messages": messages})
  return conversations, counts


def read_chatterbot(directory: str) -> tuple[list[openai_chat.Conversation], collections.Counter]:
  """Reads every `*.yml` file of a ChatterBot corpus folder, in name order.

  Args:
    directory: the folder, e.g. `chatterbot_dir()`.

  Returns:
    The conversations, and counts of what was skipped.

  Raises:
    DataError: for a missing folder, one without YAML files, or a malformed
      file (see `read_chatterbot_file`).
  """
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: folder not found")
  paths = sorted(glob.glob(os.path.join(directory, "*.yml")))
  if not paths:
    raise DataError(f"{directory}: no .yml files")
  conversations = []
  counts: collections.Counter = collections.Counter()
  for path in paths:
    found, skipped = read_chatterbot_file(path)
    conversations.extend(found)
    counts.update(skipped)
  return conversations, counts


# --- The corpus and its split ------------------------------------------------


def drop_duplicates(conversations: Sequence[openai_chat.Conversation]
                    ) -> tuple[list[openai_chat.Conversation], collections.Counter]:
  """Keeps the first of each set of conversations with identical messages.

  Args:
    conversations: in reading order.

  Returns:
    The kept conversations, in order, and per-source counts of dropped ones.
  """
  seen = set()
  kept = []
  counts: collections.Counter = collections.Counter()
  for conversation in conversations:
    key = json.dumps(conversation["messages"], sort_keys=True, ensure_ascii=False)
    if key in seen:
      openai_chat.count(counts, conversation["source"], "duplicate conversations (skipped)")
      continue
    seen.add(key)
    kept.append(conversation)
  return kept, counts


def read_examples(source_path: str | None = None
                  ) -> tuple[list[openai_chat.Conversation], collections.Counter]:
  """Reads, cleans and deduplicates the whole corpus, logging what was dropped.

  Args:
    source_path: a custom JSONL file, or None for the packaged sources.

  Returns:
    The conversations in reading order (packaged: chitchat by key, then
    chatterbot by file name and entry), and the counts of everything skipped
    or dropped, keyed "<source>: <reason>".

  Raises:
    DataError: for a missing or malformed source file, or one without any
      usable conversation.
  """
  if source_path is None:
    conversations, counts = read_chitchat(chitchat_file())
    more, more_counts = read_chatterbot(chatterbot_dir())
    conversations += more
    counts.update(more_counts)
  else:
    conversations, counts = openai_chat.read_jsonl(source_path)
  conversations, duplicates = drop_duplicates(conversations)
  counts.update(duplicates)
  for reason, n in sorted(counts.items()):
    logging.warning("chat corpus: %s: %d", reason, n)
  per_source = collections.Counter(c["source"] for c in conversations)
  logging.info("chat corpus: %d conversations kept %s", len(conversations), dict(per_source))
  if not conversations:
    raise DataError(f"{source_path or 'packaged chat corpus'}: no conversation with an "
                    f"assistant turn")
  return conversations, counts


def split_conversations(conversations: Sequence[openai_chat.Conversation],
                        fractions: Sequence[float] = SPLIT_FRACTIONS,
                        seed: int = SPLIT_SEED) -> tuple[list[int], ...]:
  """Splits conversation indices so that each source keeps the given fractions.

  Within each source, conversations are ordered by a hash of (seed, id) and
  cut at the half-up rounded cumulative fractions.

  Args:
    conversations: each with a unique "id" and a "source".
    fractions: one fraction per split, summing to 1.
    seed: selects a different split.

  Returns:
    One sorted list of indices into `conversations` per fraction.

  Raises:
    ValueError: for bad fractions or repeated ids.
  """
  local_builder.check_fractions(fractions)
  ids = [c["id"] for c in conversations]
  if len(set(ids)) != len(ids):
    raise ValueError("conversation ids are not unique")
  return local_builder.stratified_split([c["source"] for c in conversations], ids, fractions,
                                        seed)


class Chat(local_builder.LocalBuilder):
  """User / assistant conversations, the messages a JSON list of {role, content}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "chitchat + chatterbot (English), deduplicated; seeded 90/5/5 "
                            "split (seed 0) stratified by source."}
  BUILDER_CONFIGS = [local_builder.SourceConfig(name="default", description="The packaged corpus.")]

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in ("id", "source", "messages")}
    return self._dataset_info(
        features, license_text="MIT (chitchat-dataset), BSD (chatterbot-corpus)")

  def _read_splits(self, source_path: str | None) -> list[list[openai_chat.Conversation]]:
    conversations, _ = read_examples(source_path)
    splits = split_conversations(conversations, SPLIT_FRACTIONS, SPLIT_SEED)
    for name, indices in zip(local_builder.SPLIT_NAMES, splits):
      if not indices:  # tfds cannot write an empty split.
        raise DataError(f"{source_path or 'packaged chat corpus'}: {len(conversations)} "
                        f"conversations leave the {name} split empty; a 90/5/5 split "
                        f"needs about 20 or more")
    return [[conversations[i] for i in indices] for indices in splits]

  def _examples(self, item: openai_chat.Conversation) -> Iterator[local_builder.KeyedExample]:
    yield item["id"], {
        "id": item["id"],
        "source": item["source"],
        "messages": json.dumps(item["messages"], ensure_ascii=False),
    }


PRESET = registry.Preset(
    "chat", "chat", Chat, "Conversations read from {path}")

"""OpenAI's fine-tuning chat format: one conversation per JSON object.

{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}:
an optional first system message, then roles alternating and starting with
"user"; an assistant message may carry "weight": 0 (context, not trained) or 1
(the default). Optionally "id" (a unique string; default "line<N>") and
"source" (a string; default "custom"); other keys are ignored. Contents are
kept as written.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

from ftjax.data import local_builder
from ftjax.errors import DataError

ROLES = ("user", "assistant")
_DEFAULT_CUSTOM_SOURCE = "custom"

# A conversation: {"id": str, "source": str, "messages": [{"role", "content"}]}.
Conversation = dict[str, Any]


def read_utf8(path: str) -> str:
  """Returns the text of `path`, which must be a non-empty UTF-8 file."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: {'not a file' if os.path.exists(path) else 'file not found'}")
  text = local_builder.read_utf8(path)
  if not text.strip():
    raise DataError(f"{path}: file is empty")
  return text.removeprefix("\ufeff")


def count(counts: collections.Counter, source: str, reason: str, n: int = 1) -> None:
  """Counts `n` conversations or messages of `source` skipped or changed for `reason`."""
  counts[f"{source}: {reason}"] += n


def parse_record(where: str, line_number: int, record: Any) -> Conversation:
  """Validates one conversation record (a JSONL line's object) and returns it."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: expected a non-empty list 'messages'")
  system = int(isinstance(messages[0], dict) and messages[0].get("role") == "system")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not {"role", "content"} <= set(message) or not set(
        message) <= {"role", "content", "weight"}:
      raise DataError(f"{where}: message {i}: expected an object with the keys 'role' and "
                      "'content' (and, for an assistant message, optionally 'weight')")
    if message["role"] not in (*ROLES, "system"):
      raise DataError(f"{where}: message {i}: role {message['role']!r} is not one of "
                      f"{['system', *ROLES]}")
    if i >= system and message["role"] != ROLES[(i - system) % 2]:
      raise DataError(f"{where}: message {i}: role {message['role']!r}; after an optional "
                      "first 'system' message, roles must alternate, starting with 'user'")
    if not isinstance(message["content"], str) or not message["content"].strip():
      raise DataError(f"{where}: message {i}: 'content' must be a non-empty string")
    if "weight" in message and (message["role"] != "assistant"
                                or message["weight"] not in (0, 1)
                                or isinstance(message["weight"], bool)):
      raise DataError(f"{where}: message {i}: 'weight' is for assistant messages, 0 (not "
                      f"trained) or 1, not {message['weight']!r} on a {message['role']!r} "
                      "message")
  example_id = record.get("id", f"line{line_number}")
  source = record.get("source", _DEFAULT_CUSTOM_SOURCE)
  for key, value in (("id", example_id), ("source", source)):
    if not isinstance(value, str) or not value.strip():
      raise DataError(f"{where}: {key!r} must be a non-empty string")
  return {"id": f"custom/{example_id}", "source": source,
          "messages": [dict(m) for m in messages]}


def read_jsonl(path: str) -> tuple[list[Conversation], collections.Counter]:
  """Reads a custom JSONL file of conversations (format in the module docstring).

  Blank lines are ignored. A conversation of a single user message has no
  assistant turn and is skipped.

  Args:
    path: the JSONL file.

  Returns:
    The conversations in file order, and counts of what was skipped, keyed
    "<source>: <reason>".

  Raises:
    DataError: naming the file and line for a missing or empty file, a line
      that is not a JSON object, a malformed conversation or a repeated id.
  """
  text = read_utf8(path)
  conversations = []
  counts: collections.Counter = collections.Counter()
  first_line: dict[str, int] = {}
  # Only "\n" ends a line: JSON strings may hold other line separators (U+2028).
  for line_number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    where = f"{path}: line {line_number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: not valid JSON: {e.msg}") from e
    conversation = parse_record(where, line_number, record)
    if conversation["id"] in first_line:
      raise DataError(f"{where}: id {conversation['id']!r} repeats line "
                      f"{first_line[conversation['id']]}")
    first_line[conversation["id"]] = line_number
    if not any(m["role"] == "assistant" for m in conversation["messages"]):
      count(counts, conversation["source"], "no assistant turn (skipped)")
      continue
    conversations.append(conversation)
  return conversations, counts

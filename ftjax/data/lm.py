"""Language-model inputs: chat and plain text tokenized, then packed into fixed-length rows.

A chat example is a conversation of {"role", "content"} messages rendered with the
model's own chat template; only assistant tokens (and the end-of-turn token that
follows each assistant message, so the model learns to stop) are trained on. A
text example is a passage trained on in full.

Examples are packed several to a row of `max_length` tokens. Each row carries

* `input_ids` [L]: the tokens, `pad_id` after the last example;
* `targets` [L]: the next token of the same example (the last token of an example
  has no target);
* `loss_mask` [L]: which targets count;
* `positions` [L]: restarting at 0 for each example;
* `segment_ids` [L]: 1, 2, ... per example, 0 for padding,

so that attention (which the model restricts to a segment) never crosses
examples. Nothing is cut silently: an over-long chat example is split into
windows of whole exchanges, truncated or skipped as `overlong` says, an over-long text passage is split into
`max_length` pieces, and every such case is counted in `PackStats`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftjax.errors import ConfigError, DataError

ROW_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
OVERLONG = ("split", "truncate", "skip", "error")
# How many partly filled rows first-fit packing keeps open.
_OPEN_ROWS = 64


@dataclasses.dataclass
class PackStats:
  """What packing did to a split; every number is a count of examples or tokens."""

  row_length: int
  examples: int = 0
  rows: int = 0
  tokens: int = 0           # tokens placed in rows
  target_tokens: int = 0    # tokens the loss counts
  split_conversations: int = 0  # chat examples split into windows of whole exchanges
  windows: int = 0          # the windows they became
  truncated: int = 0        # chat examples (or windows) cut to max_length
  truncated_tokens: int = 0
  skipped_overlong: int = 0
  skipped_no_target: int = 0  # nothing left to train on (e.g. no assistant token)
  split_passages: int = 0   # text passages longer than a row, split into pieces

  @property
  def fill(self) -> float:
    """The share of row slots holding real tokens."""
    return self.tokens / max(1, self.rows * self.row_length)

  def summary(self, name: str) -> str:
    parts = [f"{name}: {self.examples} examples -> {self.rows} rows of {self.row_length} "
             f"tokens ({100 * self.fill:.1f}% filled, {self.target_tokens} target tokens)"]
    for key in ("split_conversations", "windows", "truncated", "skipped_overlong",
                "skipped_no_target", "split_passages"):
      if getattr(self, key):
        parts.append(f"{key.replace('_', ' ')}: {getattr(self, key)}")
    if self.truncated_tokens:
      parts.append(f"tokens cut by truncation: {self.truncated_tokens}")
    return "; ".join(parts)


# Chat templates for tokenizers without one (a base model's): name -> (Jinja template, the
# end-of-turn token trained after each assistant message). Both render message text as is.
CHAT_TEMPLATES = {
    # Gemma's turns (`<start_of_turn>` / `<end_of_turn>` are tokens of Gemma's vocabulary);
    # the assistant speaks as "model", a system message as "user".
    "gemma": ("{{ bos_token }}{% for message in messages %}"
              "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
              "<start_of_turn>{{ role }}\n{{ message['content'] }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
              "<end_of_turn>"),
    "chatml": ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
               "{{ message['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
               "<|im_end|>"),
}


def chat_template_problem(value: str) -> str:
  """Why `config.data.chat_template` cannot be used ("" when it can)."""
  if not value or value in CHAT_TEMPLATES or os.path.isfile(value):
    return ""
  return (f"must be empty (the tokenizer's own template), one of {sorted(CHAT_TEMPLATES)} or "
          "the path of a Jinja template file")


def chat_template(value: str) -> tuple[str | None, str | None]:
  """(Jinja template, end-of-turn token or None) of `config.data.chat_template`;
  (None, None) for the tokenizer's own."""
  if not value:
    return None, None
  if value in CHAT_TEMPLATES:
    return CHAT_TEMPLATES[value]
  with open(value, encoding="utf-8") as f:
    return f.read(), None


class ChatFormatter:
  """Renders conversations with a Hugging Face tokenizer's chat template and tokenizes them.

  Assistant tokens are found by rendering the conversation once with each
  assistant message replaced by a unique marker; the marker positions give the
  character spans of the messages, and the real rendering must equal the marked
  one with the markers substituted (templates that rewrite message text are
  refused rather than mislabelled).
  """

  def __init__(self, tokenizer: Any, template: str | None = None,
               end_of_turn: str | None = None):
    """Builds the formatter.

    Args:
      tokenizer: a transformers fast tokenizer.
      template: a Jinja chat template used instead of the tokenizer's own (which a
        base model's tokenizer lacks).
      end_of_turn: the token that ends an assistant turn in `template`, trained with
        it; by default the tokenizer's end-of-sequence token.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
      raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: set "
                      f"config.data.chat_template (one of {sorted(CHAT_TEMPLATES)} or a "
                      "Jinja file)")
    self._tokenizer = tokenizer
    self._template = template
    self._fast = tokenizer.backend_tokenizer
    turn_end = None if end_of_turn is None else tokenizer.convert_tokens_to_ids(end_of_turn)
    # A marker that is no single token of the vocabulary: the end-of-sequence token.
    known = turn_end is not None and turn_end != tokenizer.unk_token_id
    self.eos_id = turn_end if known else tokenizer.eos_token_id

  def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False,
              where: str = "a conversation") -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # no weights
    try:
      return self._tokenizer.apply_chat_template(plain, tokenize=False,
                                                 add_generation_prompt=generation_prompt,
                                                 chat_template=self._template)
    except Exception as e:  # jinja2 raises the template's own errors (e.g. no system role)
      raise DataError(f"{where}: the chat template of {self._tokenizer.name_or_path!r} cannot "
                      f"render it: {e}") from e

  def render(self, messages: list[dict[str, Any]]) -> str:
    """The text of the conversation `messages` under the template."""
    return self._render(messages)

  def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt."""
    return self._fast.encode(self._render(messages, True), add_special_tokens=False).ids

  def conversation_ids(self, messages: list[dict[str, Any]], where: str) -> list[int]:
    """Token ids of the whole conversation `messages`, as the template renders it."""
    return self._fast.encode(self._render(messages, where=where), add_special_tokens=False).ids

  def encode(self, messages: list[dict[str, str]], where: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a conversation.

    Args:
      messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; an
        assistant message with "weight": 0 is context, not trained (OpenAI's
        fine-tuning format).
      where: names the example in errors.

    Returns:
      (ids, trained): int32 [n] token ids and bool [n], True for the tokens of
      trained assistant messages and the end-of-turn token after each.
    """
    ids, trained, _ = self._encode(messages, where)
    return ids, trained

  def _encode(self, messages: list[dict[str, str]], where: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, trained, index of the first token after each assistant message's text)."""
    markers, marked, weights = [], [], []
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        markers.append((f"\x00ftjax-assistant-{i}\x00", message["content"]))
        marked.append({**message, "content": markers[-1][0]})
        weights.append(message.get("weight", 1))
      else:
        marked.append(message)
    text, spans = self._render(marked, where=where), []
    for marker, content in markers:
      start = text.find(marker)
      if start < 0:
        raise DataError(f"{where}: the chat template dropped an assistant message")
      text = text[:start] + content + text[start + len(marker):]
      spans.append((start, start + len(content)))
    if text != self._render(messages, where=where):
      raise DataError(f"{where}: the chat template rewrites message text, so assistant "
                      "tokens cannot be located")
    encoding = self._fast.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    starts = np.asarray([s for s, _ in encoding.offsets], np.int64)
    ends = np.asarray([e for _, e in encoding.offsets], np.int64)
    trained = np.zeros(len(ids), bool)
    for (start, end), weight in zip(spans, weights):
      if not weight:
        continue
      inside = (starts < end) & (ends > start)
      trained |= inside
      after = np.flatnonzero(starts >= end)
      if len(after) and ids[after[0]] == self.eos_id:
        trained[after[0]] = True
    return ids, trained, np.searchsorted(starts, [end for _, end in spans])

  def encode_windows(self, messages: list[dict[str, str]], where: str, max_length: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenizes a conversation, split into windows of whole exchanges that fit a row.

    An exchange is the messages up to and including an assistant message. A
    conversation that fits `max_length` is one window; a longer one becomes
    several, each rendered as a conversation of its own (with the system
    message, if any, repeated), so no assistant message is lost. Messages after
    the last assistant message train nothing and are left out of split
    conversations. A single exchange longer than `max_length` stays too long
    (the caller truncates it).

    Returns:
      [(ids, trained)] per window, as `encode` returns them.
    """
    ids, trained, bounds = self._encode(messages, where)
    if len(ids) <= max_length or len(bounds) < 2:
      return [(ids, trained)]
    system = messages[:1] if messages[0]["role"] == "system" else []
    exchanges, current = [], []
    for message in messages[len(system):]:
      current.append(message)
      if message["role"] == "assistant":
        exchanges.append(current)
        current = []
    # A window's length is estimated from the tokens each exchange adds in the
    # whole rendering, plus the system prompt's and the end of turn's.
    overhead = len(self.prompt_ids(system + [{"role": "user", "content": ""}])) + 2
    sizes = np.diff(bounds, prepend=0)
    groups, length = [[0]], int(bounds[0]) + 2
    for k in range(1, len(exchanges)):
      if length + sizes[k] <= max_length:
        groups[-1].append(k)
        length += int(sizes[k])
      else:
        groups.append([k])
        length = overhead + int(sizes[k])
    return [self.encode(system + [m for k in group for m in exchanges[k]], where)
            for group in groups]


def parse_messages(raw: bytes | str, where: str) -> list[dict[str, str]]:
  """Decodes a stored conversation (JSON list of {"role", "content"})."""
  try:
    messages = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{where}: messages are not valid JSON: {e}") from e
  if not isinstance(messages, list) or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str) for m in messages):
    raise DataError(f"{where}: messages must be a list of {{'role': str, 'content': str}}")
  return messages


class _Packer:
  """First-fit packing of token sequences into rows of `length` tokens."""

  def __init__(self, length: int, pad_id: int):
    self.length = length
    self.pad_id = pad_id
    self.rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    self._free: list[int] = []  # free slots of the open rows
    self._open: list[int] = []  # their indices in self.rows

  def add(self, ids: np.ndarray, trained: np.ndarray) -> None:
    n = len(ids)
    for k, free in enumerate(self._free):
      if free >= n:
        row = self._open[k]
        self.rows[row].append((ids, trained))
        self._free[k] -= n
        if self._free[k] == 0:
          del self._free[k], self._open[k]
        return
    self.rows.append([(ids, trained)])
    if n < self.length:
      self._free.append(self.length - n)
      self._open.append(len(self.rows) - 1)
      if len(self._open) > _OPEN_ROWS:
        del self._free[0], self._open[0]

  def arrays(self) -> dict[str, np.ndarray]:
    shape = (len(self.rows), self.length)
    out = {"input_ids": np.full(shape, self.pad_id, np.int32),
           "targets": np.full(shape, self.pad_id, np.int32),
           "loss_mask": np.zeros(shape, bool),
           "positions": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32)}
    for r, row in enumerate(self.rows):
      offset = 0
      for segment, (ids, trained) in enumerate(row, start=1):
        n = len(ids)
        span = slice(offset, offset + n)
        out["input_ids"][r, span] = ids
        out["targets"][r, offset:offset + n - 1] = ids[1:]
        out["loss_mask"][r, offset:offset + n - 1] = trained[1:]
        out["positions"][r, span] = np.arange(n)
        out["segment_ids"][r, span] = segment
        offset += n
    return out


class PackedRows(Sequence):
  """Packed rows as a random-access source: row i is {key: array [L]} (see module doc)."""

  def __init__(self, arrays: dict[str, np.ndarray], stats: PackStats):
    self.arrays = arrays
    self.stats = stats

  def __len__(self) -> int:
    return len(self.arrays["input_ids"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"row {index} out of range for {len(self)} rows")
    return {key: value[index] for key, value in self.arrays.items()}


def _check_length(max_length: int, overlong: str) -> None:
  if max_length < 2:
    raise ConfigError(f"config.data.max_length={max_length}: must be at least 2")
  if overlong not in OVERLONG:
    raise ConfigError(f"config.data.overlong={overlong!r}: must be one of {list(OVERLONG)}")


def pack_chat(source: Sequence[dict[str, Any]], formatter: ChatFormatter, *,
              max_length: int, pad_id: int, overlong: str = "split",
              order_seed: int | None = None) -> PackedRows:
  """Tokenizes and packs the conversations of `source` (a `messages` and an `id` feature).

  Args:
    source: random-access examples with `messages` (JSON) and `id`.
    formatter: renders and tokenizes with the model's chat template.
    max_length: tokens per row.
    pad_id: the id written into padding slots.
    overlong: what to do with a conversation longer than a row: "split" it into
      windows of whole exchanges (`ChatFormatter.encode_windows`; an exchange
      longer than a row is then truncated), "truncate" it, "skip" it, or raise
      an "error". Every split, truncation and skip is counted.
    order_seed: shuffle the examples with this seed before packing (training);
      None keeps their order (evaluation).

  Returns:
    The packed rows, with their `PackStats`.
  """
  _check_length(max_length, overlong)
  stats, packer = PackStats(max_length), _Packer(max_length, pad_id)
  order = np.arange(len(source))
  if order_seed is not None:
    order = np.random.default_rng(order_seed).permutation(order)
  for index in order:
    example = source[int(index)]
    where = f"example {decode_text(example.get('id', index))}"
    messages = parse_messages(example["messages"], where)
    stats.examples += 1
    if overlong == "split":
      windows = formatter.encode_windows(messages, where, max_length)
      if len(windows) > 1:
        stats.split_conversations += 1
        stats.windows += len(windows)
    else:
      windows = [formatter.encode(messages, where)]
    for ids, trained in windows:
      _add_chat(packer, stats, ids, trained, where, overlong)
  return _finish(packer, stats)


def _add_chat(packer: _Packer, stats: PackStats, ids: np.ndarray, trained: np.ndarray,
              where: str, overlong: str) -> None:
  max_length = packer.length
  if len(ids) > max_length:
    if overlong == "error":
      raise DataError(f"{where}: {len(ids)} tokens, more than "
                      f"config.data.max_length={max_length}")
    if overlong == "skip":
      stats.skipped_overlong += 1
      return
    stats.truncated += 1
    stats.truncated_tokens += len(ids) - max_length
    ids, trained = ids[:max_length], trained[:max_length]
  if not trained[1:].any():
    stats.skipped_no_target += 1
    return
  packer.add(ids, trained)
  stats.tokens += len(ids)
  stats.target_tokens += int(trained[1:].sum())


def pack_text(source: Sequence[dict[str, Any]], tokenizer: Any, *, max_length: int,
              pad_id: int, order_seed: int | None = None, text_key: str = "text"
              ) -> PackedRows:
  """Tokenizes and packs text passages for next-token prediction on every token.

  Each passage ends with the tokenizer's end-of-sequence token (when it has
  one); a passage longer than a row is split into row-sized pieces (counted).

  Args:
    source: random-access examples with a `text_key` feature.
    tokenizer: a transformers fast tokenizer.
    max_length: tokens per row.
    pad_id: the id written into padding slots.
    order_seed: shuffle passages before packing (training); None keeps the order.
    text_key: the feature holding the text.

  Returns:
    The packed rows, with their `PackStats`.
  """
  _check_length(max_length, "truncate")
  stats, packer = PackStats(max_length), _Packer(max_length, pad_id)
  order = np.arange(len(source))
  if order_seed is not None:
    order = np.random.default_rng(order_seed).permutation(order)
  texts = []
  for index in order:
    example = source[int(index)]
    try:
      texts.append(decode_text(example[text_key]))
    except UnicodeDecodeError as e:
      where = decode_text(example.get("id", index))
      raise DataError(f"example {where}: text is not UTF-8") from e
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
    ids = np.asarray(encoding.ids + eos, np.int32)
    stats.examples += 1
    if len(ids) < 2:
      stats.skipped_no_target += 1
      continue
    if len(ids) > max_length:
      stats.split_passages += 1
    for start in range(0, len(ids), max_length):
      piece = ids[start:start + max_length]
      if len(piece) < 2:  # a single token has nothing to predict
        continue
      packer.add(piece, np.ones(len(piece), bool))
      stats.tokens += len(piece)
      stats.target_tokens += len(piece) - 1
  return _finish(packer, stats)


def _finish(packer: _Packer, stats: PackStats) -> PackedRows:
  stats.rows = len(packer.rows)
  if not stats.rows:
    raise DataError(f"no example left to train on after packing: {stats.summary('split')}")
  return PackedRows(packer.arrays(), stats)


def decode_text(value: Any) -> str:
  """A stored text feature (bytes) as a string."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)

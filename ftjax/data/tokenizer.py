"""Tokenizers: fixed-length encoding for classifiers, and models' own HF tokenizers.

`load_tokenizer` uses the `tokenizers` library directly (not transformers), so
the classification pipeline needs no PyTorch and no model-hub access.
`load_hf_tokenizer` returns a transformers tokenizer with its chat template, for
language models.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
import tokenizers

from ftjax.errors import DataError

OUTPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class TextTokenizer:
  """Encodes batches of texts into int32 arrays of one fixed length."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int):
    self._tokenizer = tokenizer
    self.max_length = max_length
    self._untruncated: tokenizers.Tokenizer | None = None  # for token_counts, made on use

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._tokenizer.padding["pad_id"]

  def token_counts(self, texts: list[str], pairs: list[str] | None = None) -> list[int]:
    """How many tokens each text (or text pair) has, special tokens included, before
    padding and truncation."""
    if self._untruncated is None:
      self._untruncated = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
      self._untruncated.no_truncation()
      self._untruncated.no_padding()
    encodings = self._untruncated.encode_batch(
        list(texts) if pairs is None else list(zip(texts, pairs)))
    return [len(e.ids) for e in encodings]

  def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Tokenizes `texts` (with `pairs`: text pairs), padding and truncating each to
    `max_length`.

    Args:
      texts: the strings to encode; special tokens ([CLS], [SEP]) are added.
      pairs: each text's second segment ([CLS] text [SEP] pair [SEP], token type
        1 for the pair; the longer segment is truncated first), or None.

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"}: int32 arrays of shape
      [len(texts), max_length].
    """
    shape = (len(texts), self.max_length)
    if not texts:
      return {key: np.zeros(shape, np.int32) for key in OUTPUT_KEYS}
    # One batched call: the Rust side parallelises across the batch.
    encodings = self._tokenizer.encode_batch(
        list(texts) if pairs is None else list(zip(texts, pairs)))
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int32),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int32),
    }


def load_tokenizer(path: str, max_length: int) -> TextTokenizer:
  """Loads a `tokenizer.json` and fixes its output length to `max_length`.

  Padding and truncation stored in the file (e.g. a baked-in 128) are replaced,
  so every sequence comes out exactly `max_length` long.

  Args:
    path: a Hugging Face fast-tokenizer file (`tokenizer.json`).
    max_length: the length of every encoded sequence, special tokens included.

  Returns:
    A TextTokenizer.
  """
  if max_length < 2:
    raise DataError(f"{path}: max_length must be at least 2, got {max_length}")
  if not os.path.isfile(path):
    folder = os.path.dirname(path)
    # A DeBERTa-v3 folder as published holds the sentencepiece model only.
    hint = (f"; {folder} has a sentencepiece spm.model: write its tokenizer.json with "
            "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
            if os.path.isfile(os.path.join(folder, "spm.model")) else "")
    raise DataError(f"{path}: tokenizer file not found{hint}")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The Rust loader raises a bare Exception.
    raise DataError(f"{path}: cannot load tokenizer: {e}") from e
  padding = tokenizer.padding or {}
  pad_token = padding.get("pad_token") or _configured_pad_token(path) or "[PAD]"
  pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token))
  if pad_id is None:
    raise DataError(f"{path}: no padding token {pad_token!r} in the vocabulary")
  tokenizer.enable_truncation(max_length=max_length)
  tokenizer.enable_padding(
      direction="right",
      pad_id=pad_id,
      pad_type_id=padding.get("pad_type_id", 0),
      pad_token=pad_token,
      length=max_length,
  )
  return TextTokenizer(tokenizer, max_length)


def _configured_pad_token(path: str) -> str | None:
  """The padding token (else the end-of-sequence token, as decoders pad) that the
  `tokenizer_config.json` beside a tokenizer file names; None without one."""
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if not os.path.isfile(config_path):
    return None
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  for key in ("pad_token", "eos_token"):
    token = config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and token:
      return token
  return None


def tokenizer_file(model_dir: str) -> str:
  """The `tokenizer.json` of a model folder; for a llama.cpp GGUF folder, the one
  converted from the GGUF file (`load_hf_tokenizer`'s cache)."""
  from ftjax.hub import gguf as gguf_hub  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "tokenizer.json")
  gguf_path = None if os.path.isfile(path) or not os.path.isdir(model_dir) else (
      gguf_hub.find_gguf(model_dir))
  if gguf_path is None:
    return path
  load_hf_tokenizer(model_dir)  # converts and keeps it, once
  return os.path.join(_gguf_tokenizer_cache(gguf_path, os.path.expanduser(_CACHE_ROOT)),
                      "tokenizer.json")


def _gguf_tokenizer_cache(gguf_path: str, cache_root: str) -> str:
  """The folder holding the tokenizer converted from `gguf_path` (keyed by size and mtime)."""
  stat = os.stat(gguf_path)
  stem = os.path.splitext(os.path.basename(gguf_path))[0]
  return os.path.join(cache_root, f"{stem}-{stat.st_size}-{int(stat.st_mtime)}")


_CACHE_ROOT = "~/.cache/ftjax/tokenizers"


def load_hf_tokenizer(model_dir: str, cache_root: str = _CACHE_ROOT) -> Any:
  """Loads a model's Hugging Face tokenizer (with its chat template) from its folder.

  A llama.cpp GGUF folder carries its tokenizer inside the GGUF file;
  transformers converts it (about 15 s), and the result is saved under
  `cache_root` so later loads take well under a second.

  Args:
    model_dir: a HF checkpoint folder (tokenizer.json, tokenizer_config.json)
      or a folder with one GGUF file.
    cache_root: where converted GGUF tokenizers are kept.

  Returns:
    A transformers fast tokenizer. Code shipped in the folder (a tokenizer
    config's `auto_map`) is never run.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from ftjax.hub import gguf as gguf_hub  # pylint: disable=g-import-not-at-top
  gguf_path = gguf_hub.find_gguf(model_dir)
  try:
    if gguf_path is None:
      return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    cached = _gguf_tokenizer_cache(gguf_path, os.path.expanduser(cache_root))
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
      return AutoTokenizer.from_pretrained(cached, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=os.path.basename(gguf_path),
                                              trust_remote_code=False)
  except (OSError, ValueError) as e:
    raise DataError(f"{model_dir}: cannot load a tokenizer: {e}") from e
  partial = f"{cached}.tmp{os.getpid()}"
  tokenizer.save_pretrained(partial)
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  try:
    os.replace(partial, cached)  # atomic: concurrent loaders never see half a folder
  except OSError:  # another process won the race; its copy is identical
    shutil.rmtree(partial, ignore_errors=True)
  return tokenizer

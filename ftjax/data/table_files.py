"""Rows of the data files a user names: CSV, TSV, JSON Lines / JSON arrays, Parquet.

`expand` turns a files setting (a path, a glob, or a comma-separated list of
them) into the files it names; `read_rows` streams one file's rows as dicts
with where each one is (file, row or line), never holding the whole file as
Python objects (a JSON array, which has no row boundaries, excepted).

Where a row is:
- CSV / TSV: "row N (line L)": records count from 1, the header being row 1,
  as a spreadsheet shows them; a record's line is where it starts.
- JSON Lines: "line N"; a JSON array: "item N" (from 1).
- Parquet: "row N", data rows counted from 1.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, Callable, IO

from etils import epath

from ftjax.errors import DataError

FORMATS = ("csv", "tsv", "json", "parquet", "hf_disk")
HF_DISK = "hf_disk"  # a folder written by `datasets`' `save_to_disk`
_DELIMITERS = {"csv": ",", "tsv": "\t"}
_PARQUET_BATCH_ROWS = 8192
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def hf_disk_splits(folder: str, key: str) -> dict[str, str]:
  """The Dataset folders of a `save_to_disk` folder, by split name: the folder itself
  ({"": folder}) for a Dataset, its splits' folders for a DatasetDict.

  Raises:
    DataError: naming the setting for a folder `save_to_disk` did not write.
  """
  if os.path.isfile(os.path.join(folder, "state.json")):
    return {"": folder}
  listing = os.path.join(folder, "dataset_dict.json")
  if not os.path.isfile(listing):
    raise DataError(f"{key}={folder!r}: not a folder written by datasets' save_to_disk (it "
                    "has neither state.json nor dataset_dict.json)")
  with open(listing) as f:
    return {split: os.path.join(folder, split) for split in json.load(f)["splits"]}


def class_label_names(folder: str, column: str) -> tuple[str, ...]:
  """The class names of a `save_to_disk` Dataset's ClassLabel column; () for another."""
  feature = _hf_features(folder).get(column, {})
  return tuple(feature.get("names", ())) if feature.get("_type") == "ClassLabel" else ()


def _hf_features(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "dataset_info.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f).get("features") or {}


def expand(spec: str, key: str) -> list[str]:
  """The files a setting names: comma-separated paths or globs (`*`, `?`, `[...]`).

  Each glob's matches are sorted; the files come in the order named.

  Args:
    spec: the setting's value.
    key: the setting, for error messages (e.g. "config.data.files.train").

  Raises:
    DataError: naming the setting for a path that does not exist or a glob that
      matches nothing.
  """
  paths = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if any(c in part for c in "*?["):
      matches = _glob(part)
      if not matches:
        raise DataError(f"{key}={spec!r}: {part!r} matches no file")
      paths.extend(matches)
    elif not epath.Path(part).exists():
      raise DataError(f"{key}={spec!r}: {part}: file not found")
    elif epath.Path(part).is_dir() and not os.path.isfile(os.path.join(part, "state.json")):
      raise DataError(f"{key}={spec!r}: {part}: a folder, not a file")
    else:
      paths.append(part)
  return paths


def _glob(pattern: str) -> list[str]:
  if "://" not in pattern:
    return sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
  folder, name = pattern.rsplit("/", 1)
  return sorted(os.fspath(p) for p in epath.Path(folder).glob(name))


def signature(path: str) -> str:
  """What marks a version of a file: its size and modification time (a `save_to_disk`
  folder: its state, which holds the data's fingerprint)."""
  state = os.path.join(path, "state.json")
  info = epath.Path(state if os.path.isfile(state) else path).stat()
  return f"{info.length}:{info.mtime}"


def config_name(fmt: str, files: Sequence[Sequence[str]], *settings: Any) -> str:
  """The name of a prepared copy of `files`: "files_<digest>" of the format, the files
  and their versions (`signature`), and what else shapes the examples (`settings`)."""
  signatures = [signature(path) for paths in files for path in paths]
  text = repr([fmt, [list(paths) for paths in files], signatures, *settings])
  return f"files_{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def column_value(where: str, row: dict[str, Any], column: str, field: str) -> Any:
  """A row's value in `column`, the column of `config.data.columns.<field>`.

  Raises:
    DataError: naming the row, column and setting when the row has no value there.
  """
  if row.get(column) is None:
    raise DataError(f"{where}: no value in column {column!r} (config.data.columns.{field}); "
                    f"the row has columns {sorted(row)}")
  return row[column]


def _open_binary(path: str) -> IO[bytes]:
  f = epath.Path(path).open("rb")
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=f)
  if path.endswith(".bz2"):
    return bz2.BZ2File(f)
  return f


def first_row_kind(path: str, fmt: str,
                   candidates: Sequence[tuple[str, tuple[str, ...]]],
                   refusal: Callable[[str, dict[str, Any]], str]) -> tuple[str, tuple[str, ...]]:
  """(kind, columns) of the first of `candidates` whose columns (none empty) the first row
  of `path` has, as TRL tells its data formats apart.

  Raises:
    DataError: for a file without rows, or `refusal(where, row)` when no kind matches.
  """
  where, row = next(iter(read_rows(path, fmt)), (path, None))
  if row is None:
    raise DataError(f"{path}: no rows")
  for kind, used in candidates:
    if all(column and column in row for column in used):
      return kind, used
  raise DataError(refusal(where, row))


MOST_PROBLEMS = 100  # malformed rows listed at most


def every_problem(error: DataError, files: Sequence[Sequence[str]], fmt: str,
                  parse: Callable[[str, int, dict[str, Any]], Any]) -> DataError:
  """What preparing `files` stopped with (`error`, the first problem): that error alone,
  or one listing every malformed row (the first `MOST_PROBLEMS`) when there are more.

  Args:
    error: the error preparing raised.
    files: the files of each split.
    fmt: their format.
    parse: (where, row number, row) -> anything; raises DataError for a malformed row.
  """
  found: list[str] = []
  for path in dict.fromkeys(path for paths in files for path in paths):
    if len(found) >= MOST_PROBLEMS:
      break
    try:
      for number, (where, row) in enumerate(read_rows(path, fmt, found), 1):
        try:
          parse(where, number, row)
        except DataError as e:
          found.append(str(e))
        if len(found) >= MOST_PROBLEMS:
          break
    except DataError as e:  # a file that cannot be read past a point
      found.append(str(e))
  found = found[:MOST_PROBLEMS]
  if len(found) <= 1:
    return error
  more = f" (the first {MOST_PROBLEMS})" if len(found) == MOST_PROBLEMS else ""
  return DataError(f"{len(found)} malformed rows{more} in config.data.files:\n  "
                   + "\n  ".join(found))


def read_rows(path: str, fmt: str, problems: list[str] | None = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Streams the rows of one file ('.gz' and '.bz2' names are decompressed).

  Args:
    path: the file.
    fmt: one of FORMATS.
    problems: None: a malformed row raises. A list: a malformed row that the rows
      after it can still be read past (a JSON Lines line; a CSV / TSV row with the
      wrong number of fields or bytes that are not UTF-8) is added to it as its
      message and skipped.

  Yields:
    (where the row is, "{path}: row 3 (line 4)", {column: value}).

  Raises:
    DataError: naming the file and the row or line for unreadable or malformed
      contents (bytes that are not UTF-8, a stray quote, a row with the wrong
      number of fields, invalid JSON, a JSON value that is not an object).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}")
  try:
    if fmt == "parquet":
      yield from _parquet_rows(path)
    elif fmt == HF_DISK:
      yield from _hf_disk_rows(path)
    else:
      with _open_binary(path) as raw:
        # Bytes that are not UTF-8 become lone surrogates, found in the row they are in.
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        if fmt == "json":
          yield from _json_rows(path, text, problems)
        else:
          yield from _delimited_rows(path, text, _DELIMITERS[fmt], problems)
  except (OSError, EOFError) as e:  # unreadable, or a truncated or corrupt archive
    raise DataError(f"{path}: cannot read file: {e}") from e


def _bad_row(problems: list[str] | None, message: str) -> None:
  """Raises DataError(message), or adds it to `problems` when reading goes on."""
  if problems is None:
    raise DataError(message)
  problems.append(message)


def _delimited_rows(path: str, text: IO[str], delimiter: str, problems: list[str] | None
                    ) -> Iterator[tuple[str, dict[str, Any]]]:
  reader = csv.reader(text, delimiter=delimiter, strict=True)
  row, line = 0, 1
  header: list[str] | None = None
  while True:
    try:
      fields = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise DataError(f"{path}: row {row + 1} (line {line}): malformed "
                      f"{'CSV' if delimiter == ',' else 'TSV'}: {e}") from e
    row += 1
    where = f"{path}: row {row} (line {line})"
    line = reader.line_num + 1
    if header is None and _UNDECODABLE.search("\0".join(fields)):
      raise DataError(f"{where}: bytes that are not valid UTF-8")
    if header is None:
      header = [name.strip() for name in fields]
      if header:
        header[0] = header[0].removeprefix("\ufeff")  # spreadsheets write a byte-order mark
      if not any(header):
        raise DataError(f"{where}: empty header; the first row names the columns")
      continue
    if not fields:  # a blank line is not a record
      continue
    if _UNDECODABLE.search("\0".join(fields)):
      _bad_row(problems, f"{where}: bytes that are not valid UTF-8")
    elif len(fields) != len(header):
      _bad_row(problems, f"{where}: expected {len(header)} fields (header {header}), found "
               f"{len(fields)}")
    else:
      yield where, dict(zip(header, fields))
  if header is None:
    raise DataError(f"{path}: file is empty")


def _json_rows(path: str, text: IO[str], problems: list[str] | None
               ) -> Iterator[tuple[str, dict[str, Any]]]:
  first = text.read(1)
  while first and first.isspace():
    first = text.read(1)
  if not first:
    raise DataError(f"{path}: file is empty")
  if first == "[":  # a JSON array of objects: read whole
    whole = first + text.read()
    bad = _UNDECODABLE.search(whole)
    if bad:
      raise DataError(f"{path}: line {whole.count(chr(10), 0, bad.start()) + 1}: bytes that "
                      "are not valid UTF-8")
    try:
      items = json.loads(whole)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
    for number, item in enumerate(items, 1):
      yield _json_object(f"{path}: item {number}", item)
    return
  lines = itertools.chain([first + text.readline()], text)
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if _UNDECODABLE.search(line):
      _bad_row(problems, f"{path}: line {number}: bytes that are not valid UTF-8")
      continue
    try:
      yield _json_object(f"{path}: line {number}", json.loads(line))
    except json.JSONDecodeError as e:
      _bad_row(problems, f"{path}: line {number}: invalid JSON: {e.msg} (column {e.colno})")
    except DataError as e:
      _bad_row(problems, str(e))


def _json_object(where: str, item: Any) -> tuple[str, dict[str, Any]]:
  if not isinstance(item, dict):
    raise DataError(f"{where}: a JSON {type(item).__name__}, not an object "
                    "({\"column\": value, ...})")
  return where, item


def _parquet_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import pyarrow  # pylint: disable=g-import-not-at-top
  try:
    parquet = pq.ParquetFile(epath.Path(path).open("rb"))
  except pyarrow.ArrowException as e:
    raise DataError(f"{path}: not a readable Parquet file: {e}") from e
  number = 0
  try:
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
      for row in batch.to_pylist():
        number += 1
        yield f"{path}: row {number}", row
  except pyarrow.ArrowException as e:
    raise DataError(f"{path}: row {number + 1} or after: cannot read: {e}") from e


def _hf_disk_rows(folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """The rows of a `save_to_disk` Dataset folder (Arrow stream files, in order); a
  ClassLabel column's integers become its class names."""
  import pyarrow  # pylint: disable=g-import-not-at-top
  with open(os.path.join(folder, "state.json")) as f:
    files = [entry["filename"] for entry in json.load(f)["_data_files"]]
  names = {column: feature["names"] for column, feature in _hf_features(folder).items()
           if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"}
  number = 0
  for name in files:
    path = os.path.join(folder, name)
    try:
      with pyarrow.memory_map(path) as source:
        for batch in pyarrow.ipc.open_stream(source):
          for row in batch.to_pylist():
            number += 1
            for column, classes in names.items():
              if isinstance(row.get(column), int) and 0 <= row[column] < len(classes):
                row[column] = classes[row[column]]
            yield f"{folder}: row {number}", row
    except pyarrow.ArrowException as e:
      raise DataError(f"{path}: not a readable Arrow file: {e}") from e

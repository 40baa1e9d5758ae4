"""IDX files, the format of MNIST and Fashion-MNIST, optionally gzip-compressed.

An IDX file is a 4-byte big-endian magic number, two zero bytes then a type
code (0x08: unsigned bytes) and the number of dimensions, followed by one
big-endian uint32 size per dimension and the values in row-major order. The
MNIST family uses two kinds: images, magic 0x00000803 (uint8 [N, H, W]), and
labels, magic 0x00000801 (uint8 [N]).

A file is decompressed when it starts with the gzip signature, whatever its
name, so both `train-images-idx3-ubyte.gz` and its unpacked copy read alike.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from ftjax.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_KINDS = {IMAGES_MAGIC: "uint8 images [N, H, W]", LABELS_MAGIC: "uint8 labels [N]"}
_UINT8_TYPE = 0x08
_GZIP_SIGNATURE = b"\x1f\x8b"


def read_bytes(path: str) -> bytes:
  """Returns the contents of a file, decompressed if it starts with the gzip signature.

  Args:
    path: the file.

  Raises:
    DataError: naming the file when it is missing or unreadable, or holds
      corrupt or truncated gzip data.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read file: {e}") from e
  if data.startswith(_GZIP_SIGNATURE):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: corrupt or truncated gzip data: {e}") from e
  return data


def read_idx(path: str, magic: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes.

  Args:
    path: the file, gzip-compressed or not.
    magic: the expected magic number, `IMAGES_MAGIC` or `LABELS_MAGIC`; its
      low byte is the number of dimensions.

  Returns:
    A uint8 array of the shape the header gives.

  Raises:
    DataError: naming the file for a missing or unreadable file, a wrong magic
      number, or a header whose sizes disagree with the file's length.
  """
  data = read_bytes(path)
  expected = f"expected magic 0x{magic:08x} ({_KINDS.get(magic, 'IDX')})"
  if len(data) < 4:
    raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header; {expected}")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise DataError(f"{path}: magic number 0x{found:08x}; {expected}")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"{path}: {len(data)} bytes, shorter than the {header}-byte header "
                    f"of {ndim} dimension sizes")
  shape = tuple(int.from_bytes(data[4 + 4 * d:8 + 4 * d], "big") for d in range(ndim))
  size = math.prod(shape)
  if len(data) - header != size:
    problem = "truncated" if len(data) - header < size else "trailing bytes"
    raise DataError(f"{path}: the header gives shape {shape}, i.e. {size} bytes of data, "
                    f"but the file holds {len(data) - header} ({problem})")
  return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape).copy()


def read_images(path: str) -> np.ndarray:
  """Reads an IDX image file; returns uint8 [N, H, W] (see `read_idx`)."""
  return read_idx(path, IMAGES_MAGIC)


def read_labels(path: str) -> np.ndarray:
  """Reads an IDX label file; returns uint8 [N] (see `read_idx`)."""
  return read_idx(path, LABELS_MAGIC)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file, gzip-compressed if `path` ends in ".gz".

  Args:
    path: the file to write.
    array: uint8 values, e.g. images [N, H, W] or labels [N].

  Raises:
    ValueError: for an array that is not uint8 or has more than 255 dimensions.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim > 0xFF:
    raise ValueError(f"IDX arrays here are uint8 with at most 255 dimensions; found "
                     f"{array.dtype} with shape {array.shape}")
  magic = (_UINT8_TYPE << 8) | array.ndim
  data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  data += np.ascontiguousarray(array).tobytes()
  if path.endswith(".gz"):
    data = gzip.compress(data, mtime=0)
  with open(path, "wb") as f:
    f.write(data)

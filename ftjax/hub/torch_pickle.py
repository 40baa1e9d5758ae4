"""Reads PyTorch checkpoint files (`torch.save` of a state dict) without importing torch.

`torch.save` writes one of two layouts:

* the legacy layout (torch < 1.6, and `_use_new_zipfile_serialization=False`): five
  pickles in a row (magic number, protocol version, system info, the object, the
  list of storage keys), then each storage's raw bytes, preceded by its element
  count as a little-endian int64, in the order of that list;
* the zip layout: `<archive>/data.pkl` holds the object and `<archive>/data/<key>`
  each storage's raw bytes (`<archive>/byteorder` says which byte order).

In both the object pickle refers to storages by persistent id (`('storage',
storage type, key, location, element count[, view])`) and rebuilds each tensor
with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

Unpickling runs arbitrary code by design, so the object pickle is read with an
unpickler whose `find_class` knows only what a state dict needs: `OrderedDict`,
the tensor and parameter rebuild functions (replaced here by functions that
record the tensor's view) and the storage types (which name the dtype). Any
other global is refused with a `WeightsError`. Tensors become numpy arrays once
the storages are read: a strided view of the storage, copied.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from ftjax.errors import WeightsError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# torch.<name>Storage -> numpy dtype of its elements. bfloat16 has no numpy dtype:
# its bits are read as uint16 and widened to float32 (exactly).
_BFLOAT16 = "bfloat16"
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """Stands in for a `torch.<Type>Storage` class: only its element dtype matters."""

  dtype: str

  @property
  def numpy_dtype(self) -> np.dtype:
    return np.dtype("uint16" if self.dtype == _BFLOAT16 else self.dtype)


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
  """A storage referenced by the pickle; its bytes are read afterwards.

  `offset` and `length` (elements) select the part of the root storage `key`
  that this storage covers: all of it, except for a legacy storage view.
  """

  key: str
  kind: _StorageType
  offset: int
  length: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
  """A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage."""

  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


def _is_index(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *unused: Any) -> _Tensor:
  """Replaces `torch._utils._rebuild_tensor_v2`; checks the view's description."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, _Storage):
    raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
  if not (_is_index(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
          and len(size) == len(stride) and all(map(_is_index, size + stride))):
    raise ValueError(f"malformed tensor view: offset {storage_offset!r}, size {size!r}, "
                     f"stride {stride!r}")
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  """Replaces `torch._utils._rebuild_parameter(_with_state)`: a parameter is its tensor."""
  del unused  # requires_grad, backward hooks, state
  return data


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Unpickles a state dict, refusing every global outside `_GLOBALS`.

  `storages` collects the root storages the object refers to, by key.
  """

  def __init__(self, stream: io.BytesIO, path: str, legacy: bool):
    super().__init__(stream)
    self.path = path
    self.legacy = legacy
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _GLOBALS:
      raise WeightsError(f"{self.path}: refused to unpickle the global {module}.{name}; a "
                         "state dict holds only tensors, and loading anything else could "
                         "run code from the file")
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid: Any) -> _Storage:
    fields = 6 if self.legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] == "storage"):
      raise ValueError(f"unsupported persistent id {pid!r}: only storages are supported")
    kind, key, _, numel = pid[1:5]
    if not (isinstance(kind, _StorageType) and isinstance(key, str) and _is_index(numel)):
      raise ValueError(f"malformed storage reference {pid!r}")
    root = self.storages.setdefault(key, _Storage(key, kind, 0, numel))
    if root.kind != kind or root.length != numel:
      raise ValueError(f"storage {key!r} is referenced with two types or sizes")
    view = pid[5] if self.legacy else None
    if view is None:
      return root
    if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1])
            and _is_index(view[2]) and view[1] + view[2] <= numel):
      raise ValueError(f"storage view {view!r} does not lie inside storage {key!r}")
    return _Storage(key, kind, view[1], view[2])


def _storage_array(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
  """The elements of a root storage from its raw bytes."""
  dtype = storage.kind.numpy_dtype.newbyteorder(byteorder)
  if len(raw) != storage.length * dtype.itemsize:
    raise ValueError(f"storage {storage.key!r} has {len(raw)} bytes, expected "
                     f"{storage.length} elements of {dtype.itemsize} bytes")
  return np.frombuffer(raw, dtype)


def _load_legacy(stream: io.BytesIO, path: str) -> tuple[Any, dict[str, np.ndarray]]:
  """The object and the storages of a legacy-layout checkpoint."""
  magic, protocol, sys_info = (_Unpickler(stream, path, legacy=True).load() for _ in range(3))
  if magic != _MAGIC_NUMBER or protocol != _PROTOCOL_VERSION:
    raise ValueError("not a PyTorch checkpoint (wrong magic number or protocol version)")
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  unpickler = _Unpickler(stream, path, legacy=True)
  obj = unpickler.load()
  keys = _Unpickler(stream, path, legacy=True).load()
  if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storages):
    raise ValueError("the list of storage keys does not match the storages the object uses")
  arrays = {}
  for key in keys:
    storage = unpickler.storages[key]
    (count,) = struct.unpack("<q", stream.read(8))
    if count != storage.length:
      raise ValueError(f"storage {key!r} has {count} elements, the pickle says {storage.length}")
    raw = stream.read(count * storage.kind.numpy_dtype.itemsize)
    arrays[key] = _storage_array(raw, storage, "<" if little else ">")
  return obj, arrays


def _load_zip(archive: zipfile.ZipFile, path: str) -> tuple[Any, dict[str, np.ndarray]]:
  """The object and the storages of a zip-layout checkpoint."""
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError(f"expected one <archive>/data.pkl record, found {pickles}")
  prefix = pickles[0][:-len("data.pkl")]
  byteorder = "<"
  if prefix + "byteorder" in archive.namelist():
    byteorder = {b"little": "<", b"big": ">"}[archive.read(prefix + "byteorder")]
  unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), path, legacy=False)
  obj = unpickler.load()
  arrays = {key: _storage_array(archive.read(f"{prefix}data/{key}"), storage, byteorder)
            for key, storage in unpickler.storages.items()}
  return obj, arrays


def _materialise(tensor: _Tensor, storages: Mapping[str, np.ndarray]) -> np.ndarray:
  """Copies a tensor out of its storage, in native byte order, bfloat16 as float32."""
  storage = tensor.storage
  flat = storages[storage.key][storage.offset:storage.offset + storage.length]
  if 0 in tensor.shape:
    array = np.zeros(tensor.shape, flat.dtype)
  else:
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides))
    if last >= flat.size:
      raise ValueError(f"a tensor of shape {tensor.shape} and strides {tensor.strides} at "
                       f"offset {tensor.offset} reads past its storage of {flat.size} elements")
    array = np.lib.stride_tricks.as_strided(
        flat[tensor.offset:], shape=tensor.shape,
        strides=tuple(s * flat.itemsize for s in tensor.strides), writeable=False).copy()
  array = array.astype(array.dtype.newbyteorder("="), copy=False)
  if storage.kind.dtype == _BFLOAT16:
    return (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _collect(obj: Mapping[Any, Any], storages: Mapping[str, np.ndarray], prefix: str,
             out: dict[str, np.ndarray]) -> None:
  """Adds the tensors of a (nested) mapping to `out` under their dotted names."""
  for key, value in obj.items():
    name = f"{prefix}{key}"
    if isinstance(value, _Tensor):
      out[name] = _materialise(value, storages)
    elif isinstance(value, Mapping):
      _collect(value, storages, name + ".", out)


def load(path: str) -> dict[str, np.ndarray]:
  """Reads the tensors of a PyTorch checkpoint file (legacy or zip layout).

  Args:
    path: a file written by `torch.save` of a state dict (a mapping of names to
      tensors; nested mappings give dotted names, other values are skipped).

  Returns:
    A flat {name: numpy array} dict; bfloat16 tensors come back as float32.

  Raises:
    WeightsError: if the file is missing, truncated or corrupt, is not a state
      dict, or its pickle refers to anything but tensors and containers.
  """
  if not os.path.isfile(path):
    raise WeightsError(f"weights file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    if zipfile.is_zipfile(io.BytesIO(data)):
      with zipfile.ZipFile(io.BytesIO(data)) as archive:
        obj, storages = _load_zip(archive, path)
    else:
      obj, storages = _load_legacy(io.BytesIO(data), path)
    if not isinstance(obj, Mapping):
      raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    tensors: dict[str, np.ndarray] = {}
    _collect(obj, storages, "", tensors)
    return tensors
  except WeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, struct.error, zipfile.BadZipFile, RecursionError) as e:
    raise WeightsError(f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: {e}") \
        from None

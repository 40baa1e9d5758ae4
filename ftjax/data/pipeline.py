"""Host-sharded grain pipelines over random-access sources.

The batch contract, shared by training and evaluation:

* A source is random access (`len(src)`, `src[i]`), e.g. a split from
  `load_splits`; each element is a flat dict of scalars (Text features are
  bytes).
* `preprocess` receives one batch of raw examples as a dict mapping each
  feature name to a numpy array with leading dimension B: numbers are stacked
  into their numpy dtype, and bytes / str values into an object array. It
  returns a dict of numpy arrays, each with leading dimension B, and must not
  produce the key "mask".
* Every yielded batch is that dict plus "mask": bool [B], True for a real
  example and False for an eval padding row.

`batch_size` is always the per-host batch size. In training, host
`shard_index` of `shard_count` reads its rows of each global batch; in
evaluation, the examples whose index is congruent to `shard_index` modulo
`shard_count`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from ftjax.data.tokenizer import TextTokenizer
from ftjax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
Preprocess = Callable[[Batch], Batch]
# Training-time augmentation of one host's preprocessed rows of a global batch:
# (batch, rng shared by every host for this global batch, the host's rows, global
# batch size) -> batch. See `ftjax.data.augment`.
Augment = Callable[[Batch, np.random.Generator, slice, int], Batch]

# Each element of these pipelines is a whole batch, so a short buffer already
# keeps the accelerator fed; a few threads overlap reading with tokenizing.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _check_shard(shard_index: int, shard_count: int, batch_size: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ConfigError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size} must be positive")


def _stack(values: Sequence[Any]) -> np.ndarray:
  # Strings stay Python objects: a fixed-width 'S' array would be as wide as
  # the longest review in the batch.
  if isinstance(values[0], (bytes, str)):
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
  return np.stack([np.asarray(v) for v in values])


def stack_examples(examples: Sequence[dict[str, Any]]) -> Batch:
  """Stacks flat example dicts into one dict of arrays with leading dim B.

  Args:
    examples: a non-empty list of dicts with the same keys.

  Returns:
    {key: array [B, ...]}; bytes and str values become object arrays.
  """
  return {key: _stack([e[key] for e in examples]) for key in examples[0]}


def _finish(preprocess: Preprocess, batch: Batch, mask: np.ndarray) -> Batch:
  """Applies `preprocess` and adds the mask, checking the contract."""
  out = dict(preprocess(batch))
  if "mask" in out:
    raise ValueError("preprocess must not return a 'mask' key; the pipeline adds it")
  for key, value in out.items():
    if np.shape(value)[:1] != mask.shape:
      raise ValueError(f"preprocess output {key!r} has shape {np.shape(value)}; "
                       f"expected leading dimension {mask.shape[0]}")
  out["mask"] = mask
  return out


def train_iterator(source: Sequence[Any], preprocess: Preprocess, *, batch_size: int,
                   seed: int, num_epochs: int | None, shard_index: int, shard_count: int,
                   read_options: grain.ReadOptions | None = None,
                   augment: Augment | None = None) -> grain.DatasetIterator:
  """Returns a checkpointable iterator over this host's part of shuffled training batches.

  The whole split is shuffled (again every epoch: the seed is folded with the
  epoch number) and cut into global batches of `batch_size * shard_count`
  examples; host `shard_index` reads and yields rows `shard_index * batch_size`
  onwards of each. The global batches, and so training, do not depend on how
  many hosts share them. Epochs are concatenated before batching, so a batch
  may span an epoch boundary; only the last incomplete batch of the whole run
  is dropped. The iterator's `get_state()` is a JSON-serialisable dict, and
  `set_state(state)` on a freshly built iterator with the same arguments
  resumes at the next batch.

  Args:
    source: a random-access split (see the module docstring).
    preprocess: raw batch -> dict of arrays (see the module docstring).
    batch_size: examples per batch on this host.
    seed: the shuffle seed, in [0, 2**32).
    num_epochs: passes over the split; None repeats forever.
    shard_index: this host's part of each global batch.
    shard_count: the number of parts (hosts holding different rows).
    read_options: grain threading and prefetch; DEFAULT_READ_OPTIONS if None.
    augment: optional random augmentation applied after `preprocess`, with a
      generator seeded by `seed` and the global batch's index (the same on every
      host, in every run, and after a resume).

  Returns:
    A grain DatasetIterator yielding preprocess(batch) plus "mask" (all True).
  """
  _check_shard(shard_index, shard_count, batch_size)
  global_batch = batch_size * shard_count
  if len(source) < global_batch:
    raise ConfigError(f"the training split holds {len(source)} examples, fewer than one "
                      f"global batch of {global_batch} ({shard_count} host part(s) of "
                      f"{batch_size})")
  if num_epochs is not None and num_epochs < 1:
    raise ConfigError(f"num_epochs={num_epochs} must be positive or None")
  mask = np.ones(batch_size, bool)
  rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)

  def load(indices: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
    examples = read_examples(source, [int(i) for i in indices[rows]])
    if augment is None:
      return _finish(preprocess, stack_examples(examples), mask)
    augmented = lambda batch: augment(preprocess(batch), rng, rows, global_batch)
    return _finish(augmented, stack_examples(examples), mask)

  ds = (grain.MapDataset.range(len(source)).shuffle(seed).repeat(num_epochs)
        .batch(global_batch, drop_remainder=True))
  ds = ds.map(load) if augment is None else ds.random_map(load, seed=seed)
  return iter(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))


class Subset(Sequence):
  """The examples of a random-access source at the given indices, in that order."""

  def __init__(self, source: Sequence[Any], indices: Sequence[int]):
    self._source = source
    self._indices = [int(i) for i in indices]

  @property
  def indices(self) -> list[int]:
    """The source index of each example."""
    return list(self._indices)

  def __len__(self) -> int:
    return len(self._indices)

  def _position(self, index: int) -> int:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self._indices[index]

  def __getitem__(self, index: int) -> Any:
    return self._source[self._position(index)]

  def __getitems__(self, indices: Sequence[int]) -> list[Any]:
    return read_examples(self._source, [self._position(i) for i in indices])


class Head(Subset):
  """The first `n` examples of a random-access source (all of them if `n` <= 0)."""

  def __init__(self, source: Sequence[Any], n: int):
    super().__init__(source, range(len(source) if n <= 0 else min(n, len(source))))


def read_examples(source: Sequence[Any], indices: list[int]) -> list[Any]:
  """The examples at `indices`, read in one call where the source can (ArrayRecord)."""
  getitems = getattr(source, "__getitems__", None)
  return list(getitems(indices)) if getitems else [source[i] for i in indices]


def num_eval_batches(num_examples: int, batch_size: int, shard_count: int) -> int:
  """Returns how many batches `eval_batches` yields on every host.

  Args:
    num_examples: the size of the split.
    batch_size: the per-host batch size.
    shard_count: the number of hosts.

  Returns:
    The batch count of the host with the largest slice.
  """
  largest_slice = -(-num_examples // shard_count)
  return -(-largest_slice // batch_size)


def eval_batches(source: Sequence[Any], preprocess: Preprocess, *, batch_size: int,
                 shard_index: int, shard_count: int,
                 read_options: grain.ReadOptions | None = None) -> Iterator[Batch]:
  """Yields every example of the host's slice once, in order, padded.

  All hosts yield `num_eval_batches(len(source), batch_size, shard_count)`
  batches, since in multi-host SPMD every host must run the same number of
  steps. Padding rows repeat a real example (so `preprocess` sees valid data)
  and carry mask False, so that summing a metric over mask counts each
  example exactly once across all hosts.

  Args:
    source: a random-access split (see the module docstring).
    preprocess: raw batch -> dict of arrays (see the module docstring).
    batch_size: examples per batch on this host.
    shard_index: this host's index, usually `jax.process_index()`.
    shard_count: the number of hosts, usually `jax.process_count()`.
    read_options: grain threading and prefetch; DEFAULT_READ_OPTIONS if None.

  Returns:
    An iterator of preprocess(batch) plus "mask".
  """
  _check_shard(shard_index, shard_count, batch_size)
  num_batches = num_eval_batches(len(source), batch_size, shard_count)
  real = np.arange(shard_index, len(source), shard_count)
  filler = real[0] if len(real) else 0
  indices = np.full(num_batches * batch_size, filler, np.int64)
  indices[:len(real)] = real
  masks = np.arange(len(indices)) < len(real)

  def load(b: int) -> Batch:
    rows = slice(b * batch_size, (b + 1) * batch_size)
    examples = read_examples(source, [int(i) for i in indices[rows]])
    return _finish(preprocess, stack_examples(examples), masks[rows])

  ds = grain.MapDataset.range(num_batches).map(load)
  return iter(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))


def _decode(text: bytes | str) -> str:
  return text.decode("utf-8") if isinstance(text, bytes) else text


def text_classification_preprocess(tokenizer: TextTokenizer, text_key: str = "text",
                                   label_key: str = "label",
                                   pair_key: str | None = None) -> Preprocess:
  """Returns a preprocess that tokenizes texts (or text pairs) and keeps integer labels.

  Args:
    tokenizer: encodes to a fixed length (see `load_tokenizer`).
    text_key: the feature holding the text (bytes or str).
    label_key: the feature holding the class index.
    pair_key: the feature holding each text's second segment, for sentence-pair
      data sets; None for single texts.

  Returns:
    batch -> {"input_ids", "attention_mask", "token_type_ids": int32 [B, L],
    "label": int32 [B]}, plus "task": int32 [B] for the examples of a multi-task
    run (`ftjax.data.mixture`).
  """

  def preprocess(batch: Batch) -> Batch:
    try:
      texts = [_decode(t) for t in batch[text_key]]
      pairs = [_decode(t) for t in batch[pair_key]] if pair_key else None
    except UnicodeDecodeError as e:
      ids = batch.get("id")
      raise DataError(f"text that is not UTF-8 in the batch of ids {ids}: {e}") from e
    out = tokenizer.encode(texts, pairs)
    out["label"] = np.asarray(batch[label_key], np.int32)
    if "task" in batch:
      out["task"] = np.asarray(batch["task"], np.int32)
    return out

  return preprocess

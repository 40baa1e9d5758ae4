"""Image classification inputs: resizing, the batch preprocess and few-shot subsets.

Images are resized with bilinear interpolation (half-pixel centres, edges
clamped), antialiased when downscaling by widening the triangle kernel, as
`jax.image.resize(..., "linear")` does. The resize is a product of one weight
matrix per axis, computed in numpy: deterministic, vectorised over the batch,
and able to resize a different crop of every image at once.

The preprocess follows the batch contract of `ftjax.data.pipeline` and adds
"label_mix" (= "label") and "mix" (= 1.0), the partner's label and the weight
of the own label, so that batches mixed by `ftjax.data.augment` (mixup,
cutmix) and unmixed batches have the same arrays.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftjax.data import local_builder
from ftjax.data import pipeline
from ftjax.data.pipeline import Batch, Preprocess
from ftjax.errors import ConfigError, DataError

# How many examples `few_shot` reads at a time.
_READ_CHUNK = 1024


def resize_weights(in_size: int, out_size: int, starts: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray:
  """Returns bilinear weights that resize a window of an axis to `out_size`.

  Args:
    in_size: the length of the axis.
    out_size: the length of the result.
    starts: int [N], the first position of each window.
    lengths: int [N], each window's length (>= 1; the window lies in the axis).

  Returns:
    float32 [N, out_size, in_size]; row j of item n averages the input
    positions around output pixel j of window n, and is zero outside it.
  """
  starts = np.asarray(starts, np.float64)[:, None, None]
  lengths = np.asarray(lengths, np.float64)[:, None, None]
  scale = out_size / lengths
  # Downscaling widens the kernel so every input pixel contributes (antialias).
  kernel_width = np.maximum(1.0 / scale, 1.0)
  centres = starts + (np.arange(out_size)[None, :, None] + 0.5) / scale - 0.5
  positions = np.arange(in_size)[None, None, :]
  weights = np.maximum(0.0, 1.0 - np.abs(positions - centres) / kernel_width)
  weights *= (positions >= starts) & (positions < starts + lengths)
  # Near an edge part of the kernel falls outside the window: renormalising
  # clamps to the edge pixel.
  weights /= weights.sum(axis=-1, keepdims=True)
  return weights.astype(np.float32)


def resize(images: np.ndarray, size: int, boxes: np.ndarray | None = None) -> np.ndarray:
  """Resizes images, or a box of each, to `size` x `size` (bilinear, see the module docstring).

  Args:
    images: float [B, H, W, C].
    size: the side of the result.
    boxes: int [B, 4], (top, left, height, width) of the window of each image
      to resize; None resizes whole images.

  Returns:
    float32 [B, size, size, C].
  """
  images = np.asarray(images, np.float32)
  b, h, w, c = images.shape
  if boxes is None:
    rows = resize_weights(h, size, np.zeros(1), np.full(1, h))[0]
    cols = resize_weights(w, size, np.zeros(1), np.full(1, w))[0]
  else:
    boxes = np.asarray(boxes)
    rows = resize_weights(h, size, boxes[:, 0], boxes[:, 2])
    cols = resize_weights(w, size, boxes[:, 1], boxes[:, 3])[:, None]
  # [size, H] @ [B, H, W * C], then [size, W] @ [B, size, W, C] per output row.
  out = np.matmul(rows, images.reshape(b, h, w * c)).reshape(b, size, w, c)
  return np.matmul(cols, out)


def _channel_stats(values: float | Sequence[float], name: str) -> np.ndarray:
  """Returns mean or std as float32 [3], from a scalar or 1 or 3 values."""
  array = np.asarray(values, np.float32).reshape(-1)
  if array.size not in (1, 3):
    raise ConfigError(f"image {name} {values!r}: expected one value or one per channel (3)")
  return np.broadcast_to(array, (3,)).copy()


def _ids(batch: Batch, size: int) -> np.ndarray:
  """Returns the batch's example ids, or positions when it has none."""
  return np.asarray(batch["id"]) if "id" in batch else np.arange(size)


def decode_image(data: bytes, where: str) -> np.ndarray:
  """An encoded image file (JPEG, PNG, ...) as uint8 [H, W, 3] RGB, decoded by Pillow."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"), np.uint8)
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{where}: not an image Pillow can decode: {e}") from e


def image_classification_preprocess(image_size: int, mean: float | Sequence[float],
                                    std: float | Sequence[float], num_classes: int,
                                    image_key: str = "image",
                                    label_key: str = "label",
                                    encoded: bool = False) -> Preprocess:
  """Returns a preprocess that resizes and normalises images and checks labels.

  Args:
    image_size: the side S of the square output images.
    mean: per-channel mean of images scaled to [0, 1] (a scalar or 3 values).
    std: per-channel standard deviation, likewise, positive.
    num_classes: labels must lie in [0, num_classes).
    image_key: the feature holding uint8 images [B, H, W] or [B, H, W, C],
      C being 1 (grayscale) or 3 (RGB); with `encoded`, image files' bytes.
    label_key: the feature holding the class index.
    encoded: the images are encoded files (of any sizes), decoded here one at a
      time and each resized to S x S.

  Returns:
    batch -> {"image": float32 [B, S, S, 3] (grayscale replicated to three
    channels, scaled to [0, 1], resized, then normalised by mean and std),
    "label": int32 [B], "label_mix": int32 [B] (= label), "mix": float32 [B]
    (= 1)}. The preprocess raises DataError naming an example id for an image
    that is not uint8, is empty or has another shape, or a label that is not an
    integer or lies outside the classes.

  Raises:
    ConfigError: for a mean or std of another length, a non-positive std, or
      a non-positive size or class count.
  """
  if image_size < 1 or num_classes < 1:
    raise ConfigError(f"image_size={image_size} and num_classes={num_classes} must be "
                      f"positive")
  mean = _channel_stats(mean, "mean")
  std = _channel_stats(std, "std")
  if np.any(std <= 0):
    raise ConfigError(f"image std {std.tolist()}: must be positive")

  def pixels_of(batch: Batch, ids: np.ndarray) -> np.ndarray:
    """float32 [B, S, S, 3] in [0, 1]."""
    if encoded:  # each decoded image resized on its own: their sizes differ
      return np.concatenate([resize(decode_image(data, f"example id {i}")[None] / 255.0,
                                    image_size) for i, data in zip(ids, batch[image_key])])
    images = np.asarray(batch[image_key])
    shape = images.shape[1:]
    if not (len(shape) == 2 or len(shape) == 3 and shape[2] in (1, 3)):
      raise DataError(f"example id {ids[0]}: image of shape {list(shape)}; expected [H, W], "
                      f"[H, W, 1] or [H, W, 3]")
    if images.dtype != np.uint8:
      raise DataError(f"example id {ids[0]}: image of dtype {images.dtype}; expected uint8")
    if 0 in shape[:2]:
      raise DataError(f"example id {ids[0]}: empty image of shape {list(shape)}")
    if images.ndim == 3:
      images = images[..., None]
    pixels = images.astype(np.float32) / 255.0
    if pixels.shape[1:3] != (image_size, image_size):
      pixels = resize(pixels, image_size)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels

  def preprocess(batch: Batch) -> Batch:
    labels = np.asarray(batch[label_key])
    ids = _ids(batch, len(labels))
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"example id {ids[0]}: label {labels[0].item()!r} of dtype "
                      f"{labels.dtype}; expected an integer class")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
      raise DataError(f"example id {ids[bad[0]]}: label {labels[bad[0]]}; expected a class "
                      f"in [0, {num_classes})")
    pixels = pixels_of(batch, ids)
    labels = labels.astype(np.int32)
    return {"image": (pixels - mean) / std, "label": labels, "label_mix": labels.copy(),
            "mix": np.ones(len(labels), np.float32)}

  return preprocess


def few_shot(source: Sequence[Any], k: int, seed: int, num_classes: int,
             label_key: str = "label") -> pipeline.Subset:
  """Returns k examples of every class of a source, chosen with a fixed seed.

  Every example's label is read once. Within each class, examples are
  ordered by a hash of (seed, index) and the first k taken, so the choice is
  the same everywhere and a larger k keeps the examples of a smaller one.

  Args:
    source: a random-access split of examples with an integer label.
    k: examples per class.
    seed: selects other examples.
    num_classes: labels must lie in [0, num_classes); every class is needed.
    label_key: the feature holding the class index.

  Returns:
    A random-access view of k * num_classes examples in source order.

  Raises:
    ConfigError: for k < 1.
    DataError: for a label outside [0, num_classes) (naming its index and id)
      or a class with fewer than k examples (naming the class and count).
  """
  if k < 1:
    raise ConfigError(f"few-shot k={k}: must be a positive number of examples per class")
  members: dict[int, list[int]] = collections.defaultdict(list)
  for start in range(0, len(source), _READ_CHUNK):
    indices = list(range(start, min(start + _READ_CHUNK, len(source))))
    for index, example in zip(indices, pipeline.read_examples(source, indices)):
      label = int(example[label_key])
      if not 0 <= label < num_classes:
        raise DataError(f"example {index} (id {example.get('id', index)}): label {label}; "
                        f"expected a class in [0, {num_classes})")
      members[label].append(index)
  chosen = []
  for label in range(num_classes):
    if len(members[label]) < k:
      raise DataError(f"class {label} has {len(members[label])} examples, fewer than the "
                      f"{k} per class few-shot needs")
    order = sorted(members[label], key=lambda i: local_builder.hash_key(seed, i))
    chosen.extend(order[:k])
  return pipeline.Subset(source, sorted(chosen))

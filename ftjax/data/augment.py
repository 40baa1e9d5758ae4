"""Training-time image augmentation: random resized crop, flip, mixup and cutmix.

`Augment` works on preprocessed batches (see
`ftjax.data.images.image_classification_preprocess`): float images
[b, S, S, 3] with "label", "label_mix" and "mix". It is configured by a
config section, `config.data.augment` (`KEYS`):

* crop_scale (lo, hi): random resized crop of an area fraction drawn from
  [lo, hi], resized back to S x S; on when hi > lo or lo < 1. (1.0, 1.0): off.
* crop_ratio (lo, hi): the range of the crop's aspect ratio (width / height),
  drawn log-uniformly.
* flip: random horizontal flip with probability 0.5.
* mixup_alpha, cutmix_alpha: Beta(alpha, alpha) mixing weights; 0: off.
* mix_prob: the probability that a batch is mixed at all.
* switch_prob: when both mixup and cutmix are on, the probability of cutmix.

The crop follows torchvision's RandomResizedCrop: up to 10 tries of an area
and log-ratio, the first box that fits the image wins, else a centre crop of
the whole image clamped to the ratio range. Mixup and cutmix draw one weight
(and one cutmix box) per global batch and pair row i with row i ^ 1, its
neighbour; row i's "label_mix" becomes its partner's label and "mix" the
weight of its own label (for cutmix, the exact share of its pixels kept).

Augmentation does not depend on how many hosts share a batch: every host
gets the same generator state for a global batch, draws the random numbers
of all its rows, and uses those of its own `rows`. A host's rows start at an
even offset, so pairs never straddle two hosts.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from ftjax import schema
from ftjax.data.images import resize
from ftjax.data.pipeline import Batch
from ftjax.errors import ConfigError

# Tries of the random resized crop before it falls back to a centre crop.
CROP_TRIES = 10


def _range(top: float | None) -> schema.Rule:
  """A (lo, hi) pair with 0 < lo <= hi (<= top)."""
  text = "must be two numbers (lo, hi), 0 < lo <= hi" + (f" <= {top}" if top else "")

  def rule(value):
    pair = tuple(value)
    ok = (len(pair) == 2 and all(schema.is_number(v) for v in pair)
          and 0 < pair[0] <= pair[1] and (top is None or pair[1] <= top))
    return "" if ok else text
  return rule


# The `config.data.augment` keys (everything off by default).
KEYS = {
    "crop_scale": schema.Key((1.0, 1.0), "random resized crop: the range of the kept area "
                             "fraction ((1, 1): off)", rule=_range(1.0)),
    "crop_ratio": schema.Key((3 / 4, 4 / 3), "random resized crop: the range of the aspect "
                             "ratio", rule=_range(None)),
    "flip": schema.Key(False, "random horizontal flip"),
    "mixup_alpha": schema.Key(0.0, "mixup with Beta(a, a) weights (0: off)",
                              rule=schema.at_least(0)),
    "cutmix_alpha": schema.Key(0.0, "cutmix with Beta(a, a) weights (0: off)",
                               rule=schema.at_least(0)),
    "mix_prob": schema.Key(1.0, "the probability that a batch is mixed",
                           rule=schema.in_range(0, 1)),
    "switch_prob": schema.Key(0.5, "mixup and cutmix both on: the probability of cutmix",
                              rule=schema.in_range(0, 1)),
}


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random augmentation of one host's rows of a global batch (see the module docstring)."""

  crop_scale: tuple[float, float] = (1.0, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5

  @property
  def crops(self) -> bool:
    """Whether the random resized crop is on."""
    return self.crop_scale[1] > self.crop_scale[0] or self.crop_scale[0] < 1.0

  @property
  def mixes(self) -> bool:
    """Whether mixup or cutmix can change a batch."""
    return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

  def __call__(self, batch: Batch, rng: np.random.Generator, rows: slice,
               global_batch: int) -> Batch:
    """Augments this host's rows of a global batch.

    Args:
      batch: a preprocessed batch of b rows: "image" float [b, S, S, C],
        "label" int [b]; other keys pass through.
      rng: the generator of this global batch, in the same state on every host.
      rows: this host's rows of the global batch (b of them, step 1).
      global_batch: the number of rows of the global batch.

    Returns:
      The batch with augmented "image" and, when mixed, new "label_mix"
      (int32) and "mix" (float32).

    Raises:
      ConfigError: when mixing and the host's rows do not start at an even
        offset or are odd in number.
      ValueError: for a batch whose size does not match `rows`.
    """
    images = np.asarray(batch["image"], np.float32)
    b, size = images.shape[0], images.shape[1]
    local = range(global_batch)[rows]
    if len(local) != b or local.step != 1:
      raise ValueError(f"rows {rows} of a global batch of {global_batch} do not match a "
                       f"batch of {b} rows")
    if self.mixes and (local.start % 2 or b % 2):
      raise ConfigError(f"mixup/cutmix pair adjacent rows, so each host's batch must be even "
                        f"in size and start at an even row; found {b} rows from row "
                        f"{local.start}")
    out = dict(batch)
    if self.crops:
      boxes = self._crop_boxes(rng, global_batch, size)[rows]
      images = resize(images, size, boxes)
    if self.flip:
      flips = (rng.random(global_batch) < 0.5)[rows]
      images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    if self.mixes:
      images = self._mix(out, images, rng)
    out["image"] = images
    return out

  def _crop_boxes(self, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Returns int [n, 4] crop boxes (top, left, height, width) in a size x size image."""
    area = size * size * rng.uniform(*self.crop_scale, (n, CROP_TRIES))
    log_ratio = rng.uniform(*np.log(self.crop_ratio), (n, CROP_TRIES))
    offsets = rng.random((n, 2))
    ratio = np.exp(log_ratio)
    widths = np.round(np.sqrt(area * ratio)).astype(np.int64)
    heights = np.round(np.sqrt(area / ratio)).astype(np.int64)
    fits = (widths > 0) & (widths <= size) & (heights > 0) & (heights <= size)
    first = np.argmax(fits, axis=1)
    width = np.take_along_axis(widths, first[:, None], 1)[:, 0]
    height = np.take_along_axis(heights, first[:, None], 1)[:, 0]
    # No try fits: the whole square, narrowed to the ratio range.
    lo, hi = self.crop_ratio
    centre_width, centre_height = size, size
    if lo > 1:
      centre_height = int(round(size / lo))
    elif hi < 1:
      centre_width = int(round(size * hi))
    fallback = ~fits.any(axis=1)
    width[fallback], height[fallback] = centre_width, centre_height
    top = np.floor(offsets[:, 0] * (size - height + 1)).astype(np.int64)
    left = np.floor(offsets[:, 1] * (size - width + 1)).astype(np.int64)
    top[fallback] = (size - centre_height) // 2
    left[fallback] = (size - centre_width) // 2
    return np.stack([top, left, height, width], axis=1)

  def _mix(self, out: Batch, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mixes adjacent rows with one draw per global batch; sets label_mix and mix."""
    if rng.random() >= self.mix_prob:
      return images
    cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0
                                        or rng.random() < self.switch_prob)
    alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = np.arange(len(images)) ^ 1
    others = images[partner]
    if cutmix:
      size_y, size_x = images.shape[1:3]
      cut = math.sqrt(1.0 - lam)
      half_y, half_x = int(size_y * cut) // 2, int(size_x * cut) // 2
      centre_y, centre_x = rng.integers(size_y), rng.integers(size_x)
      y0, y1 = max(centre_y - half_y, 0), min(centre_y + half_y, size_y)
      x0, x1 = max(centre_x - half_x, 0), min(centre_x + half_x, size_x)
      mixed = images.copy()
      mixed[:, y0:y1, x0:x1] = others[:, y0:y1, x0:x1]
      lam = 1.0 - (y1 - y0) * (x1 - x0) / (size_y * size_x)
    else:
      mixed = lam * images + (1.0 - lam) * others
    labels = np.asarray(out["label"], np.int32)
    out["label_mix"] = labels[partner]
    out["mix"] = np.full(len(images), lam, np.float32)
    return mixed.astype(np.float32)


def from_config(section: ml_collections.ConfigDict) -> Augment | None:
  """The augmentation a config section (`KEYS`, checked by `ftjax.config.validate`)
  describes, or None when all is off."""
  augment = Augment(
      crop_scale=tuple(float(v) for v in section.crop_scale),
      crop_ratio=tuple(float(v) for v in section.crop_ratio), flip=section.flip,
      mixup_alpha=float(section.mixup_alpha), cutmix_alpha=float(section.cutmix_alpha),
      mix_prob=float(section.mix_prob), switch_prob=float(section.switch_prob))
  if not (augment.crops or augment.flip or augment.mixes):
    return None
  return augment

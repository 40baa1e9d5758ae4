"""Tests for the image data: IDX files, Fashion-MNIST and MNIST digits, preprocess, augment."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from ftjax import config as ftjax_config
from ftjax.data import augment, idx, images, pipeline
from ftjax.data.presets import fashion_mnist, mnist_digits
from ftjax.errors import ConfigError, DataError

from conftest import with_overrides

FASHION_SIZES = {"train": 55000, "validation": 5000, "test": 10000}
VALIDATION_FIRST_IDS = [1, 15, 58, 72, 76]
VALIDATION_ID_SUM = 149366701


def _prepare(builder_cls, data_dir: str, source_path: str | None = None) -> dict:
  """Prepares a builder into `data_dir` and returns its random-access splits."""
  config = builder_cls.config_for(source_path, "test source {path}")
  builder = builder_cls(data_dir=data_dir, config=config)
  builder.download_and_prepare(file_format="array_record")
  return builder.as_data_source()


@pytest.fixture(scope="module")
def fashion() -> dict[str, list]:
  """The packaged Fashion-MNIST as the builder splits it: {split: [(id, image, label)]}."""
  try:
    folder = fashion_mnist.source_dir()
  except DataError as e:
    pytest.skip(str(e))
  return dict(zip(FASHION_SIZES, fashion_mnist.read_splits(folder)))


def _column(source, key: str) -> np.ndarray:
  return np.array([e[key] for e in source.__getitems__(list(range(len(source))))])


# --- IDX files ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
  rng = np.random.default_rng(0)
  array = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
  path = str(tmp_path / name)
  idx.write_idx(path, array)
  np.testing.assert_array_equal(idx.read_images(path), array)
  labels_path = str(tmp_path / f"labels-{name}")
  idx.write_idx(labels_path, array[:, 0, 0])
  np.testing.assert_array_equal(idx.read_labels(labels_path), array[:, 0, 0])


def _header(magic: int, *sizes: int) -> bytes:
  return magic.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in sizes)


@pytest.mark.parametrize("content, reason", [
    (_header(0x801, 2) + b"\0\1", r"magic number 0x00000801; expected magic 0x00000803"),
    (_header(0x803, 2, 2, 2) + bytes(7), r"shape \(2, 2, 2\).*holds 7 \(truncated\)"),
    (_header(0x803, 1, 2, 2) + bytes(5), r"holds 5 \(trailing bytes\)"),
    (_header(0x803, 1, 2), r"shorter than the 16-byte header"),
    (b"\0\0", r"too short for an IDX header"),
    (gzip.compress(_header(0x803, 1, 1, 1) + b"\7", mtime=0)[:-6], r"corrupt or truncated gzip"),
], ids=["wrong magic", "truncated", "trailing bytes", "short header", "too short", "bad gzip"])
def test_idx_malformed_names_file(tmp_path, content, reason):
  path = tmp_path / "bad-images-idx3-ubyte"
  path.write_bytes(content)
  with pytest.raises(DataError, match=reason) as info:
    idx.read_images(str(path))
  assert str(path) in str(info.value)


def test_idx_missing_file(tmp_path):
  with pytest.raises(DataError, match="not found"):
    idx.read_labels(str(tmp_path / "absent"))


# --- Fashion-MNIST ------------------------------------------------------------


def test_fashion_split_sizes_balance_and_ids(fashion):
  assert {name: len(items) for name, items in fashion.items()} == FASHION_SIZES
  ids = {name: np.array([i for i, _, _ in items]) for name, items in fashion.items()}
  labels = np.array([label for _, _, label in fashion["validation"]])
  assert np.bincount(labels).tolist() == [500] * 10
  # The split is fixed once for the life of the data set.
  assert ids["validation"][:5].tolist() == VALIDATION_FIRST_IDS
  assert ids["validation"].sum() == VALIDATION_ID_SUM
  np.testing.assert_array_equal(np.sort(np.concatenate([ids["train"], ids["validation"]])),
                                np.arange(60000))
  np.testing.assert_array_equal(ids["test"], 60000 + np.arange(10000))
  # Each split keeps the file's order.
  assert np.all(np.diff(ids["train"]) > 0) and np.all(np.diff(ids["validation"]) > 0)


def test_fashion_first_test_image(fashion):
  with gzip.open(os.path.join(fashion_mnist.source_dir(), "t10k-images-idx3-ubyte.gz")) as f:
    raw = np.frombuffer(f.read(16 + 784)[16:], np.uint8).reshape(28, 28)
  example_id, image, label = fashion["test"][0]
  assert example_id == 60000 and label == fashion_mnist.LABEL_NAMES.index("Ankle boot")
  np.testing.assert_array_equal(image, raw)
  assert raw[10, 15:20].tolist() == [53, 129, 120, 147, 175]


@pytest.mark.slow
def test_fashion_prepared_matches_the_raw_files(fashion, tmp_path):
  splits = _prepare(fashion_mnist.FashionMnist, str(tmp_path))
  assert {name: len(split) for name, split in splits.items()} == FASHION_SIZES
  for name in FASHION_SIZES:
    for position in (0, 17, FASHION_SIZES[name] - 1):
      example = splits[name][position]
      example_id, image, label = fashion[name][position]
      assert example["id"] == example_id and example["label"] == label
      np.testing.assert_array_equal(example["image"], image)


def _write_fashion(folder, train_labels, test_labels, gz: bool = True) -> str:
  """Writes a Fashion-MNIST folder whose images are filled with their index."""
  os.makedirs(folder, exist_ok=True)
  suffix = ".gz" if gz else ""
  for part, labels in (("train", train_labels), ("t10k", test_labels)):
    labels = np.asarray(labels, np.uint8)
    pixels = np.broadcast_to(np.arange(len(labels), dtype=np.uint8)[:, None, None],
                             (len(labels), 28, 28))
    idx.write_idx(os.path.join(folder, f"{part}-images-idx3-ubyte{suffix}"), pixels)
    idx.write_idx(os.path.join(folder, f"{part}-labels-idx1-ubyte{suffix}"), labels)
  return str(folder)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_custom_folder(tmp_path, gz):
  folder = _write_fashion(tmp_path / "src", np.arange(120) % 10, [3, 1, 4, 1, 5], gz=gz)
  splits = _prepare(fashion_mnist.FashionMnist, str(tmp_path / "tfds"), folder)
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [110, 10, 5]
  assert sorted(_column(splits["validation"], "label").tolist()) == list(range(10))
  test = splits["test"].__getitems__(list(range(5)))
  assert [e["id"] for e in test] == [120, 121, 122, 123, 124]
  assert [e["label"] for e in test] == [3, 1, 4, 1, 5]
  assert [int(e["image"][5, 5]) for e in test] == [0, 1, 2, 3, 4]


def test_fashion_malformed_folder(tmp_path):
  folder = _write_fashion(tmp_path / "bad_label", [0, 1, 10], [0])
  with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 10 at index 2"):
    fashion_mnist.read_part(folder, "train")
  folder = _write_fashion(tmp_path / "counts", [0, 1, 2], [0])
  idx.write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), np.zeros(2, np.uint8))
  with pytest.raises(DataError, match="holds 3 images but .* holds 2 labels"):
    fashion_mnist.read_part(folder, "train")
  idx.write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"),
                np.zeros((2, 27, 28), np.uint8))
  with pytest.raises(DataError, match="27 x 28 pixels; expected 28 x 28"):
    fashion_mnist.read_part(folder, "train")
  os.remove(os.path.join(folder, "t10k-images-idx3-ubyte.gz"))
  with pytest.raises(DataError, match="holds neither t10k-images-idx3-ubyte.gz nor"):
    fashion_mnist.read_part(folder, "t10k")
  with pytest.raises(DataError, match="not a folder"):
    _prepare(fashion_mnist.FashionMnist, str(tmp_path / "tfds"),
             os.path.join(folder, "train-labels-idx1-ubyte.gz"))


def test_fashion_not_installed(monkeypatch, tmp_path):
  monkeypatch.setattr(fashion_mnist, "PACKAGE_DIRS", (str(tmp_path / "absent"),))
  with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*make data"):
    fashion_mnist.source_dir()


# --- MNIST digits ---------------------------------------------------------------


def test_mnist_digits_splits(tmp_path):
  splits = _prepare(mnist_digits.MnistDigits, str(tmp_path))
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [4000, 500, 500]
  for name, per_class in (("train", 400), ("validation", 50), ("test", 50)):
    assert np.bincount(_column(splits[name], "label")).tolist() == [per_class] * 10
  ids = np.concatenate([_column(s, "id") for s in splits.values()])
  assert sorted(ids.tolist()) == list(range(1, 5001))
  example = splits["test"][0]
  assert example["image"].shape == (28, 28) and example["image"].dtype == np.uint8


def _digit_row(label: int = 7, pixel: str = "0") -> str:
  return ",".join([pixel] * 784 + [str(label)]) + "\n"


@pytest.mark.parametrize("bad_row, reason", [
    ("1,2,3\n", "expected 785 comma-separated values .* found 3"),
    (_digit_row(pixel="x"), "column 1 is 'x'; expected an integer"),
    (_digit_row(pixel="256"), "column 1 is 256; expected a pixel value"),
    (_digit_row(label=10), "column 785 .* is 10; expected a digit"),
])
def test_mnist_digits_malformed_row(tmp_path, bad_row, reason):
  path = str(tmp_path / "digits.csv.gz")
  with gzip.open(path, "wt") as f:
    f.write(_digit_row() + bad_row)
  with pytest.raises(DataError, match=f"{path}: row 2: {reason}"):
    mnist_digits.read_examples(path)


def test_mnist_digits_small_and_empty_file(tmp_path):
  path = tmp_path / "digits.csv"
  path.write_text(_digit_row(3, "9") + "\n" + _digit_row(5))
  examples = mnist_digits.read_examples(str(path))
  assert [(e["id"], e["label"], int(e["image"][0, 0])) for e in examples] == [(1, 3, 9),
                                                                             (3, 5, 0)]
  path.write_text("\n")
  with pytest.raises(DataError, match="no rows"):
    mnist_digits.read_examples(str(path))


# --- Preprocess -----------------------------------------------------------------


def test_resize_matches_jax():
  jax = pytest.importorskip("jax")
  x = np.random.default_rng(0).random((2, 28, 20, 3)).astype(np.float32)
  for size in (64, 9):
    expected = jax.image.resize(x, (2, size, size, 3), "linear")
    np.testing.assert_allclose(images.resize(x, size), expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 28, 28), (4, 28, 28, 1), (4, 20, 30, 3)])
def test_preprocess_shapes_and_normalisation(shape):
  preprocess = images.image_classification_preprocess(32, (0.5, 0.25, 0.0), (0.25, 0.5, 1.0),
                                                      num_classes=10)
  batch = {"image": np.full(shape, 255, np.uint8), "label": np.array([0, 9, 3, 3]),
           "id": np.arange(4)}
  out = preprocess(batch)
  assert out["image"].shape == (4, 32, 32, 3) and out["image"].dtype == np.float32
  np.testing.assert_allclose(out["image"][..., 0], 2.0, rtol=1e-6)
  np.testing.assert_allclose(out["image"][..., 1], 1.5, rtol=1e-6)
  np.testing.assert_allclose(out["image"][..., 2], 1.0, rtol=1e-6)
  assert out["label"].dtype == out["label_mix"].dtype == np.int32
  np.testing.assert_array_equal(out["label_mix"], [0, 9, 3, 3])
  np.testing.assert_array_equal(out["mix"], np.ones(4, np.float32))


def test_preprocess_in_eval_pipeline(fashion):
  source = [{"id": i, "image": image, "label": label} for i, image, label in fashion["test"][:8]]
  preprocess = images.image_classification_preprocess(28, 0.5, 0.5, num_classes=10)
  batch = next(pipeline.eval_batches(source, preprocess, batch_size=8, shard_index=0,
                                     shard_count=1))
  raw = source[0]["image"].astype(np.float32) / 255.0
  np.testing.assert_allclose(batch["image"][0, ..., 1], (raw - 0.5) / 0.5, atol=1e-6)
  assert batch["mask"].all() and batch["label"][0] == 9


@pytest.mark.parametrize("image, label, reason", [
    (np.zeros((2, 8, 8, 4), np.uint8), [1, 1], r"example id 40: image of shape \[8, 8, 4\]"),
    (np.zeros((2, 8), np.uint8), [1, 1], r"example id 40: image of shape \[8\]"),
    (np.zeros((2, 8, 8), np.float32), [1, 1], "example id 40: image of dtype float32"),
    (np.zeros((2, 8, 8), np.uint8), [1, 10], r"example id 41: label 10; expected a class"),
    (np.zeros((2, 8, 8), np.uint8), [-1, 0], r"example id 40: label -1"),
])
def test_preprocess_errors_name_the_example(image, label, reason):
  preprocess = images.image_classification_preprocess(8, 0.5, 0.5, num_classes=10)
  with pytest.raises(DataError, match=reason):
    preprocess({"image": image, "label": np.array(label), "id": np.array([40, 41])})


def test_preprocess_bad_arguments():
  with pytest.raises(ConfigError, match="mean"):
    images.image_classification_preprocess(8, (0.5, 0.5), 0.5, num_classes=10)
  with pytest.raises(ConfigError, match="positive"):
    images.image_classification_preprocess(8, 0.5, (0.5, 0.0, 0.5), num_classes=10)


# --- Few-shot -------------------------------------------------------------------


def _labelled(counts: list[int]) -> list[dict]:
  labels = [c for c, n in enumerate(counts) for _ in range(n)]
  order = np.random.default_rng(1).permutation(len(labels))
  return [{"id": np.int64(100 + i), "label": np.int64(labels[j])} for i, j in enumerate(order)]


def test_few_shot_picks_k_per_class_deterministically():
  source = _labelled([30, 12, 5])
  subset = images.few_shot(source, 5, seed=3, num_classes=3)
  assert len(subset) == 15
  labels = [e["label"] for e in subset.__getitems__(list(range(15)))]
  assert np.bincount(labels).tolist() == [5, 5, 5]
  assert subset[-1] == subset[14] == source[subset.indices[-1]]
  assert subset.indices == sorted(subset.indices)
  assert images.few_shot(source, 5, seed=3, num_classes=3).indices == subset.indices
  assert images.few_shot(source, 5, seed=4, num_classes=3).indices != subset.indices
  # A larger k keeps the examples of a smaller one.
  assert set(images.few_shot(source, 2, seed=3, num_classes=3).indices) < set(subset.indices)
  with pytest.raises(IndexError):
    subset[15]


def test_few_shot_errors():
  source = _labelled([30, 4, 5])
  with pytest.raises(DataError, match="class 1 has 4 examples, fewer than the 5"):
    images.few_shot(source, 5, seed=0, num_classes=3)
  with pytest.raises(DataError, match=r"label 2; expected a class in \[0, 2\)"):
    images.few_shot(source, 3, seed=0, num_classes=2)
  with pytest.raises(ConfigError, match="k=0"):
    images.few_shot(source, 0, seed=0, num_classes=3)


# --- Augmentation ---------------------------------------------------------------


def _augment_config(**overrides):
  config = ftjax_config.defaults().data.augment
  config.lock()
  return with_overrides(config, **overrides)


def _batch(n: int = 8, size: int = 16) -> dict:
  rng = np.random.default_rng(7)
  return {"image": rng.random((n, size, size, 3), dtype=np.float32),
          "label": np.arange(n, dtype=np.int32) % 5,
          "label_mix": np.arange(n, dtype=np.int32) % 5,
          "mix": np.ones(n, np.float32), "id": np.arange(n)}


def _apply(aug, batch: dict, seed: int, rows: slice | None = None, global_batch: int = 8):
  rows = rows or slice(0, global_batch)
  part = {k: v[rows] for k, v in batch.items()}
  return aug(part, np.random.default_rng(seed), rows, global_batch)


ALL_ON = {"crop_scale": (0.2, 1.0), "flip": True, "mixup_alpha": 0.4, "cutmix_alpha": 1.0}


def test_augment_config():
  assert augment.from_config(_augment_config()) is None
  assert augment.from_config(_augment_config(mixup_alpha=1.0, mix_prob=0.0)) is None
  aug = augment.from_config(_augment_config(**ALL_ON))
  assert aug.crops and aug.flip and aug.mixes
  for key, value in [("crop_scale", (0.0, 1.0)), ("crop_scale", (0.5, 0.2)),
                     ("crop_ratio", (1.0,)), ("mixup_alpha", -1.0), ("mix_prob", 1.5),
                     ("switch_prob", -0.1)]:
    with pytest.raises(ConfigError, match=f"config.data.augment.{key}="):
      ftjax_config.validate(with_overrides(ftjax_config.defaults(),
                                           **{f"data.augment.{key}": value}))


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_augment_reproducible_and_host_independent(switch_prob):
  aug = augment.from_config(_augment_config(switch_prob=switch_prob, **ALL_ON))
  batch = _batch()
  one = _apply(aug, batch, seed=5)
  again = _apply(aug, batch, seed=5)
  other = _apply(aug, batch, seed=6)
  for key in ("image", "label_mix", "mix"):
    np.testing.assert_array_equal(one[key], again[key])
  assert not np.array_equal(one["image"], other["image"])
  hosts = [_apply(aug, batch, seed=5, rows=rows) for rows in (slice(0, 4), slice(4, 8))]
  for key in ("image", "label", "label_mix", "mix", "id"):
    np.testing.assert_allclose(np.concatenate([h[key] for h in hosts]), one[key], atol=1e-6)


def test_mixup_is_a_convex_combination_of_pairs():
  aug = augment.from_config(_augment_config(mixup_alpha=1.0))
  batch = _batch()
  out = _apply(aug, batch, seed=0)
  lam = out["mix"][0]
  assert 0.0 <= lam <= 1.0 and np.all(out["mix"] == lam) and out["mix"].dtype == np.float32
  partner = np.arange(8) ^ 1
  np.testing.assert_array_equal(out["label_mix"], batch["label"][partner])
  np.testing.assert_array_equal(out["label"], batch["label"])
  np.testing.assert_allclose(out["image"],
                             lam * batch["image"] + (1 - lam) * batch["image"][partner],
                             atol=1e-6)


def test_cutmix_area_matches_mix():
  aug = augment.from_config(_augment_config(cutmix_alpha=1.0))
  batch = _batch(size=32)
  # Each image a constant of its own, so every pixel shows where it came from.
  batch["image"] = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None, None],
                                   (8, 32, 32, 3)).copy()
  for seed in range(5):
    out = _apply(aug, batch, seed=seed)
    pasted = (out["image"][..., 0] == (np.arange(8) ^ 1)[:, None, None]).mean(axis=(1, 2))
    np.testing.assert_allclose(1 - pasted, out["mix"], atol=1e-6)
    np.testing.assert_array_equal(out["label_mix"], batch["label"][np.arange(8) ^ 1])


def test_mix_prob_zero_batch_and_odd_host_batch():
  aug = augment.Augment(mixup_alpha=1.0, mix_prob=1e-9)
  out = _apply(aug, _batch(), seed=0)
  np.testing.assert_array_equal(out["mix"], np.ones(8))
  np.testing.assert_array_equal(out["image"], _batch()["image"])
  with pytest.raises(ConfigError, match="even"):
    _apply(aug, _batch(6), seed=0, rows=slice(0, 3), global_batch=6)


def test_flip_really_flips():
  aug = augment.from_config(_augment_config(flip=True))
  batch = _batch(16)
  out = _apply(aug, batch, seed=1, global_batch=16)
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out["image"], batch["image"])]
  kept = [np.array_equal(o, x) for o, x in zip(out["image"], batch["image"])]
  assert all(f != k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_crop_keeps_size_and_zooms():
  aug = augment.from_config(_augment_config(crop_scale=(0.1, 0.3)))
  batch = _batch(size=24)
  out = _apply(aug, batch, seed=2)
  assert out["image"].shape == (8, 24, 24, 3) and out["image"].dtype == np.float32
  assert not np.allclose(out["image"], batch["image"])
  # A crop of a smooth ramp is a steeper ramp: zooming in spreads neighbours apart.
  ramp = np.broadcast_to(np.arange(24, dtype=np.float32)[None, None, :, None], (8, 24, 24, 3))
  zoomed = _apply(aug, dict(batch, image=ramp.copy()), seed=2)["image"]
  assert np.all(np.ptp(zoomed[:, 12, :, 0], axis=1) < 23)
  np.testing.assert_array_equal(_apply(aug, batch, seed=2)["image"], out["image"])

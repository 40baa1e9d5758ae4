"""Labelled images from the user's own files: class folders and tables of image paths."""

import io
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from configs import mobilenet_fashion
from conftest import ONE_DEVICE, with_overrides
from ftjax import metrics, trainer
from ftjax.data import file_images, images, sources
from ftjax.errors import DataError

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}


def _photos(folder, count=10, seed=0):
  """`count` noisy images of each colour, of random sizes, as PNG and JPEG files in
  folder/<colour>/; returns the folder."""
  rng = np.random.default_rng(seed)
  for name, colour in COLOURS.items():
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i in range(count):
      height, width = rng.integers(12, 40, 2)
      pixels = np.clip(np.array(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(
          os.path.join(folder, name, f"{i}.{'png' if i % 2 else 'jpg'}"))
  return str(folder)


def _load(tmp_path, fmt, train, test=(), columns=None):
  columns = columns or {"image": "image", "label": "label"}
  config = file_images.config_for(fmt, [[train], [], list(test)], columns, (), (0.8, 0.1, 0.1))
  splits, info = sources.load_file_splits(file_images.FileImages, config,
                                          str(tmp_path / "tfds"))
  return splits, tuple(info.features["label"].names)


def _examples(split):
  return sorted((split[i]["image"], int(split[i]["label"])) for i in range(len(split)))


def test_a_folder_of_class_folders_and_a_table_of_paths_give_the_same_images(tmp_path):
  folder = _photos(tmp_path / "photos")
  splits, names = _load(tmp_path, "imagefolder", folder)
  assert names == ("blue", "green", "red")
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [24, 3, 3]
  assert [int(splits["validation"][i]["label"]) for i in range(3)] == [0, 1, 2]  # stratified
  table = tmp_path / "photos" / "labels.jsonl"  # paths relative to the table's folder
  with open(table, "w") as f:
    for name in COLOURS:
      for file in sorted(os.listdir(os.path.join(folder, name))):
        f.write(json.dumps({"file": f"{name}/{file}", "colour": name}) + "\n")
  from_table, table_names = _load(tmp_path / "table", "json", str(table),
                                  columns={"image": "file", "label": "colour"})
  assert table_names == names
  for split in splits:
    assert _examples(from_table[split]) == _examples(splits[split])


def test_a_datasets_folder_of_image_features_gives_the_same_images(tmp_path):
  folder = _photos(tmp_path / "photos")
  reference, _ = _load(tmp_path, "imagefolder", folder)
  order = ["red", "green", "blue"]  # a ClassLabel's order, kept (not sorted)
  files = [(os.path.join(folder, name, file), name) for name in COLOURS
           for file in sorted(os.listdir(os.path.join(folder, name)))]
  features = datasets.Features({"img": datasets.Image(),
                                "colour": datasets.ClassLabel(names=order)})
  saved = str(tmp_path / "saved")
  datasets.Dataset.from_dict({"img": [path for path, _ in files],
                              "colour": [order.index(name) for _, name in files]},
                             features=features).save_to_disk(saved)
  splits, names = _load(tmp_path / "hf", "hf_disk", saved,
                        columns={"image": "img", "label": "colour"})
  assert names == tuple(order)
  relabel = {order.index(name): ("blue", "green", "red").index(name) for name in order}
  for split in splits:  # the same bytes, each with its own class, in the same splits
    assert sorted((image, relabel[label]) for image, label in _examples(splits[split])) == (
        _examples(reference[split]))
  # Parquet written with Image values that hold only a path (relative: to the table).
  table = os.path.join(folder, "images.parquet")
  pq.write_table(pa.Table.from_pylist([
      {"img": {"bytes": None, "path": os.path.relpath(path, folder)}, "label": name}
      for path, name in files]), table)
  from_paths, _ = _load(tmp_path / "pq", "parquet", table, columns={"image": "img",
                                                                     "label": "label"})
  for split in splits:
    assert _examples(from_paths[split]) == _examples(reference[split])


def test_images_of_any_size_are_decoded_and_resized_for_the_model(tmp_path):
  splits, _ = _load(tmp_path, "imagefolder", _photos(tmp_path / "photos"))
  batch = {key: np.asarray([splits["train"][i][key] for i in range(4)], dtype=object)
           for key in ("image", "label", "id")}
  batch["label"] = batch["label"].astype(np.int64)
  preprocess = images.image_classification_preprocess(16, 0.5, 0.25, 3, encoded=True)
  out = preprocess(batch)
  assert out["image"].shape == (4, 16, 16, 3)
  first = np.asarray(Image.open(io.BytesIO(batch["image"][0])).convert("RGB"))
  expected = (images.resize(first[None] / 255.0, 16)[0] - 0.5) / 0.25
  np.testing.assert_allclose(out["image"][0], expected, atol=1e-5)


@pytest.mark.parametrize("case, match", [
    ("not an image", r"red/broken.jpg is not an image Pillow can decode"),
    ("missing file", r"line 2: cannot read image .*absent.png"),
    ("missing column", r"line 2: no value in column 'label' \(config.data.columns.label\)"),
], ids=["not an image", "missing file", "missing column"])
def test_an_unreadable_image_or_row_names_the_file(tmp_path, case, match):
  folder = _photos(tmp_path / "photos", count=4)
  if case == "not an image":
    with open(os.path.join(folder, "red", "broken.jpg"), "w") as f:
      f.write("a text file with an image's name")
    with pytest.raises(DataError, match=match):
      _load(tmp_path, "imagefolder", folder)
    return
  table = tmp_path / "photos" / "table.jsonl"
  row = {"image": "absent.png", "label": "red"} if case == "missing file" else {
      "image": "red/0.jpg"}
  table.write_text(json.dumps({"image": "red/1.png", "label": "red"}) + "\n"
                   + json.dumps(row) + "\n")
  with pytest.raises(DataError, match=rf"{table}: {match}"):
    _load(tmp_path, "json", str(table))


def test_a_test_folder_with_an_unknown_class_is_refused(tmp_path):
  folder = _photos(tmp_path / "photos", count=6)
  test = _photos(tmp_path / "test", count=1)
  os.makedirs(tmp_path / "test" / "purple")
  Image.new("RGB", (8, 8), (128, 0, 128)).save(tmp_path / "test" / "purple" / "0.png")
  with pytest.raises(DataError, match=r"purple/0.png: test label 'purple' is not a class of "
                     r"the training data \['blue', 'green', 'red'\]"):
    _load(tmp_path, "imagefolder", folder, test=[test])


def test_mobilenet_fine_tunes_on_a_folder_of_class_folders(tmp_path):
  config = mobilenet_fashion.get_config("debug,data=imagefolder")
  config = with_overrides(config, **{"data.files.train": _photos(tmp_path / "photos", 30),
                                     "data.data_dir": str(tmp_path / "tfds")})
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert json.loads((tmp_path / "run" / "labels.json").read_text()) == {
      "names": ["blue", "green", "red"]}
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["num_classes"] == 3
  train = [r for r in metrics.read_metrics(tmp_path / "run") if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  assert final["test"]["count"] == 9

"""The data registry: presets as modules, names resolved to presets or files, file data
sets as tasks of a multi-task run and as extra evaluation sets."""

import csv
import json
import sys
import textwrap

import pytest

from conftest import ONE_DEVICE, with_overrides
from ftjax import trainer
from ftjax.data import inputs, presets, registry, sources
from ftjax.errors import ConfigError, DataError

# Tickets whose queue is named by a word of their own: separable in a few steps.
TICKETS = [{"body": f"Ticket {i}: my {word} has a problem, please help with the {word}.",
            "queue": queue}
           for i, (queue, word) in enumerate(
               [("billing", "invoice"), ("tech", "crash"), ("sales", "quote"),
                ("billing", "refund"), ("tech", "login"), ("sales", "pricing")] * 40)]


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, ["body", "queue"])
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def test_every_packaged_data_set_is_a_preset_module():
  found = registry.presets()
  assert sorted(found) == ["chat", "fashion_mnist", "mnist_digits", "rotten_tomatoes",
                           "shakespeare", "tweets"]
  assert {name: p.kind for name, p in found.items()} == {
      "chat": "chat", "fashion_mnist": "image", "mnist_digits": "image",
      "rotten_tomatoes": "classification", "shakespeare": "text", "tweets": "classification"}
  assert found["tweets"].class_names == ("negative", "neutral", "positive")
  assert sources.dataset_names() == sorted(found)


_COLOURS = '''
"""Colour words (a preset written by a test)."""
import tensorflow_datasets as tfds
from ftjax.data import registry, text_builder

LABEL_NAMES = ("warm", "cold")


class Colours(text_builder.TextClassificationBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Test data."}
  BUILDER_CONFIGS = [text_builder.local_builder.SourceConfig(name="default")]
  LABEL_NAMES = LABEL_NAMES

  def _read_examples(self, source_path):
    words = [("red", 0), ("orange", 0), ("blue", 1), ("teal", 1)]
    return [{"id": i, "text": f"{w} {i}", "label": c} for i, (w, c) in enumerate(words * 10)]


PRESET = registry.Preset("colours", "classification", Colours, "Colours read from {path}",
                         class_names=LABEL_NAMES)
'''


@pytest.fixture
def colours_preset(tmp_path, monkeypatch):
  """A preset module in a folder of the presets package, as adding one file would make."""
  folder = tmp_path / "more_presets"
  folder.mkdir()
  (folder / "colours.py").write_text(textwrap.dedent(_COLOURS))
  monkeypatch.setattr(presets, "__path__", [*presets.__path__, str(folder)])
  registry.presets.cache_clear()
  yield
  registry.presets.cache_clear()
  sys.modules.pop("ftjax.data.presets.colours", None)


def test_a_new_preset_is_one_file(colours_preset, tmp_path, debug_config):
  assert "colours" in registry.presets()
  config = with_overrides(debug_config, **{"data.name": "colours", "model.num_classes": 0,
                                           "data.data_dir": str(tmp_path / "tfds")})
  built = inputs.build(config)
  assert built.class_names == ("warm", "cold")
  assert sum(len(built.splits[s]) for s in ("train", "validation", "test")) == 40
  assert inputs.with_class_count(config, built).model.num_classes == 2
  # ... and a task of a multi-task run, its classes known without reading it.
  two = with_overrides(config, **{"data.name": "colours+tweets"})
  assert registry.preset_class_counts(two) == [("colours", 2), ("tweets", 3)]


def test_names_resolve_to_presets_formats_and_files(debug_config):
  config = with_overrides(debug_config, **{"data.files.train": "t.csv",
                                           "data.files.test": "u.csv"})
  assert registry.resolve("tweets", config).preset is registry.presets()["tweets"]
  bare = registry.resolve("csv", config)
  assert (bare.name, bare.format, bare.files, bare.own_classes) == (
      "csv", "csv", ("t.csv", "", "u.csv"), False)
  named = registry.resolve("json:/data/tickets.jsonl.gz, /data/more.jsonl", config)
  assert (named.name, named.format, named.files, named.own_classes) == (
      "tickets", "json", ("/data/tickets.jsonl.gz, /data/more.jsonl", "", ""), True)
  assert registry.data_set_name("hf_disk:/data/sst2/") == "sst2"
  with pytest.raises(ConfigError, match=r"config.data.name='imdb': unknown data set; known: "
                     r"\['chat', .*'tweets'\], a file format \['csv', 'tsv', 'json', "
                     r"'parquet', 'hf_disk', 'imagefolder'\] \(reading config.data.files\), "
                     r"or '<format>:<files>'"):
    registry.resolve("imdb", config)
  missing = with_overrides(config, **{"data.name": "csv:/nonexistent/tickets.csv+tweets"})
  with pytest.raises(DataError, match=r"^data set 'csv:/nonexistent/tickets.csv'="
                     r"'/nonexistent/tickets.csv': /nonexistent/tickets.csv: file not found"):
    inputs.build(missing)
  with pytest.raises(ConfigError, match=r"only one task can read config.data.files"):
    registry.check(with_overrides(config, **{"data.name": "csv+json"}))
  with pytest.raises(ConfigError, match=r"'shakespeare' cannot be a task of a multi-task run"):
    registry.check(with_overrides(config, **{"data.name": "tweets+shakespeare"}))


def test_a_file_is_a_task_of_a_multi_task_run(tmp_path, debug_config, data_dir):
  tickets = _write_csv(tmp_path / "tickets.csv", TICKETS)
  config = with_overrides(debug_config, **{
      "data.name": f"tweets+csv:{tickets}", "model.num_classes": 0,
      "data.columns.text": "body", "data.columns.label": "queue", "data.data_dir": data_dir,
      "data.mixing": "weights", "data.weights": (1.0, 3.0), "total_steps": 24})
  assert registry.preset_class_counts(config) == []  # known only from the data
  built = inputs.build(config)
  assert built.task_classes == (("tweets", 3), ("tickets", 3))
  assert built.class_names == ("tweets/negative", "tweets/neutral", "tweets/positive",
                               "tickets/billing", "tickets/sales", "tickets/tech")
  assert set(built.batch_spec) == {"input_ids", "token_type_ids", "attention_mask", "label",
                                   "task", "mask"}
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["model"]["num_classes"] == 6
  with open(tmp_path / "run" / "labels.json") as f:
    assert json.load(f)["names"] == list(built.class_names)
  test = final["test"]
  assert test["tickets/count"] == 24 and test["tweets/count"] == 128
  assert test["tickets/accuracy"] > 0.6  # chance: 1/3
  with pytest.raises(ConfigError, match=r"config.model.num_classes=5: the data has 6 classes"):
    inputs.with_class_count(with_overrides(config, **{"model.num_classes": 5}), built)


def test_a_file_is_an_extra_evaluation_set(tmp_path, debug_config):
  tickets = _write_csv(tmp_path / "tickets.csv", TICKETS)
  heldout = _write_csv(tmp_path / "heldout.csv", [
      {"body": f"Urgent {i}: the {word} again, please help with the {word}.", "queue": queue}
      for i, (queue, word) in enumerate([("tech", "crash"), ("billing", "invoice"),
                                          ("sales", "quote")] * 5)])
  config = with_overrides(debug_config, **{
      "data.name": "csv", "model.num_classes": 0, "data.files.train": tickets,
      "data.columns.text": "body", "data.columns.label": "queue",
      "data.data_dir": str(tmp_path / "tfds"), "data.extra_eval": (f"csv:{heldout}",),
      "total_steps": 24})
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert final["extra_eval"]["heldout"]["count"] == 15  # every row of the file
  assert final["extra_eval"]["heldout"]["accuracy"] > 0.6  # chance: 1/3
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    splits = {json.loads(line)["split"] for line in f}
  assert "heldout" in splits

  stranger = _write_csv(tmp_path / "stranger.csv", [{"body": "where is my parcel",
                                                     "queue": "shipping"}])
  with pytest.raises(DataError, match=rf"{stranger}: row 2 \(line 2\): label 'shipping' is "
                     r"not one of the classes \['billing', 'sales', 'tech'\]"):
    inputs.build_extra_evals(
        with_overrides(config, **{"data.extra_eval": (f"csv:{stranger}",)}),
        inputs.build(config))
  with pytest.raises(ConfigError, match=r"'json' would read config.data.files, the run's own "
                     r"data"):
    inputs.build_extra_evals(with_overrides(config, **{"data.extra_eval": ("json",)}),
                             inputs.build(config))

"""Labelled texts from the user's own files: formats, columns, labels, splits, errors."""

import csv
import gzip
import json
import os
import subprocess
import sys
import tempfile

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ONE_DEVICE, REPO, with_overrides
from ftjax import trainer
from ftjax.data import check, file_classification, inputs, sources
from ftjax.data.tokenizer import load_tokenizer
from ftjax.errors import ConfigError, DataError
from ftjax.hub import assets

ROWS = [{"body": f"ticket {i} about {topic}", "queue": topic}
        for i, topic in enumerate(["billing", "tech", "sales", "tech", "billing"] * 12)]


def _write(path, fmt, rows, columns=("body", "queue")):
  """`rows` (dicts) in `fmt` at `path`."""
  if fmt in ("csv", "tsv"):
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, columns, delimiter="," if fmt == "csv" else "\t")
      writer.writeheader()
      writer.writerows(rows)
  elif fmt == "jsonl":
    with open(path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  elif fmt == "json":
    with open(path, "w") as f:
      json.dump(rows, f, indent=1)
  else:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
  return str(path)


def _load(tmp_path, fmt, train, validation=(), test=(), columns=None, labels=(),
          fractions=(0.8, 0.1, 0.1)):
  columns = columns or {"text": "body", "text_pair": "", "label": "queue"}
  config = file_classification.config_for(fmt, [list(train), list(validation), list(test)],
                                          columns, labels, fractions)
  splits, info = sources.load_file_splits(file_classification.FileClassification, config,
                                          str(tmp_path / "tfds"))
  return splits, tuple(info.features["label"].names)


def _examples(split):
  return [(split[i]["text"].decode(), int(split[i]["label"])) for i in range(len(split))]


@pytest.mark.parametrize("suffix, fmt", [("csv", "csv"), ("tsv", "tsv"), ("jsonl", "json"),
                                         ("json", "json"), ("parquet", "parquet"),
                                         ("csv.gz", "csv")])
def test_every_format_gives_the_same_splits(tmp_path, suffix, fmt):
  path = tmp_path / f"tickets.{suffix}"
  if suffix == "csv.gz":
    _write(tmp_path / "plain.csv", "csv", ROWS)
    with open(tmp_path / "plain.csv", "rb") as f, gzip.GzipFile(path, "wb", mtime=0) as out:
      out.write(f.read())
  else:
    _write(path, suffix, ROWS)
  splits, names = _load(tmp_path, fmt, [str(path)])
  assert names == ("billing", "sales", "tech")  # sorted: the documented order
  got = {split: _examples(source) for split, source in splits.items()}
  reference, _ = _load(tmp_path / "reference", "csv",
                       [_write(tmp_path / "reference.csv", "csv", ROWS)])
  assert got == {split: _examples(source) for split, source in reference.items()}
  # A stratified 80/10/10 split of 24 billing, 24 tech and 12 sales tickets (19/3/2,
  # 19/3/2 and 10/1/1: cut at the rounded cumulative fractions).
  assert [len(got[s]) for s in ("train", "validation", "test")] == [48, 7, 5]
  for split in got.values():
    assert len({text for text, _ in split}) == len(split)
  all_texts = sorted(text for split in got.values() for text, _ in split)
  assert all_texts == sorted(row["body"] for row in ROWS)
  train_labels = [label for _, label in got["train"]]
  assert np.bincount(train_labels).tolist() == [19, 10, 19]


def test_preparing_files_logs_no_config_warnings(tmp_path, caplog):
  caplog.set_level("WARNING")
  _load(tmp_path, "csv", [_write(tmp_path / "t.csv", "csv", ROWS)])
  _load(tmp_path, "csv", [str(tmp_path / "t.csv")])  # and reading the prepared copy
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]


def test_preparing_files_leaves_no_temporary_folders(tmp_path, monkeypatch):
  temporary = tmp_path / "tmp"
  temporary.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temporary))
  _load(tmp_path, "csv", [_write(tmp_path / "t.csv", "csv", ROWS)])
  assert not os.listdir(temporary)


def test_integer_labels_are_ordered_as_numbers_and_given_labels_are_kept(tmp_path):
  rows = [{"body": f"t{i}", "queue": str([2, 10, 1][i % 3])} for i in range(30)]
  path = _write(tmp_path / "ints.csv", "csv", rows)
  splits, names = _load(tmp_path, "csv", [path])
  assert names == ("1", "2", "10")
  text, label = _examples(splits["train"])[0]
  assert names[label] == dict((r["body"], r["queue"]) for r in rows)[text]
  _, given = _load(tmp_path, "csv", [path], labels=["10", "2", "1", "3"])
  assert given == ("10", "2", "1", "3")


def test_validation_and_test_files_are_used_and_their_labels_checked(tmp_path):
  train = _write(tmp_path / "train.jsonl", "jsonl", ROWS)
  validation = _write(tmp_path / "validation.jsonl", "jsonl", ROWS[:5])
  splits, names = _load(tmp_path, "json", [train], validation=[validation])
  assert _examples(splits["validation"]) == [(r["body"], names.index(r["queue"]))
                                             for r in ROWS[:5]]
  # Without a test file, the training file gives 8 of every 9 examples to train.
  assert len(splits["train"]) + len(splits["test"]) == 60 and 5 <= len(splits["test"]) <= 8
  bad = _write(tmp_path / "test.jsonl", "jsonl", ROWS[:3] + [{"body": "x", "queue": "hr"}])
  with pytest.raises(DataError, match=rf"{bad}: line 4: test label 'hr' is not a class of the "
                     r"training data \['billing', 'sales', 'tech'\]"):
    _load(tmp_path / "other", "json", [train], test=[bad])


def test_duplicate_texts_share_a_split_and_other_rows_do_not_move_them(tmp_path):
  rows = ROWS + [ROWS[0]] * 3
  splits, _ = _load(tmp_path, "csv", [_write(tmp_path / "dups.csv", "csv", rows)])
  where = [s for s, source in splits.items() for text, _ in _examples(source)
           if text == ROWS[0]["body"]]
  assert len(where) == 4 and len(set(where)) == 1
  moved, _ = _load(tmp_path / "more", "csv", [_write(tmp_path / "more.csv", "csv", ROWS[:-1])])
  before = {text: s for s, source in splits.items() for text, _ in _examples(source)}
  after = {text: s for s, source in moved.items() for text, _ in _examples(source)}
  changed = [t for t in after if after[t] != before[t]]
  assert len(changed) <= 3, changed  # only a class's cut points move


def test_sentence_pairs_are_encoded_as_two_segments(tmp_path):
  rows = [{"a": f"first {i}", "b": f"second {i}", "same": str(i % 2)} for i in range(20)]
  path = _write(tmp_path / "pairs.csv", "csv", rows, columns=("a", "b", "same"))
  splits, _ = _load(tmp_path, "csv", [path],
                    columns={"text": "a", "text_pair": "b", "label": "same"})
  example = splits["train"][0]
  assert example["text_pair"].decode() == example["text"].decode().replace("first", "second")
  tokenizer = load_tokenizer(os.path.join(assets.model_dir("minilm-l6"), "tokenizer.json"), 16)
  encoded = tokenizer.encode(["first 0"], ["second 0"])
  words = encoded["input_ids"][0][encoded["attention_mask"][0] == 1]
  types = encoded["token_type_ids"][0][encoded["attention_mask"][0] == 1]
  assert [int(t) for t in types] == [0, 0, 0, 0, 1, 1, 1]  # [CLS] first 0 [SEP] second 0 [SEP]
  assert words[0] == 101 and words[3] == 102 and words[-1] == 102


@pytest.mark.parametrize("fmt, content, match", [
    ("json", '{"body": "ok", "queue": "a"}\n{"body": "broken\n', r"line 2: invalid JSON"),
    ("json", '{"body": "ok", "queue": "a"}\n["a", "list"]\n', r"line 2: a JSON list, not an "
     r"object"),
    ("json", '{"body": "ok", "queue": "a"}\n{"text": "x", "queue": "a"}\n',
     r"line 2: no value in column 'body' \(config.data.columns.text\); the row has columns "
     r"\['queue', 'text'\]"),
    ("json", '{"body": "   ", "queue": "a"}\n', r"line 1: column 'body': empty text"),
    ("json", '{"body": "ok", "queue": 1.5}\n', r"line 1: column 'queue': label 1.5 is not an "
     r"integer"),
    ("json", '{"body": "ok", "queue": [1]}\n', r"line 1: column 'queue': label \[1\] is a "
     r"list"),
    ("json", '[{"body": "ok", "queue": "a"}, 3]', r"item 2: a JSON int, not an object"),
    ("csv", 'body,queue\nok,a\n"stray" quote,a\n', r"row 3 \(line 3\): malformed CSV"),
    ("csv", 'body,queue\nok,a\ntoo,many,fields\n', r"row 3 \(line 3\): expected 2 fields "
     r"\(header \['body', 'queue'\]\), found 3"),
    ("csv", 'text,label\nok,a\n', r"row 2 \(line 2\): no value in column 'body'"),
    ("csv", b'body,queue\nok,a\nCaf\xe9,a\n', r"row 3 \(line 3\): bytes that are not valid "
     r"UTF-8"),
    ("json", b'{"body": "ok", "queue": "a"}\n{"body": "Caf\xe9", "queue": "a"}\n',
     r"line 2: bytes that are not valid UTF-8"),
    ("csv", "", r"file is empty"),
    ("parquet", b"PAR1 not really", r"not a readable Parquet file"),
], ids=["invalid json", "json list", "missing column", "empty text", "fractional label",
        "list label", "array item", "stray quote", "field count", "csv missing column",
        "latin-1 bytes", "latin-1 json", "empty file", "bad parquet"])
def test_a_malformed_file_names_the_file_row_and_column(tmp_path, fmt, content, match):
  path = tmp_path / f"bad.{fmt}"
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(DataError, match=rf"{path}: {match}"):
    _load(tmp_path, fmt, [str(path)])
  prepared = [root for root, _, _ in os.walk(tmp_path / "tfds") if root.endswith("1.0.0")]
  assert not prepared  # nothing prepared from the file


def test_files_settings_are_checked(tmp_path, debug_config):
  config = with_overrides(debug_config, **{"data.name": "csv", "model.num_classes": 0})
  with pytest.raises(ConfigError, match=r"config.data.name='csv' reads files: set "
                     r"config.data.files.train"):
    inputs.build(config)
  with pytest.raises(DataError, match=r"config.data.files.train='/nonexistent/\*.csv': "
                     r"'/nonexistent/\*.csv' matches no file"):
    inputs.build(with_overrides(config, **{"data.files.train": "/nonexistent/*.csv"}))
  path = _write(tmp_path / "t.csv", "csv", ROWS)
  three = with_overrides(config, **{"data.files.train": path, "data.columns.text": "body",
                                    "data.columns.label": "queue",
                                    "data.data_dir": str(tmp_path / "tfds")})
  built = inputs.build(three)
  assert inputs.with_class_count(three, built).model.num_classes == 3
  with pytest.raises(ConfigError, match=r"config.model.num_classes=2: the data has 3 classes "
                     r"\['billing', 'sales', 'tech'\]; set it to 3, or to 0"):
    inputs.with_class_count(with_overrides(three, **{"model.num_classes": 2}), built)


def _write_preset_as_csv(splits, folder):
  """Each split of a prepared preset as a CSV file of (text, integer label), in order."""
  paths = {}
  for name, split in splits.items():
    paths[name] = os.path.join(folder, f"{name}.csv")
    with open(paths[name], "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["text", "label"])
      for i in range(len(split)):
        writer.writerow([split[i]["text"].decode(), int(split[i]["label"])])
  return paths


def test_the_preset_written_as_csv_files_trains_to_the_same_metrics(tmp_path, debug_config,
                                                                     data_dir):
  paths = _write_preset_as_csv(sources.load_splits("rotten_tomatoes", data_dir), tmp_path)
  files = with_overrides(debug_config, **{
      "data.name": "csv", "model.num_classes": 0, "data.files.train": paths["train"],
      "data.files.validation": paths["validation"], "data.files.test": paths["test"],
      "data.data_dir": str(tmp_path / "tfds")})
  preset = trainer.run(debug_config, str(tmp_path / "preset"), devices=ONE_DEVICE)
  from_files = trainer.run(files, str(tmp_path / "files"), devices=ONE_DEVICE)
  for final in (preset, from_files):
    del final["train_seconds"]
  assert from_files == preset
  with open(tmp_path / "preset" / "metrics.jsonl") as a, open(
      tmp_path / "files" / "metrics.jsonl") as b:
    assert a.read() == b.read()
  with open(tmp_path / "files" / "labels.json") as f:
    assert json.load(f) == {"names": ["0", "1"]}


def test_own_tickets_train_through_the_launcher(tmp_path):
  rows = [{"body": f"Ticket {i}: my {word} has a problem, please help with the {word}.",
           "queue": queue}
          for i, (queue, word) in enumerate(
              [("billing", "invoice"), ("tech", "crash"), ("sales", "quote"),
               ("billing", "refund"), ("tech", "login"), ("sales", "pricing")] * 40)]
  path = _write(tmp_path / "tickets.csv", "csv", rows)
  workdir = tmp_path / "run"
  command = [sys.executable, os.path.join(REPO, "launch", "train.py"),
             "--config=configs/minilm_sentiment.py:debug,data=csv",
             f"--config.data.files.train={path}", "--config.data.columns.text=body",
             "--config.data.columns.label=queue",
             f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={workdir}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "labels.json") as f:
    assert json.load(f)["names"] == ["billing", "sales", "tech"]
  with open(workdir / "config.json") as f:
    assert json.load(f)["model"]["num_classes"] == 3
  with open(workdir / "final_metrics.json") as f:
    final = json.load(f)
  assert final["test"]["count"] == 24 and final["test"]["accuracy"] > 0.6  # chance: 1/3
  with open(workdir / check.CHECK_FILE) as f:
    saved = json.load(f)
  assert saved["splits"]["train"]["classes"] == {"billing": 64, "sales": 64, "tech": 64}
  assert "data check: csv (classification)" in result.stdout
  exported = subprocess.run([sys.executable, os.path.join(REPO, "launch", "export.py"),
                             f"--workdir={workdir}", f"--out={tmp_path / 'export'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert exported.returncode == 0, exported.stderr[-3000:]
  with open(tmp_path / "export" / "config.json") as f:
    assert json.load(f)["id2label"] == {"0": "billing", "1": "sales", "2": "tech"}

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"body": "fine", "queue": "tech"}\n{"body": "no label"}\n')
  command = [c.replace(path, str(bad)).replace("data=csv", "data=json") for c in command]
  command[-1] = f"--workdir={tmp_path / 'refused'}"
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {bad}: line 2: no value in column 'queue' (config.data.columns.label); the row "
      "has columns ['body']")
  assert not os.listdir(tmp_path / "refused")


def test_the_ahead_of_time_check_asks_for_the_class_count_of_file_data(debug_config):
  from launch import aot_check  # pylint: disable=g-import-not-at-top
  config = with_overrides(debug_config, **{"data.name": "csv", "data.files.train": "train.csv",
                                           "model.num_classes": 0})
  with pytest.raises(ConfigError, match=r"config.model.num_classes=0 takes the class count "
                     r"from the data, which this check does not read"):
    aot_check.check(config, "cpu:1", None)


def test_the_data_check_counts_classes_lengths_duplicates_and_overlap(tmp_path, debug_config):
  long_text = " ".join(["word"] * 40)
  train = ROWS + [{"body": ROWS[0]["body"], "queue": "sales"},  # a copy with another label
                  {"body": long_text, "queue": "tech"}]
  validation = ROWS[:2] + [{"body": "new ticket", "queue": "tech"}]  # 2 texts also in train
  config = with_overrides(debug_config, **{
      "data.name": "csv", "model.num_classes": 0, "data.columns.text": "body",
      "data.columns.label": "queue", "data.data_dir": str(tmp_path / "tfds"),
      "data.files.train": _write(tmp_path / "train.csv", "csv", train),
      "data.files.validation": _write(tmp_path / "validation.csv", "csv", validation),
      "data.files.test": _write(tmp_path / "test.csv", "csv", validation[2:])})
  built = inputs.build(config)
  report = check.check(config, built)
  assert report.splits["train"].classes == {"billing": 24, "sales": 13, "tech": 25}
  assert report.splits["train"].duplicates == 1 and report.splits["train"].conflicting == 1
  assert report.splits["train"].truncated == 1  # 42 tokens > max_length 32
  assert report.splits["train"].tokens["max"] == 42
  assert report.splits["validation"].in_train == 2
  assert report.warnings == [
      "train: 1 of 62 (1.6%) examples repeat an earlier text, 1 of them with another label",
      "train: 1 of 62 (1.6%) examples are longer than config.data.max_length=32 tokens and "
      "are truncated",
      "validation: 2 of 3 (66.7%) examples also occur in the train split",
      "validation: no examples of the classes ['sales']",
      "test: no examples of the classes ['billing', 'sales']"]
  table = report.table(built.class_names).splitlines()
  assert table[1].split() == ["split", "examples", "billing", "sales", "tech", "tokens",
                              "min/median/p95/max", "truncated", "duplicates", "also", "in",
                              "train"]
  assert table[2].split()[:5] == ["train", "62", "24", "13", "25"]


def test_check_data_prints_the_check_and_train_saves_it(tmp_path, data_dir):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "check_data.py"),
       "--config=configs/minilm_sentiment.py:debug", f"--config.data.data_dir={data_dir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  start = lines.index("data check: rotten_tomatoes (classification)")  # after preparation
  assert lines[start + 2].split()[:4] == ["train", "10,246", "4,324", "5,922"]
  assert "warning: train: 36 of 10,246 (0.4%) examples repeat an earlier text" in lines


def test_an_extra_evaluation_set_needs_the_run_s_classes(debug_config):
  config = with_overrides(debug_config, **{"data.extra_eval": ("tweets",)})
  with pytest.raises(ConfigError, match=r"config.data.extra_eval: 'tweets' has the classes "
                     r"\['negative', 'neutral', 'positive'\], the run's data \['rotten', "
                     r"'fresh'\]"):
    inputs.build_extra_evals(config, inputs.build(config))


def _save_to_disk(folder, splits, names=("pos", "neg")):
  """A DatasetDict saved by `datasets` with a ClassLabel column (names in that order)."""
  features = datasets.Features({"body": datasets.Value("string"),
                                "queue": datasets.ClassLabel(names=list(names))})
  datasets.DatasetDict({
      split: datasets.Dataset.from_dict({"body": [f"{split} text {i}" for i in range(n)],
                                         "queue": [i % 2 for i in range(n)]}, features=features)
      for split, n in splits.items()}).save_to_disk(str(folder))
  return str(folder)


def _files(train, validation="", test=""):
  return (train, validation, test)


def test_a_datasets_save_to_disk_folder_keeps_its_splits_and_class_label_order(tmp_path):
  folder = _save_to_disk(tmp_path / "saved", {"train": 40, "valid": 6, "test": 4})
  files = inputs._hf_disk_files(_files(folder))
  assert files == [[f"{folder}/train"], [f"{folder}/valid"], [f"{folder}/test"]]
  splits, names = _load(tmp_path, "hf_disk", *files)
  assert names == ("pos", "neg")  # the ClassLabel's order, not sorted
  assert _examples(splits["validation"]) == [(f"valid text {i}", i % 2) for i in range(6)]
  assert len(splits["train"]) == 40 and len(splits["test"]) == 4
  # A Dataset folder of its own, with the other splits cut from it.
  cut, _ = _load(tmp_path / "cut", "hf_disk", [f"{folder}/train"])
  assert [len(cut[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
  with pytest.raises(ConfigError, match=r"config.data.files.test='.*two': a DatasetDict "
                     r"without a test split \(it has \['train'\]\)"):
    inputs._hf_disk_files(_files(folder, test=_save_to_disk(tmp_path / "two", {"train": 4})))
  with pytest.raises(DataError, match=r"not a folder written by datasets' save_to_disk"):
    inputs._hf_disk_files(_files(str(tmp_path)))

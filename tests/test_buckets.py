"""Bucketed padding (`ftjax.data.buckets`): the lengths a setting gives, the cut, and that
a bucketed run evaluates and trains like one padded to max_length."""

import numpy as np
import pytest

from ftjax import trainer
from ftjax.data import buckets
from ftjax.errors import ConfigError

from conftest import assert_same_training, small_encoder_run, train_steps, with_overrides


@pytest.mark.parametrize("setting, max_length, expected", [
    ("auto", 64, (16, 32, 48, 64)),
    ("auto", 32, (8, 16, 24, 32)),
    ("auto", 20, (8, 16, 20)),
    ("auto", 512, (128, 256, 384, 512)),
    ("auto", 100, (32, 64, 96, 100)),
    ("off", 64, (64,)),
    ("48, 32,32", 64, (32, 48, 64)),
    ("64", 64, (64,)),
])
def test_lengths(setting, max_length, expected):
  assert buckets.lengths(setting, max_length) == expected


@pytest.mark.parametrize("setting", ["0,32", "80", "short", ""])
def test_bad_lengths_are_refused(setting):
  with pytest.raises(ConfigError, match="config.data.buckets"):
    buckets.lengths(setting, 64)


def test_a_batch_is_cut_to_the_shortest_bucket_holding_its_longest_row():
  mask = np.zeros((3, 16), np.int32)
  mask[0, :5], mask[1, :9], mask[2, :2] = 1, 1, 1
  batch = {"input_ids": mask * 7, "attention_mask": mask, "token_type_ids": 0 * mask,
           "label": np.arange(3), "mask": np.ones(3, bool)}
  cut = buckets.Bucketing((4, 8, 12, 16))(batch)
  assert {k: v.shape for k, v in cut.items()} == {
      "input_ids": (3, 12), "attention_mask": (3, 12), "token_type_ids": (3, 12),
      "label": (3,), "mask": (3,)}
  assert cut["attention_mask"].sum() == mask.sum()
  assert buckets.Bucketing((16,))(batch)["input_ids"].shape == (3, 16)
  # Packed language-model rows: the segment ids mark real tokens, wherever they stop.
  segments = np.zeros((2, 16), np.int32)
  segments[0, :3], segments[1, :6] = 1, 2
  rows = {"segment_ids": segments, "targets": segments, "mask": np.ones(2, bool)}
  assert buckets.Bucketing((4, 8, 16))(rows)["targets"].shape == (2, 8)
  images = {"image": np.zeros((2, 16, 16, 3)), "label": np.zeros(2)}
  assert buckets.Bucketing((4, 8, 16))(images)["image"].shape == (2, 16, 16, 3)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, data_dir):
  from configs import minilm_sentiment  # pylint: disable=g-import-not-at-top
  config = with_overrides(minilm_sentiment.get_config("debug"), **{"data.data_dir": data_dir})
  run = small_encoder_run(config, tmp_path_factory.mktemp("buckets"), **{
      "data.buckets": "24,32,48", "data.packing": "off"})
  yield run
  run.writer.close()
  run.checkpointer.close()


def test_bucketed_evaluation_equals_the_padded_one(small_run):
  run = small_run
  weights = (run.built.state.params, run.built.state.stats)
  bucketed = run.evaluate(weights, "validation")
  assert len(run.evaluate.step._compiled) > 1  # several buckets were used
  bucketing = run.data.layouts["eval"]
  run.data.layouts["eval"] = buckets.Bucketing((64,))  # every batch padded to max_length
  try:
    padded = run.evaluate(weights, "validation")
  finally:
    run.data.layouts["eval"] = bucketing
  assert bucketed.keys() == padded.keys() and bucketed["count"] == 128
  for key in padded:
    assert bucketed[key] == pytest.approx(padded[key], abs=1e-5), key


def test_bucketed_training_steps_equal_the_padded_ones(small_run):
  run = small_run
  iterator = run.data.train_iterator()
  batches = [next(iterator) for _ in range(4)]
  bucketing = run.data.layouts["train"]
  lengths = [buckets.batch_shape(bucketing(b))[1] for b in batches]
  assert min(lengths) < 64, lengths
  bucketed, padded = (train_steps(run, (trainer._put_batch(cut(batch), run.batch_sharding)
                                        for batch in batches))
                       for cut in (bucketing, lambda b: b))
  assert_same_training(bucketed, padded)

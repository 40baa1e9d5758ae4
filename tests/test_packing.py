"""Packed classification batches (`ftjax.data.packing`): the layout, the row counts, the
setting, and that a packed batch, evaluation and training equal the padded ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import models, tasks, trainer
from ftjax.data import packing
from ftjax.errors import ConfigError
from ftjax.models import bert, modernbert

from conftest import (ONE_DEVICE, assert_same_training, small_encoder_run, train_steps,
                      with_overrides)


def _batch(lengths, max_length=16, seed=0):
  """Texts of `lengths` tokens (0: a text masked out): distinct token ids, token types 1
  on each text's second half, label = the text's index."""
  rng = np.random.default_rng(seed)
  n = len(lengths)
  ids, types, mask = (np.zeros((n, max_length), np.int32) for _ in range(3))
  for i, length in enumerate(lengths):
    ids[i, :length] = rng.integers(5, 1000, length)
    mask[i, :length] = 1
    types[i, length // 2:length] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
          "label": np.arange(n, dtype=np.int32), "mask": np.asarray(lengths) > 0}


def _slot_of(packed, index):
  """(row, slot) of the text whose label is `index`."""
  rows, slots = np.nonzero(packed["mask"] & (packed["label"] == index))
  assert len(rows) == 1, (index, rows)
  return rows[0], slots[0]


def test_pack_lays_every_text_out_once_within_its_own_segment():
  lengths = [5, 9, 2, 16, 7, 0, 3]
  batch = _batch(lengths)
  packed = packing.pack(batch)
  # First-fit decreasing in rows of 16: [16], [9, 7], [5, 3, 2].
  assert packed["input_ids"].shape == (3, 16) and packed["label"].shape == (3, packing.SLOTS)
  assert packed["mask"].sum() == 6  # the masked-out text is left out
  for i, length in enumerate(lengths):
    if not length:
      continue
    r, s = _slot_of(packed, i)
    tokens = packed["segment_ids"][r] == s + 1
    assert tokens.sum() == length
    start = np.argmax(tokens)
    assert tokens[start:start + length].all()  # contiguous
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      np.testing.assert_array_equal(packed[key][r, start:start + length],
                                    batch[key][i, :length])
    np.testing.assert_array_equal(packed["positions"][r, start:start + length],
                                  np.arange(length))
  assert packed["attention_mask"].sum() == sum(lengths)
  np.testing.assert_array_equal(packed["segment_ids"] != 0, packed["attention_mask"] != 0)


def test_a_text_without_real_tokens_keeps_its_slot():
  batch = _batch([4, 3])
  batch["attention_mask"][1] = 0  # a text of padding only, but a real example
  packed = packing.pack(batch)
  assert packed["mask"].sum() == 2  # still counted, as in the padded batch
  r, s = _slot_of(packed, 1)
  assert not (packed["segment_ids"][r] == s + 1).any()  # and attends to nothing real


def test_a_row_holds_at_most_slots_texts_and_too_few_rows_are_refused():
  packed = packing.pack(_batch([1] * 40, max_length=64))
  assert packed["input_ids"].shape[0] == 3  # 40 one-token texts, 16 per row
  assert packed["mask"].sum() == 40
  assert packing.pack(_batch([4, 4, 4]), lambda _: 5)["input_ids"].shape == (5, 16)
  with pytest.raises(ValueError, match="need 2 rows"):
    packing.pack(_batch([10, 10]), lambda _: 1)


@pytest.mark.parametrize("batch_size, multiple, expected", [
    (32, 1, (4, 8, 12, 16, 20, 24, 28, 32)),
    (8, 1, (1, 2, 3, 4, 5, 6, 7, 8)),
    (8, 4, (4, 8)),
    (128, 1, tuple(range(16, 129, 16))),
    (12, 1, (2, 4, 6, 8, 10, 12)),
])
def test_row_counts(batch_size, multiple, expected):
  assert packing.Packing(batch_size, multiple).row_counts == expected


def test_row_counts_start_where_all_but_rare_batches_need_more():
  # Texts of 20 to 40 tokens in rows of 64: a batch of 32 needs about 16 rows, never 8.
  lengths = np.random.default_rng(0).integers(20, 41, 1000)
  fewest = packing.fewest_rows(lengths, 32, 64)
  assert 12 < fewest <= 16
  assert packing.Packing(32, fewest=fewest).row_counts == (16, 20, 24, 28, 32)
  assert packing.Packing(32, fewest=100).row_counts == (32,)
  # A batch needing fewer rows gets the smallest count.
  assert packing.Packing(32, fewest=fewest)(_batch([3] * 32, max_length=64))[
      "input_ids"].shape == (16, 64)


def test_a_batch_gets_the_fewest_rows_of_the_row_counts_that_hold_it():
  layout = packing.Packing(8, multiple=2)
  packed = layout(_batch([16, 16, 3, 0, 0, 0, 0, 0]))  # needs 3 rows
  assert packed["input_ids"].shape == (4, 16)
  assert not packed["attention_mask"][3].any() and not packed["mask"][3].any()


def test_packing_setting():
  assert packing.enabled("auto", "classification", "bert_classifier", True)
  assert not packing.enabled("off", "classification", "bert_classifier", True)
  assert not packing.enabled("auto", "classification", "deberta_classifier", False)
  assert models.READS_PACKED == {"bert_classifier", "modernbert_classifier"}
  assert not packing.enabled("auto", "chat", "llama_lm", False)
  with pytest.raises(ConfigError, match="'deberta_classifier' does not read packed"):
    packing.enabled("on", "classification", "deberta_classifier", False)
  with pytest.raises(ConfigError, match=r"chat data is not text classification \(language-model "
                     "rows are packed anyway\)"):
    packing.enabled("on", "chat", "llama_lm", False)
  with pytest.raises(ConfigError, match="image data is not text classification;"):
    packing.enabled("on", "image", "vit", False)
  with pytest.raises(ConfigError, match="config.data.packing='yes'"):
    packing.enabled("yes", "classification", "bert_classifier", True)


def test_packed_batch_spec():
  spec = {"input_ids": ((64,), np.int32), "attention_mask": ((64,), np.int32),
          "token_type_ids": ((64,), np.int32), "label": ((), np.int32),
          "task": ((), np.int32), "mask": ((), np.bool_)}
  packed = packing.batch_spec(spec)
  slots = (packing.SLOTS,)
  assert packed == {**spec, "label": (slots, np.int32), "task": (slots, np.int32),
                    "mask": (slots, np.bool_), "segment_ids": ((64,), np.int32),
                    "positions": ((64,), np.int32)}


def _check_packed_equals_padded(model, padded):
  """Each text's logits of `model` on `padded` packed equal its padded ones, and so do
  the gradients of a weighted sum of them."""
  graphdef, params = nnx.split(model)
  packed = packing.pack(padded)
  texts = len(padded["label"])
  assert packed["input_ids"].shape[0] < texts
  weights = jax.random.normal(jax.random.key(1), (texts, 3))
  rows, slots = (np.array(x) for x in zip(*[_slot_of(packed, i) for i in range(texts)]))

  def logits(params, batch):
    return nnx.merge(graphdef, params)(batch)

  def padded_loss(params):
    return (logits(params, padded) * weights).sum()

  def packed_loss(params):
    return (logits(params, packed)[rows, slots] * weights).sum()

  forward = jax.jit(logits)
  np.testing.assert_allclose(forward(params, packed)[rows, slots], forward(params, padded),
                             atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(packed_loss))(params)),
                  jax.tree.leaves(jax.jit(jax.grad(padded_loss))(params))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


_LENGTHS = [12, 3, 16, 7, 9, 5, 14, 2]


@pytest.mark.parametrize("model_type, pooling", [
    ("bert", "mean"), ("bert", "cls"), ("roberta", "mean"), ("distilbert", "cls")])
def test_each_text_of_a_packed_batch_gets_the_padded_logits_and_gradients(model_type,
                                                                          pooling):
  config = bert.BertConfig.from_dict(dict(
      model_type=model_type, vocab_size=1000, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
      pad_token_id=1))
  padded = _batch(_LENGTHS, max_length=16, seed=1)
  if model_type == "roberta":  # padding is pad_token_id, as RoBERTa's tokenizer pads
    padded["input_ids"] = np.where(padded["attention_mask"] == 1, padded["input_ids"], 1)
  _check_packed_equals_padded(bert.SequenceClassifier(
      config, num_classes=3, pooling=pooling, head_init="normal", rngs=nnx.Rngs(0)), padded)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_modernbert_gives_each_packed_text_its_padded_logits_and_gradients(pooling):
  # Global, local, global layers; a local token sees 2 positions either side, rotary
  # bases far apart: texts of up to 16 tokens meet the window and the rotation.
  config = modernbert.ModernBertConfig.from_dict(dict(
      vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=24, max_position_embeddings=64, global_attn_every_n_layers=2,
      local_attention=4, global_rope_theta=1000.0, local_rope_theta=10.0, pad_token_id=0,
      classifier_pooling=pooling, norm_bias=True, attention_bias=True, mlp_bias=True,
      classifier_bias=True))
  _check_packed_equals_padded(modernbert.SequenceClassifier(
      config, num_classes=3, head_init="normal", rngs=nnx.Rngs(0)),
      _batch(_LENGTHS, max_length=16, seed=1))


def test_a_multi_task_head_scores_slots_as_it_scores_rows():
  task = tasks._classification(5, (("a", 2), ("b", 3)))  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  task_ids = rng.integers(0, 2, (3, 4)).astype(np.int32)
  slots = {"label": np.where(task_ids == 0, rng.integers(0, 2, (3, 4)),
                             rng.integers(0, 3, (3, 4))).astype(np.int32),
           "task": task_ids, "mask": rng.random((3, 4)) < 0.7}
  logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  flat = {key: value.reshape(12) for key, value in slots.items()}
  for sums in (task.train_sums, task.eval_sums):
    by_slot, by_row = sums(logits, slots), sums(logits.reshape(12, 5), flat)
    for key in by_row:
      np.testing.assert_allclose(by_slot[key], by_row[key], rtol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """The same small run padded and packed."""
  from configs import minilm_sentiment  # pylint: disable=g-import-not-at-top
  config = with_overrides(minilm_sentiment.get_config("debug"), **{"data.data_dir": data_dir})
  built = {packed: small_encoder_run(config, tmp_path_factory.mktemp(packed), **{
      "data.packing": packed, "data.buckets": "off"}) for packed in ("off", "on")}
  yield built
  for run in built.values():
    run.writer.close()
    run.checkpointer.close()


def test_a_packed_evaluation_equals_the_padded_one(runs):
  results = {}
  for name, run in runs.items():
    results[name] = run.evaluate((run.built.state.params, run.built.state.stats), "validation")
  assert runs["on"].data.packed and not runs["off"].data.packed
  assert results["on"].keys() == results["off"].keys() and results["on"]["count"] == 128
  for key in results["off"]:
    assert results["on"][key] == pytest.approx(results["off"][key], abs=1e-5), key
  # Evaluation batches of 8 texts in fewer rows than 8.
  assert all(rows < 8 for rows, _ in runs["on"].evaluate.step._compiled)  # pylint: disable=protected-access


def test_packed_training_steps_equal_the_padded_ones(runs):
  iterator = runs["off"].data.train_iterator()
  batches = [next(iterator) for _ in range(4)]
  packed, padded = (train_steps(run, (run.data.put(batch, run.batch_sharding, "train")
                                      for batch in batches))
                     for run in (runs["on"], runs["off"]))
  assert_same_training(packed, padded)


def test_a_packed_step_on_two_devices_equals_one_device(runs, tmp_path, debug_config):
  one = runs["on"]
  two = small_encoder_run(debug_config, tmp_path, jax.devices()[:2], **{
      "data.packing": "on", "data.buckets": "off", "mesh.data": 2})
  try:
    assert all(rows % 2 == 0 for rows in two.data.layouts["train"].row_counts)  # a half each
    batch = next(one.data.train_iterator())
    results = []
    for run in (one, two):
      state = jax.tree.map(jnp.copy, run.built.state)
      state, metrics = run.train_step(state, run.built.frozen,
                                      run.data.put(batch, run.batch_sharding, "train"))
      results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  finally:
    two.writer.close()
    two.checkpointer.close()


def test_packed_micro_batches_equal_one_packed_batch(runs, tmp_path, debug_config):
  accumulated = small_encoder_run(debug_config, tmp_path, **{
      "data.packing": "on", "data.buckets": "off", "grad_accum_steps": 2})
  try:
    assert all(rows % 2 == 0 for rows in accumulated.data.layouts["train"].row_counts)
    iterator = runs["on"].data.train_iterator()
    batches = [next(iterator) for _ in range(2)]
    assert_same_training(*(train_steps(run, (run.data.put(b, run.batch_sharding, "train")
                                             for b in batches))
                           for run in (accumulated, runs["on"])))
  finally:
    accumulated.writer.close()
    accumulated.checkpointer.close()


def test_packing_on_is_refused_for_a_model_that_reads_one_text_per_row(debug_config,
                                                                       tmp_path):
  config = with_overrides(debug_config, **{"model.name": "deberta_classifier",
                                           "data.packing": "on"})
  with pytest.raises(ConfigError, match="'deberta_classifier' does not read packed batches"):
    trainer._Run(config, str(tmp_path), ONE_DEVICE)  # pylint: disable=protected-access

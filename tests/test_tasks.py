"""Task losses and metrics: causal-LM token loss with loss masks, through the train step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import minilm_sentiment
from ftjax import config as config_lib, models, optim, state as state_lib, step as step_lib, tasks
from ftjax.errors import ConfigError

ARCH = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
LM = tasks.get(ml_collections.ConfigDict({"task": "causal_lm", "loss_chunk": 1024}))


def _lm_batch(rows=4, length=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(rows, length + 1))
  loss_mask = np.ones((rows, length), bool)
  loss_mask[:, :3] = False  # e.g. a prompt: not scored
  loss_mask[1, 7:] = False  # a shorter example
  return {"input_ids": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(length), (rows, length)).astype(jnp.int32),
          "segment_ids": jnp.ones((rows, length), jnp.int32),
          "loss_mask": jnp.asarray(loss_mask), "mask": jnp.ones((rows,), bool)}


@pytest.fixture(scope="module")
def tiny_lm():
  config = ml_collections.ConfigDict(dict(name="llama_lm", pretrained="", arch=ARCH,
                                          dont_load=[], remat="none"))
  return models.create(config, seed=0)


def _optimizer():
  config = minilm_sentiment.get_config().optimizer
  config.unlock()
  config.lr, config.warmup_steps = 1e-2, 0
  return config


def _step(model, params, batch, **kwargs):
  tx, schedule = optim.make_optimizer(_optimizer(), params, 20)
  state = state_lib.create(jax.tree.map(jnp.asarray, params), tx, seed=0)
  step = jax.jit(lambda s, b: step_lib.train_step(s, {}, b, model=model, task=LM, tx=tx,
                                                  schedule=schedule, **kwargs))
  return state, step


def test_lm_loss_counts_only_masked_in_tokens(tiny_lm):
  model, params = tiny_lm
  batch = _lm_batch()
  outputs = model.apply(params, batch, train=False, features=True)
  sums = LM.train_sums(outputs, batch)
  assert float(sums["weight"]) == 4 * 7 - 3
  changed = dict(batch, targets=batch["targets"].at[:, :3].set(0).at[1, 7:].set(0))
  np.testing.assert_allclose(LM.train_sums(outputs, changed)["loss"], sums["loss"], rtol=1e-6)
  metrics = LM.summarize(jax.device_get(LM.eval_sums(outputs, batch)))
  assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
  assert metrics["loss"] == pytest.approx(math.log(64), rel=0.1)  # an untrained model


@pytest.mark.parametrize("chunk", [7, 16, 40])  # uneven, even, and one chunk for all
def test_chunked_loss_equals_full_logits_loss_and_gradient(tiny_lm, chunk):
  model, params = tiny_lm
  batch = _lm_batch()
  weights = batch["loss_mask"].astype(jnp.float32)

  def loss(p, chunked):
    if chunked:
      features = model.apply(p, batch, train=False, features=True)
      return tasks.chunked_token_sums(features.hidden, features.unembed, batch["targets"],
                                      weights, chunk)["loss"]
    logits = model.apply(p, batch, train=False)  # [B, L, V] at once
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (ce * weights).sum()

  (full, full_grad), (chunked, chunked_grad) = (jax.value_and_grad(loss)(params, c)
                                                for c in (False, True))
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked_grad), jax.tree.leaves(full_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_all_logits():
  """The compiled gradient holds no [tokens, vocab] float32 buffer when chunked."""
  tokens, hidden_size, vocab, chunk = 4096, 64, 8192, 512
  kernel = jnp.zeros((hidden_size, vocab))
  hidden = jnp.zeros((1, tokens, hidden_size))
  targets, weights = jnp.zeros((1, tokens), jnp.int32), jnp.ones((1, tokens))

  def peak_bytes(c):
    def loss(k, h):
      return tasks.chunked_token_sums(h, lambda x: x @ k, targets, weights, c)["loss"]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernel, hidden).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_logits, chunk_logits = tokens * vocab * 4, chunk * vocab * 4
  assert peak_bytes(0) >= full_logits  # measured: 2x (logits and their gradient)
  assert peak_bytes(chunk) <= 3 * chunk_logits  # measured: 2 chunks' worth, 1/4 of the above


def test_lm_train_step_learns_and_accumulates_like_one_batch(tiny_lm):
  model, params = tiny_lm
  batch = _lm_batch()
  state, step = _step(model, params, batch)
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  # Micro-batches hold different numbers of scored tokens; the sums still match.
  state1, one = _step(model, params, batch)
  state2, two = _step(model, params, batch, grad_accum_steps=2)
  (s1, m1), (s2, m2) = one(state1, batch), two(state2, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)  # Adam divides tiny gradient differences


def test_unknown_task_is_a_config_error():
  config = minilm_sentiment.get_config()
  config.unlock()
  config.task = "regression"
  with pytest.raises(ConfigError, match="config.task='regression': must be one of"):
    config_lib.validate(config)

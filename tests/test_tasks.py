"""Task losses and metrics: causal-LM token loss with loss masks, through the train step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import minilm_sentiment
import tiny_decoders
from ftjax import config as config_lib, fused_loss, models, optim, state as state_lib, step as step_lib, tasks
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
  return models.create(tiny_decoders.model_config(arch=ARCH), seed=0)


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


@pytest.fixture(scope="module")
def tied_lm():
  config = tiny_decoders.model_config(arch=dict(ARCH, tie_word_embeddings=True))
  return models.create(config, seed=1)


@pytest.mark.parametrize("chunk,loss_grad,tied", [  # uneven, even, one chunk for all
    (7, "fused", False), (16, "fused", True), (7, "recompute", True), (40, "fused", True)])
def test_lm_task_loss_and_gradient_equal_full_logits(tiny_lm, tied_lm, tied, loss_grad, chunk):
  """Through the task: head and hidden-state gradients (embedding too when tied)."""
  model, params = tied_lm if tied else tiny_lm
  assert ("lm_head" in params) != tied
  task = tasks.get(ml_collections.ConfigDict(
      {"task": "causal_lm", "loss_chunk": chunk, "loss_grad": loss_grad}))
  batch = _lm_batch(seed=chunk)
  weights = batch["loss_mask"].astype(jnp.float32)

  def loss(p, chunked):
    if chunked:
      sums = task.train_sums(model.apply(p, batch, train=False, features=True), batch)
      return sums["loss"], sums
    logits = model.apply(p, batch, train=False)  # [B, L, V] at once
    sums = tasks._token_sums(logits, batch["targets"], weights)
    return sums["loss"], sums

  (_, want), want_grad = jax.value_and_grad(loss, has_aux=True)(params, False)
  (_, got), got_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, True)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _head_inputs(dtype, tokens=(3, 13), hidden_size=16, vocab=96, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(keys[0], (*tokens, hidden_size)).astype(dtype)
  kernel = (0.3 * jax.random.normal(keys[1], (hidden_size, vocab))).astype(dtype)
  targets = jax.random.randint(keys[2], tokens, 0, vocab)
  weights = (jax.random.uniform(keys[3], tokens) > 0.3).astype(jnp.float32)
  return hidden, kernel, targets, weights


def _reference(hidden, kernel, targets, weights, chunk):
  unembed = lambda h: (h @ kernel).astype(jnp.float32)
  return tasks.chunked_token_sums(hidden, unembed, targets, weights, chunk)


@pytest.mark.parametrize("dtype,tol,chunk", [(jnp.float32, 1e-5, 5), (jnp.float32, 1e-5, 16),
                                             (jnp.bfloat16, 2e-2, 5)])
def test_fused_loss_matches_reference(dtype, tol, chunk):
  """Sums and the gradients for hidden states, kernel and weights, any cotangent."""
  hidden, kernel, targets, weights = _head_inputs(dtype)

  def objective(fn, *args):  # every output sum gets a cotangent
    sums = fn(*args, targets, weights, chunk) if fn is _reference else fn(
        args[0], args[1], targets, args[2], chunk)
    return 0.5 * sums["loss"] + 0.25 * sums["accuracy"] + 2.0 * sums["weight"], sums

  def run(fn):
    if fn is _reference:
      return jax.value_and_grad(lambda h, k: objective(fn, h, k), argnums=(0, 1),
                                has_aux=True)(hidden, kernel)
    return jax.jit(jax.value_and_grad(lambda h, k, w: objective(fn, h, k, w),
                                      argnums=(0, 1, 2), has_aux=True))(hidden, kernel, weights)

  (_, want), want_grads = run(_reference)
  (_, got), got_grads = run(fused_loss.token_sums)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=tol)
  for a, b in zip(got_grads, want_grads):
    assert a.dtype == b.dtype == dtype
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=tol * scale)
  # d(objective)/dweights = 0.5 * per-token loss + 0.25 * correct + 2.
  logits = (hidden @ kernel).astype(jnp.float32)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = jnp.argmax(logits, -1) == targets
  np.testing.assert_allclose(got_grads[2], 0.5 * per_token + 0.25 * correct + 2.0,
                             rtol=tol, atol=tol)


def _flops(fn, argnums, hidden, kernel):
  # The loss too: a train step reports it, so its forward pass is not dead code.
  compiled = jax.jit(jax.value_and_grad(lambda h, k: fn(h, k)["loss"], argnums)).lower(
      hidden, kernel).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_fused_loss_skips_the_logits_recomputation():
  """Compiled FLOPs per chunk: 3 head matmuls instead of 4, 2 instead of 3 for a frozen
  head or a frozen body (no hidden-state gradient). (XLA's cost analysis counts a loop's
  body once, so one chunk's worth.)"""
  tokens, hidden_size, vocab, chunk = 1024, 64, 4096, 256
  hidden, kernel, targets, weights = _head_inputs(jnp.float32, (2, tokens // 2), hidden_size,
                                                  vocab)
  chunk_matmul = 2 * chunk * hidden_size * vocab
  fused = lambda h, k: fused_loss.token_sums(h, k, targets, weights, chunk)
  recompute = lambda h, k: _reference(h, k, targets, weights, chunk)
  for argnums, (want_fused, want_recompute) in (((0, 1), (3, 4)), (0, (2, 3)), (1, (2, 3))):
    got_fused = _flops(fused, argnums, hidden, kernel) / chunk_matmul
    got_recompute = _flops(recompute, argnums, hidden, kernel) / chunk_matmul
    # The rest (softmax, exponentials, one-hot) is < 0.5 matmul at this shape.
    assert want_fused <= got_fused < want_fused + 0.5, (argnums, got_fused)
    assert want_recompute <= got_recompute < want_recompute + 0.5, (argnums, got_recompute)


def test_fused_loss_never_holds_all_logits():
  """The compiled gradient holds about a chunk of logits, plus the kernel's gradient."""
  tokens, hidden_size, vocab, chunk = 4096, 64, 8192, 512
  hidden, kernel, targets, weights = _head_inputs(jnp.float32, (1, tokens), hidden_size, vocab)
  loss = lambda k, h: fused_loss.token_sums(h, k, targets, weights, chunk)["loss"]
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernel, hidden).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  chunk_logits, kernel_bytes = chunk * vocab * 4, hidden_size * vocab * 4
  assert temp <= 4 * chunk_logits + 2 * kernel_bytes, temp / chunk_logits
  assert temp < tokens * vocab * 4 / 2


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

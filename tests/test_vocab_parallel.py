"""The vocabulary-parallel cross-entropy against `chunked_token_sums`, on 8 CPU devices,
with its gradients fused into the forward pass and recomputed.

Tolerances (against the reference computed in the same dtype):
  * float32 sums: 1e-5 relative + 1e-4 absolute (loss sums are a few hundred);
  * float32 gradients: 1e-5 relative + 1e-5 absolute;
  * bfloat16 sums: 1e-2 relative + 1e-2 absolute;
  * bfloat16 gradients: 2e-2 relative + 2e-2 absolute (the kernel gradient is summed
    across batch shards in bfloat16, so it may differ from the reference by an ulp).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import tasks
from ftjax import vocab_parallel

AXES = ("data", "fsdp", "tensor")
SHAPES = [(1, 1, 8), (1, 4, 2), (2, 2, 2), (8, 1, 1)]
B, L, H, V = 8, 12, 16, 64


def _mesh(shape: tuple[int, int, int]) -> Mesh:
  return Mesh(np.asarray(jax.devices()).reshape(shape), AXES)


def _inputs(dtype: jnp.dtype = jnp.float32, seed: int = 0) -> tuple[jax.Array, ...]:
  keys = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(keys[0], (B, L, H), jnp.float32).astype(dtype)
  kernel = (jax.random.normal(keys[1], (H, V), jnp.float32) / 2).astype(dtype)
  targets = jax.random.randint(keys[2], (B, L), 0, V, jnp.int32)
  weights = (jax.random.uniform(keys[3], (B, L)) > 0.3).astype(jnp.float32)
  # Bias the targets toward each token's argmax so that accuracy is far from zero.
  logits = (hidden @ kernel).astype(jnp.float32)
  targets = jnp.where(jnp.arange(L) % 2 == 0, jnp.argmax(logits, -1), targets)
  return hidden, kernel, targets, weights.at[0, 3].set(2.5)


def _reference(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
               chunk: int) -> dict[str, jax.Array]:
  return tasks.chunked_token_sums(hidden, lambda h: (h @ kernel).astype(jnp.float32),
                                  targets, weights, chunk)


def _place(mesh: Mesh, hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
           weights: jax.Array) -> tuple[jax.Array, ...]:
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  vocab = NamedSharding(mesh, P(None, "tensor"))
  return (jax.device_put(hidden, batch), jax.device_put(kernel, vocab),
          jax.device_put(targets, batch), jax.device_put(weights, batch))


def _loss_and_grads(fn: Callable[..., dict[str, jax.Array]], hidden: jax.Array,
                    kernel: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple:
  """((d loss / d hidden, d loss / d kernel), sums), under jax.jit."""
  def loss(h, k):
    sums = fn(h, k, targets, weights)
    return sums["loss"], sums
  return jax.jit(jax.grad(loss, (0, 1), has_aux=True))(hidden, kernel)


def _assert_sums(got: dict[str, jax.Array], want: dict[str, jax.Array], rtol: float = 1e-5,
                 atol: float = 1e-4) -> None:
  assert set(got) == {"loss", "accuracy", "weight"}
  for key in want:
    assert got[key].shape == () and got[key].dtype == jnp.float32, key
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=rtol,
                               atol=atol, err_msg=key)


GRADS = ["fused", "recompute"]


@pytest.mark.parametrize("loss_grad", GRADS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [10, 1024])  # 10 divides no local token count (96, 24, 12)
def test_sums_and_grads_match_reference(shape, chunk, loss_grad):
  mesh = _mesh(shape)
  inputs = _inputs()
  (want_h, want_k), want = _loss_and_grads(lambda *a: _reference(*a, chunk), *inputs)
  sharded = _place(mesh, *inputs)
  fn = lambda *a: vocab_parallel.token_sums(*a, mesh=mesh, chunk=chunk, loss_grad=loss_grad)
  (got_h, got_k), got = _loss_and_grads(fn, *sharded)

  assert float(want["accuracy"]) > 0
  _assert_sums(got, want)
  np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_k, want_k, rtol=1e-5, atol=1e-5)
  _assert_sums(jax.jit(fn)(*sharded), want)


def test_forward_without_jit_matches_reference():
  mesh = _mesh((2, 2, 2))
  inputs = _inputs(seed=1)
  _assert_sums(vocab_parallel.token_sums(*inputs, mesh=mesh, chunk=10),
               _reference(*inputs, 10))


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2)])
def test_accuracy_ties_go_to_the_first_index(shape):
  mesh = _mesh(shape)
  hidden, kernel, targets, weights = _inputs(seed=2)
  # A zero kernel: every logit ties, so the prediction is index 0 everywhere.
  zero = jnp.zeros_like(kernel)
  tied_targets = jnp.where(jnp.arange(L) % 3 == 0, 0, targets)
  want = _reference(hidden, zero, tied_targets, weights, 16)
  got = vocab_parallel.token_sums(hidden, zero, tied_targets, weights, mesh=mesh, chunk=16)
  _assert_sums(got, want)
  np.testing.assert_allclose(got["accuracy"], (weights * (tied_targets == 0)).sum())
  np.testing.assert_allclose(got["loss"], np.log(V) * weights.sum(), rtol=1e-5)

  # Duplicated halves: the maximum ties between column j and j + V / 2 on other shards.
  half = kernel[:, :V // 2]
  doubled = jnp.concatenate([half, half], axis=1)
  first = jnp.argmax(hidden @ half, -1)
  tied_targets = jnp.where(jnp.arange(L) % 2 == 0, first, first + V // 2)
  want = _reference(hidden, doubled, tied_targets, weights, 16)
  got = vocab_parallel.token_sums(hidden, doubled, tied_targets, weights, mesh=mesh, chunk=16)
  _assert_sums(got, want)
  np.testing.assert_allclose(got["accuracy"], (weights * (jnp.arange(L) % 2 == 0)).sum())


@pytest.mark.parametrize("loss_grad", GRADS)
@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_bfloat16_matches_reference(shape, loss_grad):
  mesh = _mesh(shape)
  inputs = _inputs(jnp.bfloat16, seed=3)
  (want_h, want_k), want = _loss_and_grads(lambda *a: _reference(*a, 16), *inputs)
  fn = lambda *a: vocab_parallel.token_sums(*a, mesh=mesh, chunk=16, loss_grad=loss_grad)
  (got_h, got_k), got = _loss_and_grads(fn, *_place(mesh, *inputs))
  assert got_h.dtype == jnp.bfloat16 and got_k.dtype == jnp.bfloat16
  _assert_sums(got, want, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(got_h, np.float32), np.asarray(want_h, np.float32),
                             rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_rejects_uneven_shapes():
  hidden, kernel, targets, weights = _inputs()
  with pytest.raises(ValueError, match=r"vocabulary size 60 .* 8 devices .*'tensor'"):
    vocab_parallel.token_sums(hidden, kernel[:, :60], targets, weights, mesh=_mesh((1, 1, 8)))
  with pytest.raises(ValueError, match=r"batch size 6 .* 4 devices"):
    vocab_parallel.token_sums(hidden[:6], kernel, targets[:6], weights[:6],
                              mesh=_mesh((2, 2, 2)))
  with pytest.raises(ValueError, match=r"'model' is not in the mesh axes"):
    vocab_parallel.token_sums(hidden, kernel, targets, weights, mesh=_mesh((2, 2, 2)),
                              vocab_axis="model")
  with pytest.raises(ValueError, match=r"loss_grad must be 'fused' or 'recompute', got 'fast'"):
    vocab_parallel.token_sums(hidden, kernel, targets, weights, mesh=_mesh((2, 2, 2)),
                              loss_grad="fast")


def test_applies():
  assert vocab_parallel.applies(_mesh((1, 4, 2)), "tensor", 64)
  assert vocab_parallel.applies(_mesh((1, 1, 8)), "tensor", 64)
  assert not vocab_parallel.applies(_mesh((1, 1, 8)), "tensor", 60)
  assert not vocab_parallel.applies(_mesh((8, 1, 1)), "tensor", 64)
  assert not vocab_parallel.applies(Mesh(np.asarray(jax.devices()), ("data",)), "tensor", 64)


def _avals(jaxpr: Any) -> list[Any]:
  """The abstract values of every variable in `jaxpr` and its nested jaxprs."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found = [v.aval for v in jaxpr.invars]
  for eqn in jaxpr.eqns:
    found += [v.aval for v in eqn.outvars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          found += _avals(sub)
  return found


@pytest.mark.parametrize("loss_grad", GRADS)
def test_gradient_never_holds_more_than_a_chunk_of_logits(loss_grad):
  mesh, chunk = _mesh((1, 1, 8)), 10
  hidden, kernel, targets, weights = _place(mesh, *_inputs())
  local_vocab = V // 8
  loss = lambda h, k: vocab_parallel.token_sums(h, k, targets, weights, mesh=mesh,
                                                chunk=chunk, loss_grad=loss_grad)["loss"]
  avals = _avals(jax.make_jaxpr(jax.grad(loss, (0, 1)))(hidden, kernel))
  # Logits-shaped values ([..., tokens, V_local]) never hold more than one chunk.
  logits = [a.shape for a in avals if len(getattr(a, "shape", ())) >= 2
            and a.shape[-1] == local_vocab and a.shape[-2] != H]
  assert (chunk, local_vocab) in logits
  assert all(np.prod(s) <= chunk * local_vocab for s in logits), logits



def _matmuls(jaxpr: Any) -> int:
  """The dot_generals in `jaxpr` and its nested jaxprs, each loop body counted once."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          count += _matmuls(sub)
  return count


@pytest.mark.parametrize("argnums, want", [((0, 1), {"fused": 3, "recompute": 4}),
                                           (0, {"fused": 2, "recompute": 3}),
                                           (1, {"fused": 2, "recompute": 3})])
def test_fused_gradient_skips_the_logits_recomputation(argnums, want):
  """Head matmuls per chunk in the gradient (every matmul here is one): the logits, the
  hidden states' and the kernel's gradients, and for recompute the logits again; no
  kernel gradient for a frozen head (argnums 0), no hidden-state gradient for a frozen
  body (argnums 1)."""
  mesh = _mesh((2, 1, 4))
  hidden, kernel, targets, weights = _place(mesh, *_inputs())
  for loss_grad, count in want.items():
    loss = lambda h, k: vocab_parallel.token_sums(h, k, targets, weights, mesh=mesh, chunk=10,
                                                  loss_grad=loss_grad)["loss"]
    grad = jax.value_and_grad(loss, argnums)
    assert _matmuls(jax.make_jaxpr(grad)(hidden, kernel)) == count, loss_grad


def test_fused_gradient_of_the_weights_and_of_every_sum():
  """Every output sum with a cotangent, and the token weights' gradient, as autodiff of
  the recomputed loss gives them."""
  mesh = _mesh((2, 2, 2))
  hidden, kernel, targets, weights = _place(mesh, *_inputs(seed=4))

  def gradients(loss_grad):
    def objective(h, k, w):
      sums = vocab_parallel.token_sums(h, k, targets, w, mesh=mesh, chunk=10,
                                       loss_grad=loss_grad)
      return 0.5 * sums["loss"] + 0.25 * sums["accuracy"] + 2.0 * sums["weight"]
    return jax.jit(jax.grad(objective, (0, 1, 2)))(hidden, kernel, weights)

  for got, want in zip(gradients("fused"), gradients("recompute")):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

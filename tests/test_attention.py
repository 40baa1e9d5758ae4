"""Attention kernels against the dense-mask reference: outputs and gradients.

The Pallas kernels run in interpret mode off their platform (exact, slow), so they are
checked on CPU too; cuDNN's needs an NVIDIA GPU.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import attention

_B, _L, _HEADS, _KV_HEADS, _D = 2, 32, 4, 2, 16
# Row 0 packs two examples (20 + 12 tokens); row 1 is one example and 8 padding tokens.
_PACKED = np.array([[1] * 20 + [2] * 12, [1] * 24 + [0] * 8], np.int32)
# One example per row, then padding: what cuDNN's sequence lengths express.
_PADDED = np.array([[1] * 32, [1] * 24 + [0] * 8], np.int32)


def _inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (_B, _L, _HEADS, _D))
  k = jax.random.normal(keys[1], (_B, _L, _KV_HEADS, _D))
  v = jax.random.normal(keys[2], (_B, _L, _KV_HEADS, _D))
  cotangent = jax.random.normal(keys[3], (_B, _L, _HEADS, _D))
  return q, k, v, cotangent


def _dense_mask(segment_ids, window):
  mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  if window is not None:
    slots = np.arange(_L)
    mask = mask & (slots[None, :] > slots[:, None] - window)[None, None]
  return jnp.asarray(mask)


def _inputs_for(segment_ids):
  """`_inputs` with no cotangent on padding tokens, whose outputs are never used (cuDNN,
  given padding as sequence lengths, computes none for them)."""
  q, k, v, cotangent = _inputs()
  return q, k, v, cotangent * (np.asarray(segment_ids) != 0)[:, :, None, None]


def _loss_and_output(implementation, segment_ids, cotangent, window, softcap, scale,
                     context=contextlib.nullcontext):
  """(q, k, v) -> (sum of the attention output times `cotangent`, the output), traced
  inside `context()`."""
  segments = jnp.asarray(segment_ids)

  def loss(q, k, v):
    with context():
      out = attention.attend(q, k, v, implementation=implementation,
                             mask=_dense_mask(segment_ids, window), segment_ids=segments,
                             window=window, scale=scale, softcap=softcap)
    return jnp.sum(out * cotangent), out

  return loss


def _outputs_and_gradients(implementation, segment_ids, window, softcap, scale=0.3):
  q, k, v, cotangent = _inputs_for(segment_ids)
  loss = _loss_and_output(implementation, segment_ids, cotangent, window, softcap, scale)
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  real = segment_ids != 0  # padding tokens' outputs are never used
  return np.asarray(out)[real], [np.asarray(g) for g in grads]


@pytest.mark.parametrize("implementation, window, softcap", [
    ("pallas", None, None),
    ("splash", None, None),
    ("splash", 5, 2.0),  # a sliding window and soft-capped scores
])
def test_pallas_kernels_equal_the_reference_on_packed_rows(implementation, window, softcap):
  out, grads = _outputs_and_gradients(implementation, _PACKED, window, softcap)
  ref_out, ref_grads = _outputs_and_gradients("xla", _PACKED, window, softcap)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=2e-5, rtol=0)
  # The packed examples really are kept apart: without segments the reference differs.
  one_segment = np.where(_PACKED != 0, 1, 0)
  assert np.max(np.abs(_outputs_and_gradients("xla", one_segment, window, softcap)[0]
                       - ref_out)) > 1e-2


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason=f"cuDNN attention runs on NVIDIA GPUs; this platform is "
                    f"{jax.default_backend()}")
@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_equals_the_reference_on_padded_rows(window):
  out, grads = _outputs_and_gradients("cudnn", _PADDED, window, None)
  ref_out, ref_grads = _outputs_and_gradients("xla", _PADDED, window, None)
  np.testing.assert_allclose(out, ref_out, atol=2e-3, rtol=0)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=2e-3, rtol=0)


def test_auto_picks_an_exact_kernel_for_the_platform_and_the_layer():
  choose = attention.choose
  assert choose("auto", platform="cpu", window=None, softcap=None, packed=True) == "xla"
  assert choose("auto", platform="tpu", window=4, softcap=50.0, packed=True) == "splash"
  assert choose("auto", platform="gpu", window=None, softcap=None, packed=False) == "cudnn"
  assert choose("auto", platform="gpu", window=None, softcap=None, packed=True) == "pallas"
  # Neither GPU kernel caps scores; packed rows with a window have no GPU kernel either.
  assert choose("auto", platform="gpu", window=None, softcap=50.0, packed=False) == "xla"
  assert choose("auto", platform="gpu", window=4, softcap=None, packed=True) == "xla"
  assert choose("pallas", platform="cpu", window=None, softcap=None, packed=True) == "pallas"
  assert "packed" in attention.unsupported("cudnn", window=None, softcap=None, packed=True)
  assert "window" in attention.unsupported("pallas", window=4, softcap=None, packed=True)


def _tiny_decoder(model=None, **fields):
  """A random two-layer decoder of `fields` (Hugging Face names), its `config.model`
  changed by `model`."""
  from ftjax import models  # pylint: disable=g-import-not-at-top
  import tiny_decoders  # pylint: disable=g-import-not-at-top
  arch = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              **fields)
  return models.create(tiny_decoders.model_config(arch=arch, **(model or {})), seed=0)


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_a_decoder_with_a_kernel_computes_the_xla_logits_on_packed_rows(kernel):
  model, params = _tiny_decoder()
  kernel_model, _ = _tiny_decoder(model=dict(attention=kernel))
  assert {layer.self_attn.implementation for layer in kernel_model.module(params).model.layers
          } == {kernel}
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, _L)), jnp.int32)
  positions = jnp.asarray(np.concatenate([np.r_[0:20, 0:12][None], np.arange(_L)[None]]))
  batch = {"input_ids": ids, "positions": positions, "segment_ids": jnp.asarray(_PACKED)}
  real = _PACKED != 0
  expected = np.asarray(model.apply(params, batch, train=False))[real]
  np.testing.assert_allclose(np.asarray(kernel_model.apply(params, batch, train=False))[real],
                             expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model, fields, message", [
    (dict(attention="cudnn"), {}, "runs on NVIDIA GPUs; this platform is cpu"),
    (dict(attention="pallas"), dict(model_type="mistral", sliding_window=4),
     "no sliding window .*layer 0, window 4"),
    # Gemma 3's local and global layers in one scanned graph: only xla tells them apart.
    (dict(attention="splash", scan_layers=True),
     dict(model_type="gemma3_text", head_dim=8, sliding_window=4, sliding_window_pattern=2),
     "only 'xla' applies windows that differ between layers"),
])
def test_a_kernel_that_cannot_compute_the_model_is_refused(model, fields, message):
  from ftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=f"config.model.attention=.*{message}"):
    _tiny_decoder(model=model, **fields)


def _sharded_outputs_and_gradients(implementation, mesh_shape, segment_ids):
  """`_outputs_and_gradients` of a step traced for a (data, fsdp, tensor) mesh of CPU
  devices; also whether the kernel ran by shard_map."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ftjax import sharding  # pylint: disable=g-import-not-at-top
  devices = np.asarray(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  rules = sharding.Rules.from_config(sharding.DEFAULT_RULES)
  q, k, v, cotangent = _inputs_for(segment_ids)
  loss = _loss_and_output(implementation, segment_ids, cotangent, None, None, 0.3,
                          lambda: sharding.activation_sharding(mesh, rules))
  placed = [jax.device_put(x, NamedSharding(mesh, P(
      "data", None, "tensor" if x.shape[2] % mesh.shape["tensor"] == 0 else None)))
            for x in (q, k, v)]
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  per_device = "shard_map" in str(jax.make_jaxpr(grad)(*placed))
  (_, out), grads = jax.jit(grad)(*placed)
  return np.asarray(out)[segment_ids != 0], [np.asarray(g) for g in grads], per_device


def _assert_equal_to_the_reference(got, segment_ids):
  out, grads, per_device = got
  assert per_device
  ref_out, ref_grads = _outputs_and_gradients("xla", segment_ids, None, None)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
  for g, want in zip(grads, ref_grads):
    np.testing.assert_allclose(g, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["pallas", "splash"])
def test_a_kernel_runs_on_each_devices_rows_and_heads_of_a_mesh(implementation):
  """Inside a sharded step the kernel runs by shard_map on each device's share (rows over
  data, heads over tensor): a custom call the compiler could not split itself."""
  _assert_equal_to_the_reference(
      _sharded_outputs_and_gradients(implementation, (2, 1, 2), _PACKED), _PACKED)


@pytest.mark.parametrize("tensor, local_heads", [(2, (2, 1)), (4, (1, 1))])
def test_cudnn_keeps_query_groups_whole_on_each_device(monkeypatch, tensor, local_heads):
  """cuDNN takes fewer key / value heads than query heads: each device gets whole groups
  (2 query heads and their 1 key / value head over tensor=2); when the key / value heads
  cannot be split (2 over tensor=4) they are repeated first. cuDNN itself needs a GPU:
  XLA's attention with the same sequence lengths stands in for it."""
  seen = []

  def stand_in(q, k, v, segment_ids, *, window, scale):
    del window
    seen.append((q.shape[2], k.shape[2]))
    lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation="xla")

  monkeypatch.setattr(attention, "_cudnn", stand_in)
  _assert_equal_to_the_reference(
      _sharded_outputs_and_gradients("cudnn", (1, 1, tensor), _PADDED), _PADDED)
  assert set(seen) == {local_heads}

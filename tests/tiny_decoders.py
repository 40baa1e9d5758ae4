"""Tiny random decoders saved by transformers' own classes, and ftjax inputs for them."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers


def save_random(directory, family, **fields):
  """Saves a `<family>ForCausalLM` of config `fields` with O(1) random weights (so that
  logits differ clearly between tokens) in `directory`; returns it, in eval mode."""
  config = getattr(transformers, f"{family}Config")(**fields)
  torch.manual_seed(0)
  reference = getattr(transformers, f"{family}ForCausalLM")(config).eval()
  with torch.no_grad():
    for name, param in reference.named_parameters():
      param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
  reference.save_pretrained(str(directory))
  return reference


def model_config(**overrides):
  """A `config.model` section of `llama_lm` (or what `overrides` name)."""
  values = dict(name="llama_lm", pretrained="", dont_load=[], remat="none")
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def padded_batch(ids, lengths):
  """Right-padded rows: segment 1 on the first `lengths[i]` tokens, 0 (padding) after."""
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  segments = (positions < np.asarray(lengths)[:, None]).astype(np.int32)
  return {"input_ids": jnp.asarray(ids, jnp.int32), "positions": jnp.asarray(positions),
          "segment_ids": jnp.asarray(segments)}

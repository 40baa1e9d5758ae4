"""Tiny random decoders saved by transformers' own classes, and ftjax inputs for them."""

import re

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from ftjax import config as config_lib


# Families whose causal LM class is not named after their config class.
_CAUSAL_LM = {"Gemma3Text": "Gemma3ForCausalLM", "GPT2": "GPT2LMHeadModel"}
# Norm scales (Llama's `*norm.weight`, GPT-2's `ln_*.weight`), drawn around 1.
_NORM_SCALE = re.compile(r".*(norm|ln_\w+)\.weight")


def save_random(directory, family, **fields):
  """Saves a `<family>ForCausalLM` of `<family>Config(**fields)` with O(1) random weights
  (so that logits differ clearly between tokens) in `directory`; returns it, in eval mode."""
  config = getattr(transformers, f"{family}Config")(**fields)
  torch.manual_seed(0)
  causal_lm = _CAUSAL_LM.get(family, f"{family}ForCausalLM")
  reference = randomize(getattr(transformers, causal_lm)(config).eval())
  reference.save_pretrained(str(directory))
  return reference


def randomize(reference):
  """`reference` with O(1) random weights: norm scales around 1, the rest around 0."""
  with torch.no_grad():
    for name, param in reference.named_parameters():
      param.normal_(1.0 if _NORM_SCALE.fullmatch(name) else 0.0, 0.2)
  return reference


def model_config(**overrides):
  """A `config.model` section of `llama_lm`: the defaults, changed by `overrides`."""
  model = config_lib.defaults().model
  model.name = "llama_lm"
  model.update(overrides)
  return model


def padded_batch(ids, lengths):
  """Right-padded rows: segment 1 on the first `lengths[i]` tokens, 0 (padding) after."""
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  segments = (positions < np.asarray(lengths)[:, None]).astype(np.int32)
  return {"input_ids": jnp.asarray(ids, jnp.int32), "positions": jnp.asarray(positions),
          "segment_ids": jnp.asarray(segments)}

"""Maps Hugging Face BERT checkpoint names onto `ftjax.models.bert` parameters."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ftjax.hub import loading


# (HF name regex after any 'bert.' prefix, ftjax path template, transform)
_RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight",
     r"encoder/embeddings/\1_embeddings/embedding", loading.identity),
    (r"embeddings\.LayerNorm\.(weight|gamma)", "encoder/embeddings/layer_norm/scale",
     loading.identity),
    (r"embeddings\.LayerNorm\.(bias|beta)", "encoder/embeddings/layer_norm/bias", loading.identity),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight",
     r"encoder/layers/\1/attention/\2/kernel", loading.transpose),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias",
     r"encoder/layers/\1/attention/\2/bias", loading.identity),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight",
     r"encoder/layers/\1/attention/output/kernel", loading.transpose),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias",
     r"encoder/layers/\1/attention/output/bias", loading.identity),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|gamma)",
     r"encoder/layers/\1/attention_norm/scale", loading.identity),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(bias|beta)",
     r"encoder/layers/\1/attention_norm/bias", loading.identity),
    (r"encoder\.layer\.(\d+)\.(intermediate|output)\.dense\.weight",
     r"encoder/layers/\1/\2/kernel", loading.transpose),
    (r"encoder\.layer\.(\d+)\.(intermediate|output)\.dense\.bias",
     r"encoder/layers/\1/\2/bias", loading.identity),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|gamma)",
     r"encoder/layers/\1/output_norm/scale", loading.identity),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(bias|beta)",
     r"encoder/layers/\1/output_norm/bias", loading.identity),
]


# The new classification head, exported as BertForSequenceClassification names it.
EXPORT_EXTRA = {"head/kernel": ("classifier.weight", loading.transpose),
                "head/bias": ("classifier.bias", loading.identity)}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """Returns the ftjax parameter path and transform for a HF BERT tensor name."""
  name = name.removeprefix("bert.")
  return loading.rename(name, _RULES)


def load_pretrained_into(params: Any, model_dir: str, dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with a HF BERT safetensors checkpoint from `model_dir` loaded in."""
  return loading.load_safetensors_into(params, model_dir, hf_name_to_path, dont_load)

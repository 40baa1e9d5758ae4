"""Maps Hugging Face DeBERTa-v2 / v3 checkpoints onto `ftjax.models.deberta`.

A table of (checkpoint-name regex, ftjax path, transform) rules, applied after the
`deberta.` prefix of task-model checkpoints (DebertaV2ForSequenceClassification's)
is removed. DeBERTa names its attention projections `query_proj`, ...; the rest of
a block, and the word, position and token-type embeddings, have BERT's names.
"""

from __future__ import annotations

from typing import Any, Sequence

from ftjax.hub import bert as bert_hub
from ftjax.hub import loading

PREFIX = "deberta."
_ATTENTION = r"encoder\.layer\.(\d+)\.attention\.self"

RULES: loading.Rules = [
    (rf"{_ATTENTION}\.(query|key|value)_proj\.weight", r"encoder/layers/\1/attention/\2/kernel",
     loading.transpose),
    (rf"{_ATTENTION}\.(query|key|value)_proj\.bias", r"encoder/layers/\1/attention/\2/bias",
     loading.identity),
    (rf"{_ATTENTION}\.pos_(query|key)_proj\.weight",
     r"encoder/layers/\1/attention/pos_\2/kernel", loading.transpose),
    (rf"{_ATTENTION}\.pos_(query|key)_proj\.bias", r"encoder/layers/\1/attention/pos_\2/bias",
     loading.identity),
    (r"embeddings\.embed_proj\.weight", "encoder/embeddings/projection/kernel",
     loading.transpose),
    (r"encoder\.rel_embeddings\.weight", "encoder/rel_embeddings/embedding", loading.identity),
    (r"encoder\.LayerNorm\.weight", "encoder/rel_norm/scale", loading.identity),
    (r"encoder\.LayerNorm\.bias", "encoder/rel_norm/bias", loading.identity),
    # Conv1d's [out, in / groups, width] weight reversed is Flax's [width, in / groups, out].
    (r"encoder\.conv\.conv\.weight", "encoder/conv/conv/kernel", loading.transpose),
    (r"encoder\.conv\.conv\.bias", "encoder/conv/conv/bias", loading.identity),
    (r"encoder\.conv\.LayerNorm\.weight", "encoder/conv/layer_norm/scale", loading.identity),
    (r"encoder\.conv\.LayerNorm\.bias", "encoder/conv/layer_norm/bias", loading.identity),
    *bert_hub.FAMILIES["bert"].rules,
]

# DebertaV2ForSequenceClassification's head has a dense pooler before its output
# layer; ftjax's head is one linear layer, so an export holds the encoder alone.
EXPORT_EXTRA = {"head/kernel": None, "head/bias": None}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a DeBERTa checkpoint tensor, or None
  for one the encoder does not use (a task model's pooler and classifier)."""
  return loading.rename(name.removeprefix(PREFIX), RULES)


def load_pretrained_into(params: Any, model_dir: str, dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with the safetensors checkpoint of `model_dir` loaded in; the
  new head (never in a DeBERTa checkpoint) keeps its initial values.

  Args:
    params: the parameters of a `deberta.SequenceClassifier` of the checkpoint's config.
    model_dir: folder holding the safetensors weights.
    dont_load: regexes of further parameters that keep their initial values.
  """
  return loading.load_safetensors_into(params, model_dir, hf_name_to_path,
                                       (*dont_load, "head/.*"))

"""Maps Hugging Face ModernBERT checkpoints onto `ftjax.models.modernbert`.

The names are a table of (checkpoint-name regex, ftjax path, transform) rules.
The encoder's tensors have no prefix in a `ModernBertModel` checkpoint and `model.`
in the task models' (`ModernBertForMaskedLM`, `ModernBertForSequenceClassification`);
`head.*` (dense and norm) is in both task models, `classifier.*` only in the
sequence classifier's.
"""

from __future__ import annotations

from typing import Any, Sequence

from ftjax.hub import loading, safetensors_io

_PREFIX = "model."

# (checkpoint module regex, ftjax module path) of the LayerNorms and the linear layers.
_NORMS = ((r"embeddings\.norm", "encoder/embeddings/norm"),
          (r"layers\.(\d+)\.(attn_norm|mlp_norm)", r"encoder/layers/\1/\2"),
          (r"final_norm", "encoder/final_norm"),
          (r"head\.norm", "head/norm"))
_LINEARS = ((r"head\.dense", "head/dense"), (r"classifier", "classifier"))

RULES: loading.Rules = [
    (r"embeddings\.tok_embeddings\.weight", "encoder/embeddings/tok_embeddings/embedding",
     loading.identity),
    *[(rf"{theirs}\.weight", rf"{ours}/scale", loading.identity) for theirs, ours in _NORMS],
    *[(rf"{theirs}\.bias", rf"{ours}/bias", loading.identity) for theirs, ours in _NORMS],
    # A layer's projections: attn.Wqkv -> encoder/layers/i/attn/Wqkv.
    (r"layers\.(\d+)\.(attn|mlp)\.(Wqkv|Wi|Wo)\.weight", r"encoder/layers/\1/\2/\3/kernel",
     loading.transpose),
    (r"layers\.(\d+)\.(attn|mlp)\.(Wqkv|Wi|Wo)\.bias", r"encoder/layers/\1/\2/\3/bias",
     loading.identity),
    *[(rf"{theirs}\.weight", f"{ours}/kernel", loading.transpose) for theirs, ours in _LINEARS],
    *[(rf"{theirs}\.bias", f"{ours}/bias", loading.identity) for theirs, ours in _LINEARS],
]

# The head's names in ModernBertForSequenceClassification, for an export from a
# checkpoint that lacks them (a ModernBertModel's: no head; a masked LM's: no classifier).
EXPORT_EXTRA = {
    "head/dense/kernel": ("head.dense.weight", loading.transpose),
    "head/dense/bias": ("head.dense.bias", loading.identity),
    "head/norm/scale": ("head.norm.weight", loading.identity),
    "head/norm/bias": ("head.norm.bias", loading.identity),
    "classifier/kernel": ("classifier.weight", loading.transpose),
    "classifier/bias": ("classifier.bias", loading.identity),
}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a ModernBERT checkpoint tensor; None for
  one the classifier does not use (a masked LM's `decoder`)."""
  return loading.rename(name.removeprefix(_PREFIX), RULES)


def load_pretrained_into(params: Any, model_dir: str,
                         dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with the safetensors checkpoint of `model_dir` loaded in.

  The head (`head/*`, `classifier/*`) keeps its initial values where the checkpoint
  has none: a `ModernBertModel`'s has neither part, a masked LM's no classifier.

  Args:
    params: the parameters of a `modernbert.SequenceClassifier` of the checkpoint's config.
    model_dir: folder holding the safetensors weights.
    dont_load: regexes of parameters that keep their initial values.

  Returns:
    The parameter tree with every checkpoint tensor in place.
  """
  tensors = safetensors_io.load_safetensors(model_dir)
  dont_load = tuple(dont_load) + new_head(tensors)
  return loading.load_tensors(params, tensors, hf_name_to_path, source=model_dir,
                              dont_load=dont_load)[0]


# Each part of the head: the regex of its parameters, and a tensor of checkpoints that have it.
_HEAD_PARTS = (("head/.*", "head.dense.weight"), ("classifier/.*", "classifier.weight"))


def new_head(names: Any) -> tuple[str, ...]:
  """Regexes of the head parameters a checkpoint with tensors `names` lacks."""
  return tuple(pattern for pattern, tensor in _HEAD_PARTS if tensor not in names)

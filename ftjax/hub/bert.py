"""Maps Hugging Face checkpoints of the BERT-style families onto `ftjax.models.bert`.

Each family (config.json's model_type) has a table of (checkpoint-name regex, ftjax
path, transform) rules, applied after the family's prefix (`roberta.` in a
RobertaForMaskedLM checkpoint) is removed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

from ftjax.hub import loading
from ftjax.models import bert

_EMBEDDINGS_NORM: loading.Rules = [
    (r"embeddings\.LayerNorm\.(weight|gamma)", "encoder/embeddings/layer_norm/scale",
     loading.identity),
    (r"embeddings\.LayerNorm\.(bias|beta)", "encoder/embeddings/layer_norm/bias", loading.identity),
]

_BERT_RULES: loading.Rules = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight",
     r"encoder/embeddings/\1_embeddings/embedding", loading.identity),
    *_EMBEDDINGS_NORM,
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

_DISTILBERT_LAYER = r"transformer\.layer\.(\d+)"
# DistilBERT's module name -> the BERT-layout module it fills, in every layer.
_DISTILBERT_MODULES = (("attention.q_lin", "attention/query"), ("attention.k_lin", "attention/key"),
                       ("attention.v_lin", "attention/value"),
                       ("attention.out_lin", "attention/output"), ("ffn.lin1", "intermediate"),
                       ("ffn.lin2", "output"))
_DISTILBERT_NORMS = (("sa_layer_norm", "attention_norm"), ("output_layer_norm", "output_norm"))
_DISTILBERT_RULES: loading.Rules = [
    (r"embeddings\.(word|position)_embeddings\.weight",
     r"encoder/embeddings/\1_embeddings/embedding", loading.identity),
    *_EMBEDDINGS_NORM,
    *[(rf"{_DISTILBERT_LAYER}\.{re.escape(theirs)}\.weight", rf"encoder/layers/\1/{ours}/kernel",
       loading.transpose) for theirs, ours in _DISTILBERT_MODULES],
    *[(rf"{_DISTILBERT_LAYER}\.{re.escape(theirs)}\.bias", rf"encoder/layers/\1/{ours}/bias",
       loading.identity) for theirs, ours in _DISTILBERT_MODULES],
    *[(rf"{_DISTILBERT_LAYER}\.{theirs}\.weight", rf"encoder/layers/\1/{ours}/scale",
       loading.identity) for theirs, ours in _DISTILBERT_NORMS],
    *[(rf"{_DISTILBERT_LAYER}\.{theirs}\.bias", rf"encoder/layers/\1/{ours}/bias",
       loading.identity) for theirs, ours in _DISTILBERT_NORMS],
]

_ELECTRA_RULES: loading.Rules = [
    *_BERT_RULES,
    (r"embeddings_project\.weight", "encoder/embeddings/projection/kernel", loading.transpose),
    (r"embeddings_project\.bias", "encoder/embeddings/projection/bias", loading.identity),
]

# The new classification head under BertForSequenceClassification's names.
_BERT_HEAD = {"head/kernel": ("classifier.weight", loading.transpose),
              "head/bias": ("classifier.bias", loading.identity)}


@dataclasses.dataclass(frozen=True)
class Family:
  """A family's checkpoint names."""

  prefix: str  # of the encoder's tensors in task-model checkpoints, e.g. "roberta."
  rules: loading.Rules
  # The new head's names in the family's ForSequenceClassification model, whose head
  # is then one linear layer. None where that head has a dense layer before the output
  # (DistilBERT's pre_classifier, RoBERTa's and ELECTRA's dense + out_proj): ftjax's
  # head has no such layer, so an export holds the encoder alone, as <Family>Model.
  head: dict[str, tuple[str, loading.Transform]] | None = None


# model_type -> checkpoint names; the same families as `ftjax.models.bert.FAMILIES`.
FAMILIES = {
    "bert": Family("bert.", _BERT_RULES, _BERT_HEAD),
    "distilbert": Family("distilbert.", _DISTILBERT_RULES),
    "electra": Family("electra.", _ELECTRA_RULES),
    "roberta": Family("roberta.", _BERT_RULES),
    "xlm-roberta": Family("roberta.", _BERT_RULES),
}


def family_name_map(model_type: str) -> loading.NameMap:
  """The checkpoint name -> (ftjax path, transform) map of one family."""
  family = FAMILIES[model_type]
  return lambda name: loading.rename(name.removeprefix(family.prefix), family.rules)


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """The ftjax parameter path and transform of a tensor of any family's checkpoint.

  The families' names never map one tensor to two different parameters, so an
  export can follow a source checkpoint of any of them.
  """
  for model_type in FAMILIES:
    target = family_name_map(model_type)(name)
    if target is not None:
      return target
  return None


def export_extra(source_dir: str) -> dict[str, tuple[str, loading.Transform] | None]:
  """{ftjax path: (name, transform)} of the new head in an export of a model loaded from
  `source_dir`, by its family; None for each head parameter the family's format has no
  place for (left out of the export)."""
  model_type = bert.BertConfig.from_json(os.path.join(source_dir, "config.json")).model_type
  return FAMILIES[model_type].head or {"head/kernel": None, "head/bias": None}


def load_pretrained_into(params: Any, model_dir: str, model_type: str,
                         dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with the safetensors checkpoint of `model_dir` loaded in.

  Args:
    params: the parameters of a `bert.SequenceClassifier` of the checkpoint's config.
    model_dir: folder holding the safetensors weights.
    model_type: the checkpoint's family; only its names are read.
    dont_load: regexes of parameters that keep their initial values.

  Returns:
    The parameter tree with every checkpoint tensor in place.
  """
  return loading.load_safetensors_into(params, model_dir, family_name_map(model_type),
                                       dont_load)

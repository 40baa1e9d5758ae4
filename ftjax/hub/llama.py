"""Maps Hugging Face Llama-family checkpoint names onto `ftjax.models.llama` parameters.

Llama, Qwen2, Mistral, Qwen3, Gemma 2 and Gemma 3 share the names; Qwen3 and Gemma 3
add q/k norms, Gemma 2 and 3 a norm before and after the MLP; Phi-3 fuses q/k/v into
`qkv_proj` and gate/up into `gate_up_proj`, kept fused as in the checkpoint. GPT-2's
own names (`h.0.attn.c_attn`, `wte`, `wpe`, `ln_f`) map onto the same paths: its fused
`c_attn` is `qkv_proj`, its MLP's `c_fc` / `c_proj` are `up_proj` / `down_proj`.

HF linear weights are [out, in] and are transposed into [in, out] kernels. A
model with tied embeddings has no `lm_head/kernel`, so a `lm_head.weight` in
its checkpoint is reported as unexpected and not loaded.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from ftjax.hub import loading


# (HF name regex, ftjax path template, transform)
_RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"model\.embed_tokens\.weight", "model/embed_tokens/embedding", loading.identity),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj|qkv_proj)\.weight",
     r"model/layers/\1/self_attn/\2/kernel", loading.transpose),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj|qkv_proj)\.bias",
     r"model/layers/\1/self_attn/\2/bias", loading.identity),
    # Qwen3's and Gemma 3's per-head RMSNorm of queries and keys.
    (r"model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight",
     r"model/layers/\1/self_attn/\2/scale", loading.identity),
    (r"model\.layers\.(\d+)\.mlp\.((?:gate|up|down|gate_up)_proj)\.weight",
     r"model/layers/\1/mlp/\2/kernel", loading.transpose),
    (r"model\.layers\.(\d+)\.mlp\.((?:gate|up|down|gate_up)_proj)\.bias",
     r"model/layers/\1/mlp/\2/bias", loading.identity),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|"
     r"pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
     r"model/layers/\1/\2/scale", loading.identity),
    (r"model\.norm\.weight", "model/norm/scale", loading.identity),
    (r"lm_head\.weight", "lm_head/kernel", loading.transpose),
    # The head of a sequence classifier (LlamaForSequenceClassification and kin).
    (r"score\.weight", "score/kernel", loading.transpose),
]

# GPT-2's names (under `transformer.` in its task models), onto the same paths. Its
# Conv1D weights are already [in, out].
_GPT2 = r"(?:transformer\.)?"
_GPT2_LAYER = _GPT2 + r"h\.(\d+)\."
_GPT2_MODULES = (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                 ("attn.c_attn", "self_attn/qkv_proj"), ("attn.c_proj", "self_attn/o_proj"),
                 ("mlp.c_fc", "mlp/up_proj"), ("mlp.c_proj", "mlp/down_proj"))
_GPT2_RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (_GPT2 + r"wte\.weight", "model/embed_tokens/embedding", loading.identity),
    (_GPT2 + r"wpe\.weight", "model/embed_positions/embedding", loading.identity),
    (_GPT2 + r"ln_f\.weight", "model/norm/scale", loading.identity),
    (_GPT2 + r"ln_f\.bias", "model/norm/bias", loading.identity),
    *[(_GPT2_LAYER + re.escape(theirs) + r"\.weight",
       rf"model/layers/\1/{ours}/{'scale' if theirs.startswith('ln') else 'kernel'}",
       loading.identity) for theirs, ours in _GPT2_MODULES],
    *[(_GPT2_LAYER + re.escape(theirs) + r"\.bias", rf"model/layers/\1/{ours}/bias",
       loading.identity) for theirs, ours in _GPT2_MODULES],
]

# Every parameter of a causal LM comes from its checkpoint: nothing new to name.
EXPORT_EXTRA: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}
# A decoder classifier's new head, under `<Family>ForSequenceClassification`'s name.
CLASSIFIER_EXPORT_EXTRA = {"score/kernel": ("score.weight", loading.transpose)}


def hf_name_to_path(name: str) -> tuple[str, loading.Transform] | None:
  """Returns the ftjax parameter path and transform for a HF Llama-family or GPT-2 tensor
  name."""
  return loading.rename(name, _RULES) or loading.rename(name, _GPT2_RULES)

"""Reads llama.cpp GGUF checkpoints of Llama and Gemma 3 models as a HF config dict and
HF-named tensors.

Quantized tensors are dequantized to float32 with the `gguf` package, so the
model trains from the values llama.cpp would compute with. What llama.cpp's
converter changed is undone per architecture (`_ARCHITECTURES`): Llama's
`attn_q` and `attn_k` rows are permuted for its interleaved rotary layout and
are permuted back into Hugging Face's half-split layout, which
`ftjax.models.llama` uses; Gemma 3's norm weights are stored as 1 + w and get 1
subtracted. Then `ftjax.hub.llama.hf_name_to_path` maps every tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

import gguf
import numpy as np

from ftjax.errors import WeightsError

# Files whose presence makes a folder a Hugging Face checkpoint, whatever else it holds.
_HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")

_SUPPORTED_TYPES = tuple(getattr(gguf.GGMLQuantizationType, name)
                         for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                      "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

# (GGUF tensor name regex, HF name template) shared by the architectures
_COMMON_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2"),
]


@dataclasses.dataclass(frozen=True)
class _Architecture:
  """How llama.cpp stores one architecture, and the HF model it came from."""

  model_type: str             # the HF config's model_type
  causal_lm: str              # the transformers class an export loads as
  names: list[tuple[str, str]]  # GGUF -> HF tensor names, besides `_COMMON_NAMES`
  permuted_qk: bool           # q/k rows interleaved for llama.cpp's rotary layout
  norm_plus_one: bool         # norm weights stored as 1 + w (Gemma)
  fields: dict[str, Any]      # HF config fields llama.cpp leaves implicit


_ARCHITECTURES = {
    "llama": _Architecture(
        "llama", "LlamaForCausalLM",
        [(r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight")],
        permuted_qk=True, norm_plus_one=False, fields={}),
    "gemma3": _Architecture(
        "gemma3_text", "Gemma3ForCausalLM",
        [(r"blk\.(\d+)\.post_attention_norm\.weight",
          r"model.layers.\1.post_attention_layernorm.weight"),
         (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
         (r"blk\.(\d+)\.post_ffw_norm\.weight",
          r"model.layers.\1.post_feedforward_layernorm.weight"),
         (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
         (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight")],
        # llama.cpp's Gemma 3: five local layers to one global, local layers rotating with
        # base 10000, GeGLU; it scales queries by head_dim ** -0.5.
        permuted_qk=False, norm_plus_one=True,
        fields={"sliding_window_pattern": 6, "rope_local_base_freq": 10000.0,
                "hidden_activation": "gelu_pytorch_tanh"}),
}


def find_gguf(directory: str) -> str | None:
  """The GGUF file of a model folder that is not a Hugging Face checkpoint.

  Args:
    directory: a model folder.

  Returns:
    The path of its only `.gguf` file, or None when the folder holds a
    `config.json` or safetensors checkpoint, or no `.gguf` file.

  Raises:
    WeightsError: when the folder holds several `.gguf` files.
  """
  if any(os.path.isfile(os.path.join(directory, name)) for name in _HF_FILES):
    return None
  paths = sorted(glob.glob(os.path.join(glob.escape(directory), "*.gguf")))
  if len(paths) > 1:
    raise WeightsError(f"{directory}: several GGUF files {[os.path.basename(p) for p in paths]}; "
                       "keep one per model folder")
  return paths[0] if paths else None


def _unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of a q or k projection (weight or bias).

  llama.cpp reorders each head's rows from HF's [first half, second half] to
  interleaved pairs: rows (h, i, j) of shape (heads, 2, head_dim / 2) become
  (h, j, i). This applies the inverse.
  """
  half = weights.shape[0] // num_heads // 2
  rows = weights.reshape(num_heads, half, 2, *weights.shape[1:])
  return rows.swapaxes(1, 2).reshape(weights.shape)


def _metadata(reader: gguf.GGUFReader, key: str, path: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise WeightsError(f"{path}: GGUF metadata lacks {key!r}")
    return default
  return field.contents()


def _architecture(reader: gguf.GGUFReader, path: str) -> tuple[str, _Architecture]:
  name = _metadata(reader, "general.architecture", path)
  if name not in _ARCHITECTURES:
    raise WeightsError(f"{path}: GGUF architecture {name!r} is not supported; "
                       f"supported: {list(_ARCHITECTURES)}")
  return name, _ARCHITECTURES[name]


def _config(reader: gguf.GGUFReader, tensors: dict[str, Any], path: str,
            name: str, architecture: _Architecture) -> dict[str, Any]:
  """The HF config dict of a GGUF file's metadata and {name: `ReaderTensor`}, for its
  architecture (`name` in the metadata keys)."""
  get = lambda key, default=None: _metadata(reader, f"{name}.{key}", path, default)
  if "rope_freqs.weight" in tensors or get("rope.scaling.type", "none") != "none":
    raise WeightsError(f"{path}: scaled rotary embeddings (rope_freqs / rope.scaling) are not "
                       "supported in GGUF files")
  if "token_embd.weight" not in tensors:
    raise WeightsError(f"{path}: GGUF file has no 'token_embd.weight' tensor")
  hidden, heads = get("embedding_length"), get("attention.head_count")
  head_dim = get("attention.key_length", hidden // heads)
  if get("rope.dimension_count", head_dim) != head_dim:
    raise WeightsError(f"{path}: rope.dimension_count {get('rope.dimension_count')} differs "
                       f"from the head size {head_dim}: partial rotary embeddings are not "
                       "supported")
  config = {
      "model_type": architecture.model_type,
      "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # GGUF lists dims inner first
      "hidden_size": hidden,
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": get("attention.head_count_kv", heads),
      "head_dim": head_dim,
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
      "rope_theta": get("rope.freq_base", 10000.0),
      "max_position_embeddings": get("context_length"),
      "tie_word_embeddings": "output.weight" not in tensors,
      "attention_bias": any(re.fullmatch(r"blk\.\d+\.attn_\w+\.bias", n) for n in tensors),
      "mlp_bias": any(re.fullmatch(r"blk\.\d+\.ffn_\w+\.bias", n) for n in tensors),
      **architecture.fields,
  }
  if architecture.model_type == "gemma3_text":
    config.update(sliding_window=get("attention.sliding_window"),
                  query_pre_attn_scalar=head_dim)
  return config


def causal_lm_class(path: str) -> str:
  """The transformers class a model read from the GGUF file `path` exports as."""
  return _architecture(_reader(path), path)[1].causal_lm


def _hf_name(name: str, architecture: _Architecture) -> str:
  """The HF name of a GGUF tensor; names without a rule are kept (and reported unexpected)."""
  for pattern, template in _COMMON_NAMES + architecture.names:
    match = re.fullmatch(pattern, name)
    if match:
      return match.expand(template)
  return name


def _dequantize(tensor: Any, path: str) -> np.ndarray:
  if tensor.tensor_type not in _SUPPORTED_TYPES:
    raise WeightsError(f"{path}: tensor {tensor.name!r} has type "
                       f"{gguf.GGMLQuantizationType(tensor.tensor_type).name}, which is not "
                       f"supported; supported: {[t.name for t in _SUPPORTED_TYPES]}")
  values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.array(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def _reader(path: str) -> gguf.GGUFReader:
  try:
    return gguf.GGUFReader(path)
  except (OSError, ValueError, IndexError, KeyError) as e:
    raise WeightsError(f"cannot read GGUF file {path}: {e}") from None


def read_config(path: str) -> dict[str, Any]:
  """The Hugging Face-style config dict of a GGUF file, without reading its tensors."""
  reader = _reader(path)
  return _config(reader, {tensor.name: tensor for tensor in reader.tensors}, path,
                 *_architecture(reader, path))


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a Llama or Gemma 3 GGUF file.

  Args:
    path: the `.gguf` file.

  Returns:
    (config, tensors): a Hugging Face-style config dict (for
    `LlamaConfig.from_dict`) and {HF tensor name: float32 array}, weights
    [out, in] as in HF checkpoints, q and k rows in HF's rotary layout, norm
    weights as HF stores them.

  Raises:
    WeightsError: for a missing, truncated or malformed file, an architecture
      other than llama and gemma3, scaled or partial rotary embeddings, or a tensor
      type not in `_SUPPORTED_TYPES`.
  """
  reader = _reader(path)
  by_name = {tensor.name: tensor for tensor in reader.tensors}
  arch_name, architecture = _architecture(reader, path)
  config = _config(reader, by_name, path, arch_name, architecture)
  heads = ({"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
           if architecture.permuted_qk else {})
  tensors = {}
  for name, tensor in by_name.items():
    values = _dequantize(tensor, path)
    kind = name.split(".")[-2] if name.startswith("blk.") else ""
    if kind in heads:
      values = _unpermute_rows(values, heads[kind])
    if architecture.norm_plus_one and name.endswith("norm.weight"):
      values = values - 1.0
    tensors[_hf_name(name, architecture)] = values
  return config, tensors

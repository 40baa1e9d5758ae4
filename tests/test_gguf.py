"""GGUF import: SmolLM2-135M-Instruct (Q4_1) and Gemma 3 270M (Q4_K_M) against transformers,
tiny written files, errors."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_decoders
from ftjax import generate, models
from ftjax.errors import WeightsError
from ftjax.hub import assets
from ftjax.hub import gguf as gguf_hub

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SMOLLM2 = "smollm2-135m-instruct"
_QUESTION = "What is the capital of France?"
_NEW_TOKENS = 6  # "The capital of France is Paris"
_TYPES = gguf.GGMLQuantizationType


def _config(pretrained):
  return tiny_decoders.model_config(pretrained=pretrained)


def _forward(model):
  """The compiled eval-mode forward pass: (params, batch) -> numpy logits."""
  apply = jax.jit(lambda params, batch: model.apply(params, batch, train=False))
  return lambda params, batch: np.asarray(apply(params, batch))


def _padded_batch(ids, length):
  """One row: `ids`, then padding (segment 0) up to `length`, so every call has one shape."""
  input_ids = np.zeros((1, length), np.int32)
  input_ids[0, :len(ids)] = ids
  positions = np.arange(length, dtype=np.int32)[None]
  segments = (positions < len(ids)).astype(np.int32)
  return {"input_ids": jnp.asarray(input_ids), "positions": jnp.asarray(positions),
          "segment_ids": jnp.asarray(segments)}


@pytest.fixture(scope="module")
def smollm2_file():
  """(folder, file name) of the packaged GGUF."""
  path = gguf_hub.find_gguf(assets.model_dir(_SMOLLM2))
  assert path is not None
  return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_file):
  """(tokenizer, chat-templated prompt ids) from the GGUF's own tokenizer."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_file[0],
                                                         gguf_file=smollm2_file[1])
  ids = tokenizer.apply_chat_template([{"role": "user", "content": _QUESTION}],
                                      add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
  return tokenizer, [int(i) for i in ids]


@pytest.fixture(scope="module")
def reference(smollm2_file):
  """transformers' LlamaForCausalLM, float32, dequantized from the same GGUF."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_file[0], gguf_file=smollm2_file[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2():
  """(compiled forward, params) of ftjax's model loaded by its packaged short name."""
  model, params = models.create(_config(_SMOLLM2), seed=0)
  return _forward(model), params


def _reference_logits(reference, ids):
  with torch.no_grad():
    return reference(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()


def test_smollm2_logits_match_transformers(smollm2, reference, prompt_ids, record_property):
  forward, params = smollm2
  _, ids = prompt_ids
  logits = forward(params, _padded_batch(ids, len(ids) + _NEW_TOKENS))[0, :len(ids)]
  expected = _reference_logits(reference, ids)
  assert logits.shape == expected.shape == (len(ids), 49152)
  diff = float(np.max(np.abs(logits - expected)))
  record_property("max_abs_diff", diff)
  # Float32 rounding over 30 blocks, with logits up to ~38: transformers' own float32
  # logits are ~6e-5 from its float64 ones here, ftjax's ~1e-4.
  assert diff < 2e-4, diff


def test_smollm2_greedy_continuation_matches_transformers(smollm2, reference, prompt_ids):
  forward, params = smollm2
  tokenizer, ids = prompt_ids
  tokens = list(ids)
  for _ in range(_NEW_TOKENS):  # the whole sequence again at every step: no KV cache
    logits = forward(params, _padded_batch(tokens, len(ids) + _NEW_TOKENS))
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  # One causal pass over our sequence gives transformers' next token after every prefix:
  # agreeing at each step means its own greedy decoding yields the same tokens.
  theirs = np.argmax(_reference_logits(reference, tokens[:-1])[len(ids) - 1:], axis=-1)
  assert tokens[len(ids):] == theirs.tolist()
  text = tokenizer.decode(tokens[len(ids):], skip_special_tokens=True)
  assert "Paris" in text, text


def _llama_cpp_permute(weights, heads):
  """llama.cpp's `convert_hf_to_gguf.py` reordering of q / k rows, written independently."""
  return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


_TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def _tensor_type(name):
  """A mix of every supported type over the tiny model's tensors (norms stay F32)."""
  if name.endswith("norm.weight"):
    return _TYPES.F32
  return {"token_embd": _TYPES.Q8_0, "output": _TYPES.F16, "attn_q": _TYPES.Q4_0,
          "attn_k": _TYPES.Q4_1, "attn_v": _TYPES.BF16, "attn_output": _TYPES.Q5_1,
          "ffn_gate": _TYPES.Q4_1, "ffn_up": _TYPES.F32,
          "ffn_down": _TYPES.Q5_0}.get(name.split(".")[-2], _TYPES.Q4_0)


def _write_gguf(path, architecture, config, tensors):
  """Writes a GGUF file of {GGUF name: (float32 array [out, in], type)} with Llama metadata."""
  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_block_count(config["num_hidden_layers"])
  writer.add_context_length(config["max_position_embeddings"])
  writer.add_embedding_length(config["hidden_size"])
  writer.add_feed_forward_length(config["intermediate_size"])
  writer.add_head_count(config["num_attention_heads"])
  writer.add_head_count_kv(config["num_key_value_heads"])
  writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
  writer.add_rope_freq_base(config["rope_theta"])
  for name, (array, qtype) in tensors.items():
    data = gguf.quants.quantize(array, qtype)
    writer.add_tensor(name, data, raw_dtype=None if qtype == _TYPES.F32 else qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model folder, transformers model holding the GGUF's dequantized values, GGUF tensors)."""
  config = transformers.LlamaConfig(**_TINY)
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM(config).eval()
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, _TINY["num_hidden_layers"])
  heads = {"attn_q": _TINY["num_attention_heads"], "attn_k": _TINY["num_key_value_heads"]}
  tensors = {}
  with torch.no_grad():
    for hf_name, param in reference.named_parameters():
      param.normal_(0.0, 0.2)
      if hf_name.endswith("norm.weight"):
        param.add_(1.0)
      name = names.get_name(hf_name, try_suffixes=(".weight",))
      qtype = _tensor_type(name)
      # Quantization blocks run along rows, so it commutes with the q / k row permutation.
      value = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
      param.copy_(torch.from_numpy(np.asarray(value, np.float32)))
      kind = name.split(".")[-2]
      value = _llama_cpp_permute(value, heads[kind]) if kind in heads else value
      tensors[name] = (np.asarray(value, np.float32), qtype)
  directory = tmp_path_factory.mktemp("tiny_gguf")
  _write_gguf(directory / "tiny.gguf", "llama", _TINY, tensors)
  return str(directory), reference, tensors


def test_tiny_gguf_of_every_type_matches_transformers_untied_and_gqa(tiny):
  directory, reference, _ = tiny
  config, _ = gguf_hub.read_gguf(os.path.join(directory, "tiny.gguf"))
  assert not config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
  model, params = models.create(_config(directory), seed=0)
  ids = list(np.random.default_rng(0).integers(1, _TINY["vocab_size"], 12))
  logits = _forward(model)(params, _padded_batch(ids, 12))[0]
  np.testing.assert_allclose(logits, _reference_logits(reference, ids), atol=1e-4, rtol=0)


def test_find_gguf_wants_one_file_and_no_hf_checkpoint(tiny, tmp_path):
  (tmp_path / "tiny.gguf").write_bytes(b"")
  (tmp_path / "other.gguf").write_bytes(b"")
  with pytest.raises(WeightsError, match=r"several GGUF files \['other.gguf', 'tiny.gguf'\]"):
    gguf_hub.find_gguf(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  assert gguf_hub.find_gguf(str(tmp_path)) is None
  assert gguf_hub.find_gguf(tiny[0]) == os.path.join(tiny[0], "tiny.gguf")


def test_unsupported_tensor_type_names_the_tensor(tiny, tmp_path):
  tensors = dict(tiny[2])  # ternary blocks of 256 values
  tensors["blk.1.ffn_down.weight"] = (np.zeros((64, 256), np.float32), _TYPES.TQ2_0)
  path = tmp_path / "ternary.gguf"
  _write_gguf(path, "llama", _TINY, tensors)
  with pytest.raises(WeightsError, match=f"{path}: tensor 'blk.1.ffn_down.weight' has type "
                                         "TQ2_0, which is not supported"):
    gguf_hub.read_gguf(str(path))


def test_other_architecture_is_rejected(tiny, tmp_path):
  path = tmp_path / "qwen.gguf"
  _write_gguf(path, "qwen3", _TINY, tiny[2])
  with pytest.raises(WeightsError, match=f"{path}: GGUF architecture 'qwen3' is not supported"):
    models.create(_config(str(tmp_path)), seed=0)


@pytest.mark.parametrize("keep", [0.5, 0.001])  # in the tensor data; in the header
def test_truncated_file_names_the_file(tiny, tmp_path, keep):
  data = open(os.path.join(tiny[0], "tiny.gguf"), "rb").read()
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(WeightsError, match=f"cannot read GGUF file {path}"):
    gguf_hub.read_gguf(str(path))


# --- Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors; norms stored as 1 + w) ---

_GEMMA3 = "gemma3-270m"
_GEMMA3_PROMPT = "The capital of France is"
_GEMMA3_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma3():
  """(model, params, reference, tokenizer): ftjax's and transformers' Gemma3ForCausalLM,
  float32, from the same packaged GGUF file."""
  model, params = models.create(_config(_GEMMA3), seed=0)
  path = gguf_hub.find_gguf(assets.model_dir(_GEMMA3))
  folder, name = os.path.dirname(path), os.path.basename(path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return model, params, reference, tokenizer


@pytest.mark.slow
def test_gemma3_logits_and_greedy_completion_match_transformers(gemma3, record_property):
  model, params, reference, tokenizer = gemma3
  assert type(reference).__name__ == "Gemma3ForCausalLM"
  ids = [int(i) for i in tokenizer(_GEMMA3_PROMPT)["input_ids"]]
  logits = _forward(model)(params, _padded_batch(ids, len(ids)))[0]
  expected = _reference_logits(reference, ids)
  assert logits.shape == expected.shape == (len(ids), 262144)
  diff = float(np.max(np.abs(logits - expected)))
  record_property("max_abs_diff", diff)
  assert diff < 1e-4, diff  # measured 3.1e-5, logits up to 22
  ours = generate.generate(model, params, [ids], max_new_tokens=_GEMMA3_NEW_TOKENS,
                           stop_tokens=[tokenizer.eos_token_id])[0]
  with torch.no_grad():
    theirs = reference.generate(torch.tensor([ids]), do_sample=False,
                                max_new_tokens=_GEMMA3_NEW_TOKENS,
                                eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
  assert ours == theirs and len(ours) == _GEMMA3_NEW_TOKENS
  assert "France" in tokenizer.decode(ours), tokenizer.decode(ours)

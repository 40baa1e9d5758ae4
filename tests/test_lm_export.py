"""SmolLM2 (read from GGUF) with LoRA, exported: transformers and peft reproduce ftjax."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smollm2_chat
from ftjax import generate, models, param_groups
from ftjax.hub import export
from ftjax.peft import lora, methods

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_QUESTION = "What is the capital of France?"
_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapted():
  """SmolLM2 with LoRA adapters moved away from their (exact) zero start."""
  config = smollm2_chat.get_config("peft=lora")
  model, params = models.create(config.model, seed=0)
  model, params = methods.adapt(config, model, params, seed=0)
  rng = np.random.default_rng(0)
  params = param_groups.map_with_path(
      lambda p, x: (np.asarray(x) + 0.02 * rng.normal(size=x.shape)).astype(np.float32)
      if p.endswith("lora_b") else x, params)
  return config, model, params


@pytest.fixture(scope="module")
def merged_dir(adapted, tmp_path_factory):
  config, model, params = adapted
  out = tmp_path_factory.mktemp("merged")
  source, name_map, extra = models.hf_format(config.model)
  names = export.save_merged(model.module(params), str(out), source_dir=source,
                             name_map=name_map, extra=extra)
  assert len(names) == 1 + 30 * 9 + 1  # embedding, 9 tensors per block, final norm
  return out


def _prompt(tokenizer):
  return tokenizer.apply_chat_template([{"role": "user", "content": _QUESTION}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False)


def _merged(model, params):
  graphdef, state = nnx.split(lora.merge(model.module(params)))
  return dataclasses.replace(model, graphdef=graphdef), nnx.to_pure_dict(state)


def test_merged_export_generates_the_same_greedy_tokens_in_transformers(adapted, merged_dir):
  _, model, params = adapted
  config = json.loads((merged_dir / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
  tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
  assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
  ids = [int(i) for i in _prompt(tokenizer)]
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      merged_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = reference.generate(torch.tensor([ids]), max_new_tokens=_NEW_TOKENS,
                                do_sample=False)[0, len(ids):].tolist()
  ours = generate.generate(*_merged(model, params), [ids], max_new_tokens=_NEW_TOKENS,
                           stop_tokens=[tokenizer.eos_token_id])[0]
  assert ours == theirs
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
  batch = {"input_ids": jnp.asarray([ids]), "positions": jnp.arange(len(ids))[None],
           "segment_ids": jnp.ones((1, len(ids)), jnp.int32)}
  unmerged = np.asarray(model.apply(params, batch, train=False))[0]
  np.testing.assert_allclose(unmerged, expected, atol=3e-4)  # logits reach ~40


def test_adapter_export_reproduces_ftjax_in_peft(adapted, tmp_path):
  config, model, params = adapted
  source, name_map, _ = models.hf_format(config.model)
  export.save_peft_adapter(model.module(params), str(tmp_path),
                           spec=lora.LoraSpec.from_config(config.peft), source_dir=source,
                           name_map=name_map)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                     "up_proj", "v_proj"]
  gguf_file = [f for f in os.listdir(source) if f.endswith(".gguf")][0]
  base = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file,
                                                           dtype=torch.float32)
  adapted_reference = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  ids = list(range(100, 120))
  with torch.no_grad():
    expected = adapted_reference(input_ids=torch.tensor([ids])).logits[0].numpy()
  batch = {"input_ids": jnp.asarray([ids]), "positions": jnp.arange(len(ids))[None],
           "segment_ids": jnp.ones((1, len(ids)), jnp.int32)}
  np.testing.assert_allclose(np.asarray(model.apply(params, batch, train=False))[0], expected,
                             atol=3e-4)

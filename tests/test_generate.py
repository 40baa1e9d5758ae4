"""KV-cache decoding and `ftjax.generate` against full forward passes and transformers."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_decoders
from ftjax import checkpoint, generate, models, param_groups, step
from ftjax import config as config_lib
from ftjax.errors import ConfigError
from ftjax.hub import assets
from ftjax.hub import gguf as gguf_hub
from ftjax.peft import methods

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_CASES = {  # case -> (transformers family, config overrides)
    "gqa_untied": ("Llama", dict(head_dim=16)),
    "mha_tied_llama3": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                      rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                        low_freq_factor=1.0,
                                                        high_freq_factor=4.0,
                                                        original_max_position_embeddings=16))),
    "qwen2_biases": ("Qwen2", dict()),
}
_EOS = 2  # the tiny configs' eos_token_id

_SMOLLM2 = "smollm2-135m-instruct"
_QUESTION = "What is the capital of France?"
# The question in SmolLM2's chat template ("<|im_start|>system\nYou are a helpful AI
# assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n...
# <|im_end|>\n<|im_start|>assistant\n"), as the GGUF's tokenizer encodes it. Loading that
# tokenizer takes seconds; the launcher test below does, and checks the decoded answer.
_QUESTION_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
                 4649, 47, 2, 198, 1, 520, 9531, 198]
# "The capital of France is Paris.<|im_end|>"
_ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """case -> (folder, transformers model, ftjax model, params), each built once."""
  cache = {}

  def get(case):
    if case not in cache:
      family, overrides = _CASES[case]
      directory = str(tmp_path_factory.mktemp(case))
      reference = tiny_decoders.save_random(directory, family, **{**_TINY, **overrides})
      cache[case] = (directory, reference, *models.create(
          tiny_decoders.model_config(pretrained=directory), seed=0))
    return cache[case]

  return get


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, lengths):
  """Full-sequence logits of right-padded rows (the training path)."""
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  segments = (positions < lengths[:, None]).astype(jnp.int32)
  return model.apply(params, {"input_ids": ids, "positions": positions,
                              "segment_ids": segments}, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model, params, ids, positions, valid, cache):
  module = model.module(params)
  hidden, cache = module.decode(ids, positions, cache, valid=valid)
  return module.unembed(hidden), cache


@pytest.mark.parametrize("case", sorted(_CASES))
def test_prefill_and_steps_match_the_full_forward_pass(case, tiny):
  _, _, model, params = tiny(case)
  lengths, steps, padded = [9, 4, 1], 5, 12  # prompts of different lengths, left-padded
  ids = np.random.default_rng(0).integers(1, 64, (3, max(lengths) + steps)).astype(np.int32)
  expected = np.asarray(_forward(model, params, ids, np.asarray(lengths) + steps))
  prompts = np.zeros((3, padded), np.int32)
  valid = np.zeros((3, padded), bool)
  for row, n in enumerate(lengths):
    prompts[row, padded - n:], valid[row, padded - n:] = ids[row, :n], True
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  cache = model.module(params).init_cache(3, padded + steps)
  config = {**_TINY, **_CASES[case][1]}
  head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
  assert len(cache.keys) == len(cache.values) == config["num_hidden_layers"]
  assert cache.keys[0].shape == (3, padded + steps, config["num_key_value_heads"], head_dim)
  logits, cache = _decode(model, params, prompts, positions, valid, cache)
  logits = np.asarray(logits)
  worst = 0.0
  for row, n in enumerate(lengths):
    worst = max(worst, np.max(np.abs(logits[row, padded - n:] - expected[row, :n])))
  for t in range(steps):
    token = np.asarray([[ids[row, n + t]] for row, n in enumerate(lengths)], np.int32)
    position = np.asarray([[n + t] for n in lengths], np.int32)
    logits, cache = _decode(model, params, token, position, np.ones((3, 1), bool), cache)
    for row, n in enumerate(lengths):
      worst = max(worst, np.max(np.abs(np.asarray(logits)[row, 0] - expected[row, n + t])))
  assert int(cache.index) == padded + steps
  assert worst < 2e-5, worst
  assert np.max(np.abs(expected)) > 1.0  # the comparison is not of near-zero logits


def _transformers_greedy(reference, prompt, max_new_tokens):
  with torch.no_grad():
    out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=_EOS, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", ["gqa_untied", "qwen2_biases"])
def test_greedy_batch_matches_transformers_generate(case, tiny):
  _, reference, model, params = tiny(case)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 64, n).tolist() for n in (7, 3, 20)]
  ours = generate.generate(model, params, prompts, max_new_tokens=20, stop_tokens=[_EOS])
  theirs = [_transformers_greedy(reference, p, 20) for p in prompts]
  assert ours == theirs
  assert any(len(t) == 20 for t in theirs)  # at least one row runs to max_new_tokens


def _launch(*flags):
  return [sys.executable, os.path.join(REPO, "launch", "generate.py"), *flags]


@pytest.fixture(scope="module")
def launcher():
  """The launcher answering the chat question, started in the background (it loads the
  model and tokenizer and compiles for ~30 s) so it overlaps the in-process tests."""
  process = subprocess.Popen(_launch(f"--model={_SMOLLM2}", f"--prompt={_QUESTION}",
                                     "--max_new_tokens=20"),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield process
  if process.poll() is None:
    process.kill()
  process.communicate()


@pytest.fixture(scope="module")
def smollm2(launcher):
  """(model, params, transformers model) of the packaged SmolLM2-135M-Instruct GGUF.

  The transformers model gets the tensors of ftjax's GGUF reader (test_gguf checks them
  against transformers' own GGUF loader, which takes twice as long).
  """
  del launcher  # requested only to start it early
  model, params = models.create(tiny_decoders.model_config(pretrained=_SMOLLM2), seed=0)
  raw, tensors = gguf_hub.read_gguf(gguf_hub.find_gguf(assets.model_dir(_SMOLLM2)))
  reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).eval()
  missing, unexpected = reference.load_state_dict(
      {name: torch.from_numpy(value) for name, value in tensors.items()}, strict=False)
  assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
  reference.tie_weights()
  return model, params, reference


def test_smollm2_greedy_chat_answer_matches_transformers(smollm2):
  model, params, reference = smollm2
  ours = generate.generate(model, params, [_QUESTION_IDS], max_new_tokens=20,
                           stop_tokens=[_EOS])
  assert ours == [_transformers_greedy(reference, _QUESTION_IDS, 20)]
  assert ours == [_ANSWER_IDS]


def _first_new_token(tokens):
  """(index, token) of the first token that did not occur earlier in `tokens`, past index 2."""
  return next((i, t) for i, t in enumerate(tokens) if i > 2 and t not in tokens[:i])


def _cut(tokens, stop):
  return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


def test_stop_tokens_end_rows_that_stay_independent_of_the_batch(tiny):
  _, _, model, params = tiny("gqa_untied")
  rng = np.random.default_rng(2)
  short, long = rng.integers(3, 64, 3).tolist(), rng.integers(3, 64, 14).tolist()
  alone = generate.generate(model, params, [short], max_new_tokens=12)[0]
  both = generate.generate(model, params, [short, long], max_new_tokens=12)
  assert len(alone) == 12 and both[0] == alone
  index, stop = _first_new_token(alone)
  stopped = generate.generate(model, params, [short, long], max_new_tokens=12,
                              stop_tokens=[stop, 1])
  assert stopped[0] == alone[:index + 1]  # ends with the stop token, as in transformers
  assert stopped[1] == _cut(_cut(both[1], stop), 1)
  # Once every row has stopped, the loop ends: both rows stop at their first token here.
  firsts = [tokens[0] for tokens in both]
  assert generate.generate(model, params, [short, long], max_new_tokens=12,
                           stop_tokens=firsts) == [[t] for t in firsts]


def test_sampling_is_seeded_and_top_k_1_or_a_tiny_nucleus_is_greedy(tiny):
  _, _, model, params = tiny("gqa_untied")
  prompts = [[5, 17, 42], [9, 33, 7, 1, 60]]
  sample = functools.partial(generate.generate, model, params, prompts, max_new_tokens=16)
  first = sample(temperature=1.0, seed=0)
  assert sample(temperature=1.0, seed=0) == first
  assert sample(temperature=1.0, seed=1) != first
  greedy = sample()
  assert first != greedy
  assert sample(temperature=1.0, top_k=1, seed=3) == greedy
  assert sample(temperature=0.7, top_p=1e-6, seed=4) == greedy
  assert sample(temperature=1e-4, seed=5) == greedy


def _kept(logits, **kwargs):
  return np.isfinite(np.asarray(generate.filter_logits(jnp.asarray(logits), **kwargs)))


def test_filter_logits_keeps_the_top_k_and_then_the_nucleus():
  logits = np.log(np.asarray([0.05, 0.5, 0.15, 0.3], np.float32))
  assert _kept(logits).all()
  assert _kept(logits, top_p=0.3).tolist() == [False, True, False, False]
  assert _kept(logits, top_p=0.75).tolist() == [False, True, False, True]
  assert _kept(logits, top_p=0.85).tolist() == [False, True, True, True]
  assert _kept(logits, top_p=0.99).all()
  assert _kept(logits, top_k=2).tolist() == [False, True, False, True]
  # Top-p applies to the renormalised top-k: 0.5 / 0.8 = 0.625 >= 0.6 is the whole nucleus.
  assert _kept(logits, top_k=2, top_p=0.6).tolist() == [False, True, False, False]
  # Rows are filtered independently; a traced top_p needs `nucleus=True`.
  rows = np.stack([logits, logits[::-1]])
  traced = jax.jit(lambda x, p: generate.filter_logits(x, top_p=p, nucleus=True))
  np.testing.assert_array_equal(np.isfinite(traced(rows, 0.75)),
                                [[False, True, False, True], [True, False, True, False]])


def test_one_compile_per_bucket_and_sampling_mode(tiny, caplog):
  _, _, model, params = tiny("gqa_untied")
  run = functools.partial(generate.generate, model, params)
  assert [generate.bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  run([[3] * 5, [4] * 2], max_new_tokens=10)  # compiles greedy decoding
  run([[3] * 5, [4] * 2], max_new_tokens=10, temperature=0.5, top_p=0.9)  # and top-p sampling
  jax.config.update("jax_log_compiles", True)
  try:  # other prompts, lengths, stop tokens and settings in the same buckets
    run([[4] * 16, [5] * 9], max_new_tokens=16, stop_tokens=[7, 8, 9])
    run([[5] * 2, [1]], max_new_tokens=1, pad_id=3)
    run([[3] * 5, [6] * 3], max_new_tokens=12, temperature=0.9, top_p=0.5, seed=7,
        stop_tokens=[3])
    run([[3] * 17, [2]], max_new_tokens=10)  # a longer prompt bucket: one more program
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r.getMessage() for r in caplog.records
              if "Compiling" in r.getMessage() and "_generate" in r.getMessage()]
  assert len(compiles) == 1, compiles


def test_bfloat16_cache_and_bad_settings(tiny):
  _, _, model, params = tiny("gqa_untied")
  low = step.cast_floats(params, jnp.bfloat16)
  assert model.module(low).init_cache(1, 8).keys[0].dtype == jnp.bfloat16
  tokens = generate.generate(model, params, [[5, 17, 42]], max_new_tokens=4,
                             compute_dtype=jnp.bfloat16)
  assert len(tokens[0]) == 4 and all(0 <= t < 64 for t in tokens[0])
  for kwargs, message in [(dict(max_new_tokens=0), "max_new_tokens=0"),
                          (dict(temperature=-1.0), "temperature=-1.0"),
                          (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
                          (dict(top_k=-2), "top_k=-2")]:
    with pytest.raises(ConfigError, match=message):
      generate.generate(model, params, [[1]], **{"max_new_tokens": 2, **kwargs})
  with pytest.raises(ConfigError, match="at least one token"):
    generate.generate(model, params, [[1], []], max_new_tokens=2)


def test_a_lora_run_generates_with_its_adapters_merged(tiny, tmp_path):
  directory, _, _, _ = tiny("qwen2_biases")
  config = config_lib.defaults()
  config.model = tiny_decoders.model_config(pretrained=directory)
  config.peft.update(method="lora", target=r".*self_attn/(q|v)_proj/kernel", rank=2,
                     alpha=4.0, dropout=0.0, quantize="")
  config.checkpoint.update(max_to_keep=1, use_async=False)
  model, params = models.create(config.model, seed=0)
  model, params = methods.adapt(config, model, params, seed=0)
  trainable, frozen = methods.split(config, model, params)
  rng = np.random.default_rng(0)
  trained = param_groups.map_with_path(  # as if training had moved the adapters
      lambda p, x: np.asarray(x) + rng.normal(0.0, 0.5, x.shape).astype(np.float32)
      if "lora_b" in p else np.asarray(x), trainable)
  checkpointer = checkpoint.Checkpointer(str(tmp_path), config.checkpoint)
  checkpointer.save_best(1, trained)
  checkpointer.close()
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

  model_config, merged, merged_params, dtype = generate.load_model(workdir=str(tmp_path))
  assert (model_config.pretrained, dtype) == (directory, "float32")
  assert not any("lora" in p for p in param_groups.flatten(merged_params))
  prompt = [5, 17, 42, 8]
  ours = generate.generate(merged, merged_params, [prompt], max_new_tokens=6)[0]
  # The adapted (unmerged) model's greedy continuation, one full forward pass per token.
  adapted = param_groups.combine(trained, frozen)
  tokens = list(prompt)
  for _ in range(6):
    ids = np.zeros((1, 16), np.int32)
    ids[0, :len(tokens)] = tokens
    logits = _forward(model, adapted, ids, np.asarray([len(tokens)]))
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  assert ours == tokens[len(prompt):]
  # The adapted model generates the same without merging (as the trainer's samples do).
  assert generate.generate(model, adapted, [prompt], max_new_tokens=6)[0] == ours
  base = generate.generate(*generate.load_model(pretrained=directory)[1:3], [prompt],
                           max_new_tokens=6)[0]
  assert base != ours  # the adapters matter
  with pytest.raises(ConfigError, match="either a workdir or a pretrained"):
    generate.load_model()


def test_launcher_prints_the_answer_to_a_chat_prompt(launcher):
  stdout, stderr = launcher.communicate(timeout=600)
  assert launcher.returncode == 0, stderr[-2000:]
  assert stdout.splitlines() == [f"> {_QUESTION}", "The capital of France is Paris."]


def test_launcher_reports_a_bad_workdir_in_one_line(tmp_path):
  result = subprocess.run(_launch(f"--workdir={tmp_path}", "--prompt=hi"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {tmp_path}/config.json not found: is {tmp_path} a training workdir?"]

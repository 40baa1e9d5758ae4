r"""Generates text: `python launch/generate.py --model=NAME --prompt="..."`.

The model is a packaged pretrained one (`--model=smollm2-135m-instruct`, or a
Hugging Face checkpoint folder) or a fine-tuned run (`--workdir=DIR`: its best
parameters, with LoRA / DoRA / QLoRA adapters merged into the base weights).
With --chat (the default) each prompt is sent as a user message through the
tokenizer's chat template; --nochat continues the raw text. Generation stops at
the tokenizer's end-of-sequence token or after --max_new_tokens; a temperature
of 0 (the default) is greedy decoding.

Each prompt is printed after "> ", followed by its answer.
"""

import sys
import time
from typing import Any

import jax.numpy as jnp
from absl import app, flags

from ftjax import cli, generate, runs
from ftjax.data import lm, tokenizer as tokenizer_lib
from ftjax.errors import ConfigError
from ftjax.hub import assets

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir (its best "
                               "parameters, adapters merged).")
_MODEL = flags.DEFINE_string("model", None, "A packaged pretrained model's name, or a "
                             "Hugging Face checkpoint folder (no fine-tuning).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for a batch.")
_CHAT = flags.DEFINE_bool("chat", True, "Send each prompt as a user message through the "
                          "tokenizer's chat template.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "The most tokens generated "
                                       "per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the nucleus of this probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                                   "Compute dtype; by default the run's (--workdir) or "
                                   "float32.")
flags.mark_flags_as_required(["prompt"])
flags.mark_flags_as_mutual_exclusive(["workdir", "model"], required=True)


def _tokenizer(workdir: str | None, model: str | None) -> Any:
  """The transformers tokenizer of the run's (or the pretrained model's) folder."""
  if workdir:
    config = runs.load_config(workdir)
    model = config.data.tokenizer or config.model.pretrained
    if not model:
      raise ConfigError(f"{workdir}: the run names neither config.data.tokenizer nor "
                        "config.model.pretrained, so it has no tokenizer")
  return tokenizer_lib.load_hf_tokenizer(assets.model_dir(model))


def _generate() -> None:
  _, model, params, dtype = generate.load_model(workdir=_WORKDIR.value, pretrained=_MODEL.value)
  tokenizer = _tokenizer(_WORKDIR.value, _MODEL.value)
  if _CHAT.value and not getattr(tokenizer, "chat_template", None):
    raise ConfigError(f"the tokenizer of {_WORKDIR.value or _MODEL.value} has no chat "
                      "template: pass --nochat to continue the prompt as raw text")
  if _CHAT.value:
    formatter = lm.ChatFormatter(tokenizer)
    prompts = [formatter.prompt_ids([{"role": "user", "content": text}])
               for text in _PROMPT.value]
  else:
    prompts = [tokenizer.encode(text) for text in _PROMPT.value]
  stop = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  start = time.perf_counter()
  answers = generate.generate(
      model, params, prompts, max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      stop_tokens=stop, pad_id=tokenizer.pad_token_id or 0, seed=_SEED.value,
      compute_dtype=jnp.dtype(_COMPUTE_DTYPE.value or dtype))
  seconds = time.perf_counter() - start
  for text, answer in zip(_PROMPT.value, answers):
    print(f"> {text}")
    print(tokenizer.decode(answer, skip_special_tokens=True).strip())
  tokens = sum(len(a) for a in answers)
  print(f"{tokens} tokens in {seconds:.1f} s, compilation included", file=sys.stderr)


if __name__ == "__main__":
  app.run(cli.main(_generate))

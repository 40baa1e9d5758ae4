r"""python launch/train.py --config=configs/smollm2_chat.py --workdir=/tmp/ftjax/smollm2_chat

Instruction-tunes SmolLM2-135M-Instruct (Llama family, read from its llama.cpp
GGUF file) on chit-chat conversations (chitchat-dataset) and question/answer
pairs (chatterbot-corpus), formatted with the model's own chat template; the
loss counts assistant tokens only. Conversations are packed into rows of
`max_length` tokens; attention never crosses conversations.

Variants through the arg string, e.g. `configs/smollm2_chat.py:full,lr=2e-5`:
  debug           a few steps on a few short rows with a tiny randomly initialised model
                  of the same family, vocabulary and tokenizer: an end-to-end run in seconds.
  peft=...        lora (default), full, qlora (LoRA on an NF4-quantized base), dora.
  lr=...          peak learning rate (default: 2e-5 full, 2e-4 LoRA / QLoRA / DoRA).
  steps=...       optimizer steps (default 200), or epochs=...
  freeze=...      none (default) or all_but_head.
  batch_size=...  rows per step.
  max_length=...  tokens per packed row.
  rank=...        LoRA rank (alpha = 2 * rank).
  dtype=...       compute dtype: float32 or bfloat16 (weights stay float32).
  remat=...       none, full, dots_saveable or a named policy such as save_dot_except_mlp
                  (recompute blocks in the backward pass; config.model.remat).
  seed=...        seeds packing order, shuffling, LoRA initialisation and sampling.
"""

import ml_collections

from ftjax.config import ARGS, apply_args, defaults, parse_arg

_DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "dora": 2e-4}
# Every projection of every block (the QLoRA paper's choice).
_PROJECTIONS = ".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


# The debug variants' tiny randomly initialised decoder: SmolLM2's family and vocabulary.
DEBUG_ARCH = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True)
# The arg words of the SmolLM2 configs.
ARG_WORDS = {**ARGS, "peft": "lora", "remat": "none"}


def language_model_config(arg: str | None, *, data_name: str, max_length: int = 512
                          ) -> ml_collections.ConfigDict:
  """The SmolLM2 fine-tuning config on `data_name` ("chat", "shakespeare" or a file
  format); `max_length`: the default of the arg word."""
  given = {item.partition("=")[0].strip() for item in (arg or "").split(",")}
  arg = parse_arg(arg, **ARG_WORDS, max_length=max_length)
  config = defaults()
  config.task = "causal_lm"
  config.model.name = "llama_lm"
  config.model.pretrained = "smollm2-135m-instruct"  # a packaged model name or a folder
  config.model.remat = arg.remat
  config.data.name = data_name
  config.data.split = (0.9, 0.05, 0.05)
  config.data.max_length = arg.max_length
  config.data.max_eval_examples = 96
  config.peft.target = _PROJECTIONS
  config.peft.quantize = ".*layers/.*/kernel"
  config.batch_size = 8
  config.eval_batch_size = 8
  config.total_steps = 200
  config.optimizer.lr = _DEFAULT_LR.get(arg.peft, _DEFAULT_LR["lora"])
  config.optimizer.weight_decay = 0.0
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_factor = 0.1
  config.log_every = 5
  config.eval_at_start = True  # validation of the pretrained model, as step 0
  config.early_stopping.metric = "loss"
  config.early_stopping.mode = "min"
  config.early_stopping.patience = 0
  config.checkpoint.every = 50
  apply_args(config, arg)
  steps = config.total_steps or 200  # epochs=...: about as many
  config.optimizer.warmup_steps = max(1, steps // 10)
  config.eval_every = max(1, steps // 2)

  if arg.debug:
    config.model.pretrained = ""
    config.model.arch = DEBUG_ARCH
    config.data.tokenizer = "smollm2-135m-instruct"
    if "max_length" not in given:  # a max_length= given still chooses
      config.data.max_length = 128
    config.data.max_train_examples = 64
    config.data.max_eval_examples = 8
    config.batch_size = 8
    config.eval_batch_size = 8
    if not (arg.steps or arg.epochs):  # steps= / epochs= still choose
      config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint.every = 2
    config.samples.count = 1
    config.samples.max_new_tokens = 4
  config.lock()
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return language_model_config(arg, data_name="chat")

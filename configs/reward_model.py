r"""python launch/train.py --config=configs/reward_model.py --workdir=/tmp/ftjax/reward \
  --config.data.files.train=pairs.jsonl

Trains a reward model on preference pairs: a sequence classifier with one output
(the reward) scores the chosen and the rejected completion of each pair, with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected); evaluated by pairwise
accuracy (how often the chosen completion scores higher) and the mean rewards
and margins. Pairs are read as for preference tuning (TRL's prompt / chosen /
rejected rows, the prompt optional, or OpenAI's preference JSONL; here as
strings): each side is the text pair (prompt, completion) for the model's
tokenizer. The trained model exports to transformers'
`*ForSequenceClassification` with `num_labels=1` (`launch/export.py`).

Variants through the arg string, e.g. `configs/reward_model.py:model=smollm2,peft=lora`:
  model=...       minilm (default: all-MiniLM-L6-v2, an encoder, mean-pooled) or smollm2
                  (SmolLM2-135M-Instruct, a decoder scoring the last token), or a
                  Hugging Face folder through --config.model.pretrained with
                  --config.model.name=auto.
  debug           a few steps with a small randomly initialised encoder: seconds.
  max_length=...  tokens per (prompt, completion) text pair (default 128; debug 32).
  and the shared words: peft, lr, steps / epochs, batch_size, rank, dtype, seed, freeze.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import smollm2_chat  # pylint: disable=g-import-not-at-top,wrong-import-position
from ftjax.config import ARGS, apply_args, defaults, parse_arg  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODELS = {
    # A new scalar head on each (a causal LM's checkpoint has none: it starts new anyway).
    "minilm": dict(name="bert_classifier", pretrained="minilm-l6", pooling="mean",
                   dont_load=("head/.*",)),
    "smollm2": dict(name="decoder_classifier", pretrained="smollm2-135m-instruct"),
}
_DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "bitfit": 1e-3}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, **ARGS, model="minilm", max_length=0)
  if arg.model not in _MODELS:
    raise ValueError(f"config arg model={arg.model!r}: one of {sorted(_MODELS)}")
  config = defaults()
  config.task = "reward"
  config.model.update(_MODELS[arg.model])
  config.model.num_classes = 1
  config.data.name = "json"
  config.data.max_length = arg.max_length or (32 if arg.debug else 128)
  config.data.split = (0.9, 0.05, 0.05)
  config.batch_size = 16
  config.eval_batch_size = 32
  config.total_steps = 300
  config.optimizer.lr = _DEFAULT_LR.get(arg.peft, _DEFAULT_LR["full"])
  config.eval_every = 100
  config.checkpoint.every = 100
  config.eval_at_start = True
  # The loss, not the pairwise accuracy, which a small validation split saturates.
  config.early_stopping.metric = "loss"
  config.early_stopping.mode = "min"
  apply_args(config, arg)
  config.optimizer.warmup_steps = max(1, (config.total_steps or 300) // 10)
  if arg.debug:
    config.model.pretrained = ""
    config.data.tokenizer = "minilm-l6" if arg.model == "minilm" else "smollm2-135m-instruct"
    config.model.arch = (dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128,
                              max_position_embeddings=512) if arg.model == "minilm" else
                         smollm2_chat.DEBUG_ARCH)
    config.data.buckets = "off"
    config.batch_size = arg.batch_size or 4
    config.eval_batch_size = config.batch_size
    if not (arg.steps or arg.epochs):  # steps= / epochs= still choose
      config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint.every = 2
  config.lock()
  return config

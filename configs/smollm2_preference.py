r"""python launch/train.py --config=configs/smollm2_preference.py --workdir=/tmp/ftjax/dpo \
  --config.data.files.train=pairs.jsonl

Preference-tunes SmolLM2-135M-Instruct (LoRA by default) on pairs of a chosen and
a rejected completion of a prompt: TRL's `prompt` / `chosen` / `rejected` rows
(strings or message lists; without `prompt`, the prompt is what chosen and
rejected share at the start) or OpenAI's preference JSONL (`input.messages`,
`preferred_output`, `non_preferred_output`), in JSON Lines / JSON, CSV, TSV or
Parquet files. Conversations are rendered with the model's chat template. The
validation and test pairs are cut from the training file by
`config.data.split` unless `config.data.files.validation` / `.test` name files.

DPO and IPO compare with the reference model, the model as training starts:
its log-probabilities of every pair are computed once before the first step
and kept in the run folder (a resumed run reads them back); no second copy of
the model is held. Metrics are TRL's: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (and ORPO's
nll_loss), in training and validation.

Variants through the arg string, e.g. `configs/smollm2_preference.py:loss=simpo,beta=2`:
  loss=...        dpo (default), ipo, simpo or orpo (config.preference.loss).
  beta=...        the loss's beta (default 0.1; ORPO: the odds-ratio term's weight).
  gamma=...       SimPO's target margin (default 0.5).
  smoothing=...   DPO / SimPO label smoothing (conservative DPO), default 0.
  debug           a few steps on short pairs with a tiny randomly initialised model of
                  the same family, vocabulary and tokenizer: an end-to-end run in seconds.
  and the words of configs/smollm2_chat.py (peft, lr, steps / epochs, batch_size,
  max_length: tokens per sequence, rank, dtype, remat, seed).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import smollm2_chat  # pylint: disable=g-import-not-at-top,wrong-import-position
from ftjax.config import parse_arg  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORDS = dict(loss="dpo", beta=0.1, gamma=0.5, smoothing=0.0)
# Preference tuning moves a model less than instruction tuning does (TRL's DPO default is
# 1e-6 for full fine-tuning); LoRA takes larger steps of its few parameters.
_DEFAULT_LR = {"full": 1e-6, "lora": 5e-5, "qlora": 5e-5, "dora": 5e-5}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  items = [item for item in (arg or "").split(",") if item.strip()]
  given = {item.partition("=")[0].strip() for item in items}
  own = [item for item in items if item.partition("=")[0].strip() in _WORDS]
  words = parse_arg(",".join(own), **_WORDS)
  rest = ",".join(item for item in items if item not in own)
  config = smollm2_chat.language_model_config(rest, data_name="json", max_length=256)
  chat_words = parse_arg(rest, **smollm2_chat.ARG_WORDS, max_length=256)
  with config.unlocked():
    config.task = "preference"
    config.preference.loss = words.loss
    config.preference.beta = words.beta
    config.preference.simpo_gamma = words.gamma
    config.preference.label_smoothing = words.smoothing
    if not chat_words.lr:
      config.optimizer.lr = _DEFAULT_LR.get(chat_words.peft, _DEFAULT_LR["lora"])
    # No adapter dropout (TRL's DPOTrainer disables dropout too): the policy is compared
    # with a reference computed without it, and at the start the two are equal.
    config.peft.dropout = 0.0
    config.early_stopping.metric = "loss"
    config.early_stopping.mode = "min"
    if chat_words.debug:
      config.data.max_length = chat_words.max_length if "max_length" in given else 64
      config.data.max_train_examples = 0
      config.data.max_eval_examples = 8
      config.batch_size = chat_words.batch_size or 4
      config.eval_batch_size = config.batch_size
  config.lock()
  return config

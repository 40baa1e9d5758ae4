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
  steps=...       optimizer steps.
  batch_size=...  rows per step.
  max_length=...  tokens per packed row.
  rank=...        LoRA rank (alpha = 2 * rank).
  dtype=...       compute dtype: float32 or bfloat16 (weights stay float32).
  remat=...       none, full or dots_saveable (recompute blocks in the backward pass).
  seed=...        seeds packing order, shuffling, LoRA initialisation and sampling.
"""

import ml_collections

from ftjax import sharding, trackers
from ftjax.config import parse_arg

_DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "dora": 2e-4}
# Every projection of every block (the QLoRA paper's choice).
_PROJECTIONS = ".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def language_model_config(arg: str | None, *, data_name: str, default_steps: int
                          ) -> ml_collections.ConfigDict:
  """The SmolLM2 fine-tuning config on `data_name` ("chat" or "shakespeare")."""
  arg = parse_arg(arg, debug=False, peft="lora", lr=0.0, steps=default_steps, batch_size=8,
                  max_length=512, rank=8, dtype="float32", remat="none", seed=0)
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.task = "causal_lm"
  config.loss_chunk = 1024  # tokens of logits at a time (0: all at once)

  config.model = ml_collections.ConfigDict()
  config.model.name = "llama_lm"
  config.model.pretrained = "smollm2-135m-instruct"  # a packaged model name or a folder
  config.model.dont_load = []
  config.model.remat = arg.remat
  config.model.arch = {}  # HF config fields of a randomly initialised model (no pretrained)

  config.data = ml_collections.ConfigDict()
  config.data.name = data_name
  config.data.data_dir = "~/.cache/ftjax/tensorflow_datasets"
  config.data.source_path = ""  # empty: the files shipped in the data packages
  # Your own files instead (config.data.name = json | csv | tsv | parquet): paths, globs or
  # comma-separated lists; a split without a file is cut from train by `split`. The
  # first training row's columns choose the format: messages (OpenAI chat), prompt and
  # completion (only the completion trained), or text (every token trained).
  config.data.files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
  config.data.columns = ml_collections.ConfigDict({
      "messages": "messages", "prompt": "prompt", "completion": "completion", "text": "text"})
  config.data.split = (0.9, 0.05, 0.05)
  # Further evaluation sets, evaluated at every evaluation and reported under their names:
  # packaged data sets (their validation split, e.g. ("shakespeare",): general text while
  # chat-tuning) or '<format>:<files>' (every row, e.g. "json:heldout_chats.jsonl").
  config.data.extra_eval = ()
  config.data.tokenizer = ""  # empty: the model's own tokenizer (and chat template)
  config.data.max_length = arg.max_length
  config.data.overlong = "split"  # chat longer than a row: split | truncate | skip | error
  config.data.max_train_examples = 0  # > 0: train on the first N examples only
  config.data.max_eval_examples = 96  # > 0: evaluate on the first N of each split only

  config.trainable = []
  config.freeze = "none"
  config.freeze_blocks = 0
  config.peft = ml_collections.ConfigDict()
  config.peft.method = arg.peft
  config.peft.target = _PROJECTIONS
  config.peft.rank = arg.rank
  config.peft.alpha = 2.0 * arg.rank
  config.peft.dropout = 0.05
  config.peft.rslora = False
  config.peft.quant = "nf4"
  config.peft.quant_block = 64
  config.peft.double_quant = False
  config.peft.quantize = ".*layers/.*/kernel"

  config.batch_size = arg.batch_size
  config.eval_batch_size = 8
  config.num_epochs = 1
  config.total_steps = arg.steps
  config.grad_accum_steps = 1
  config.compute_dtype = arg.dtype
  # Device mesh: sizes of the data, fsdp and tensor axes (-1: the remaining devices),
  # and which mesh axes each logical axis of the parameters and batch is split over.
  config.mesh = sharding.default_mesh_config()
  config.axis_rules = list(sharding.DEFAULT_RULES)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.lr = arg.lr or _DEFAULT_LR.get(arg.peft, _DEFAULT_LR["lora"])
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.wd_mults = [(".*/bias", 0.0), (".*norm/scale", 0.0), (".*", 1.0)]
  config.optimizer.lr_mults = [(".*", 1.0)]
  config.optimizer.layer_decay = 1.0
  config.optimizer.unfreeze_every = 0
  config.optimizer.warmup_steps = max(1, arg.steps // 10)
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_factor = 0.1
  config.optimizer.clip_norm = 1.0

  config.log_every = 5
  # A NaN or infinite loss or gradient norm: "stop" (an error naming the step) or "skip"
  # the update, at most max_nonfinite_skips times. The state never takes such a step.
  config.on_nonfinite = "stop"
  config.max_nonfinite_skips = 10
  config.eval_every = max(1, arg.steps // 2)
  config.eval_at_start = True  # validation of the pretrained model, as step 0

  config.samples = ml_collections.ConfigDict()
  config.samples.count = 3  # completions of validation prompts written at each evaluation
  config.samples.max_new_tokens = 32
  config.samples.prompt_tokens = 32  # text data: continue the first N tokens of a passage

  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = "loss"
  config.early_stopping.mode = "min"
  config.early_stopping.patience = 0
  config.early_stopping.min_delta = 0.0

  # Where metrics go besides metrics.jsonl: "tensorboard", "wandb", "mlflow" (settings in
  # config.tracking; empty ones leave them to the library and its environment variables).
  config.trackers = ("jsonl", "tensorboard")
  config.tracking = trackers.default_config()

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 50
  config.checkpoint.max_to_keep = 2
  config.checkpoint.use_async = True

  if arg.debug:
    config.model.pretrained = ""
    config.model.arch = dict(vocab_size=49152, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, tie_word_embeddings=True)
    config.data.tokenizer = "smollm2-135m-instruct"
    config.data.max_length = 128
    config.data.max_train_examples = 64
    config.data.max_eval_examples = 8
    config.batch_size = 8
    config.eval_batch_size = 8
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
  return language_model_config(arg, data_name="chat", default_steps=200)

r"""python launch/train.py --config=configs/minilm_sentiment.py --workdir=/tmp/ftjax/minilm_sentiment

Fine-tunes all-MiniLM-L6-v2 (BERT family, 22.7M parameters) on Rotten Tomatoes
critic snippets (fresh vs rotten), with a new zero-initialised linear head on the
mean-pooled encoder output. Also the 3-class `tweets` sentiment data, or both as
one multi-task run (one encoder, a head per task), or one after the other
(continual fine-tuning: `init_from` a finished run, with L2-SP, EWC or replay
against forgetting).

Variants through the arg string, e.g. `configs/minilm_sentiment.py:debug,lr=1e-4`:
  data=...        rotten_tomatoes (default), tweets, or rotten_tomatoes+tweets:
                  multi-task, examples mixed in proportion to the tasks' sizes
                  (`--config.data.mixing=weights --config.data.weights="(1, 2)"`
                  to choose the mix; a weight of 0 evaluates a task without
                  training on it). Or your own labelled texts: csv, tsv, json
                  (JSON Lines or an array) or parquet, with
                  `--config.data.files.train=FILE` (and .validation, .test; else
                  cut from train by config.data.split), the columns in
                  config.data.columns (text, text_pair, label) and the classes
                  taken from the data (or config.data.labels). A file as a task
                  of a multi-task run: `data=tweets+csv:tickets.csv`.
  init_from=DIR   start from the best weights of the finished run in DIR (same
                  model and method): a second stage of continual fine-tuning.
  regularizer=... none (default), l2sp (toward the starting weights) or ewc (the
                  same, weighted by the diagonal Fisher information of the
                  `fisher_task` data at the start), with strength=...
  debug           12 steps on short sequences, evaluated on 128 examples per split:
                  an end-to-end run in seconds.
  short           150 steps of 32-token texts, evaluated every 50 steps on the whole
                  validation split: the CPU-sized setting of the studies in experiments/.
  lr=...          peak learning rate (default: 5e-5 for full fine-tuning, 5e-4 for
                  LoRA / DoRA, 1e-3 for BitFit and the linear probe).
  epochs=...      number of epochs (default 1), or steps=... optimizer steps.
  batch_size=...  global batch size.
  max_length=...  tokens per example (pad/truncate).
  seed=...        seeds initialisation, shuffling and dropout.
  dtype=...       compute dtype: float32 or bfloat16 (weights stay float32).
  peft=...        full (default), lora, dora, qlora (LoRA on a quantized base) or bitfit
                  (biases and the head).
  quant=...       QLoRA storage: nf4 (default) or int8.
  rank=...        LoRA / DoRA rank (alpha = 2 * rank); rslora: alpha / sqrt(rank) scaling.
  freeze=all_but_head   a linear probe: only the new head trains.
  freeze_blocks=k       freeze the embeddings and the bottom k blocks.
  llrd=...        layer-wise learning-rate decay: lr * llrd**depth from the top.
  unfreeze_every=K      gradual unfreezing: one more block from the top every K steps.
"""

import ml_collections

from ftjax.config import ARGS, apply_args, defaults, parse_arg
from ftjax.data import mixture, registry
from ftjax.errors import ConfigError


# Peak learning rates per method: small updates of everything, larger ones of few parameters.
_DEFAULT_LR = {"none": 5e-5, "lora": 5e-4, "dora": 5e-4, "qlora": 5e-4, "bitfit": 1e-3, "all_but_head": 1e-3}


def _class_count(data: str) -> int:
  """The classes of packaged data sets (a multi-task run's together); 0 (from the data)
  when a data set is files.

  Raises:
    ConfigError: for a name that is neither text classification data nor files.
  """
  presets = {name: preset for name, preset in registry.presets().items()
             if preset.kind == "classification"}
  names = mixture.task_names(data)
  unknown = [name for name in names if name not in presets and not registry.is_files(name)]
  if unknown:
    raise ConfigError(f"config arg data={data!r}: {unknown} not text classification data; "
                      f"choose from {sorted(presets)}, a file format {list(registry.FORMATS)} "
                      "or '<format>:<files>'")
  if any(registry.is_files(name) for name in names):
    return 0
  return sum(len(presets[name].class_names) for name in names)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, **ARGS, short=False, max_length=64, freeze_blocks=0, rslora=False,
                  quant="nf4", llrd=1.0, unfreeze_every=0, data="rotten_tomatoes",
                  init_from="", regularizer="none", strength=0.0)
  config = defaults()
  config.model.pretrained = "minilm-l6"  # a packaged model name or a local HF folder
  config.model.num_classes = _class_count(arg.data)
  config.model.pooling = "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
  config.model.dont_load = ("head/.*",)  # the new head
  # A randomly initialised encoder when `pretrained` is empty: MiniLM-L6's sizes (e.g.
  # --config.model.arch.hidden_size=768 for BERT-base).
  config.model.arch = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536,
                           max_position_embeddings=512)
  config.data.name = arg.data
  config.data.max_length = arg.max_length
  config.freeze_blocks = arg.freeze_blocks
  config.peft.rslora = arg.rslora
  config.peft.quant = arg.quant
  config.init_from = arg.init_from
  config.regularizer.kind = arg.regularizer
  config.regularizer.strength = arg.strength
  config.optimizer.lr = _DEFAULT_LR.get(arg.peft if arg.peft != "full" else arg.freeze,
                                        _DEFAULT_LR["none"])
  config.optimizer.layer_decay = arg.llrd
  config.optimizer.unfreeze_every = arg.unfreeze_every
  apply_args(config, arg)

  if arg.short:
    config.data.max_length = 32
    config.total_steps = 150
    config.optimizer.warmup_steps = 15
    config.eval_every = 50
    config.checkpoint.every = 50
  if arg.debug:
    config.data.max_length = 32
    config.data.buckets = "off"  # a run of seconds: one compiled shape beats a shorter pad
    config.data.packing = "off"
    config.data.max_eval_examples = 128
    config.batch_size = 8
    config.eval_batch_size = 64
    if not (arg.steps or arg.epochs):  # steps= / epochs= still choose
      config.total_steps = 12
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 6
    config.checkpoint.every = 4
  config.lock()
  return config

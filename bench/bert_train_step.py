r"""python bench/bert_train_step.py

Train-step throughput of the MiniLM-L6 full fine-tune (the packaged
all-MiniLM-L6-v2, 22.7M parameters; batch 32, sequence length 128, 2 classes):
ftjax versus Hugging Face transformers' PyTorch `BertModel`, on the same weights
and the same machine.

Both sides do the same work per step: the BERT encoder with dropout on (train
mode), mean pooling over the attention mask, dropout, a new zero-initialised
linear head, softmax cross-entropy, backward, global-norm clipping to 1.0, AdamW
(no weight decay on biases and LayerNorm scales) with a linear warmup/decay
learning rate.

* ftjax: the train step the trainer compiles (`ftjax.step.train_step` over the
  model, optimizer and schedule built from `configs/minilm_sentiment.py`),
  jitted with the state donated; timing ends with `block_until_ready`.
* torch: `BertModel.from_pretrained(<packaged folder>, add_pooling_layer=False)`
  + `nn.Dropout` + `nn.Linear`, `torch.optim.AdamW`, `clip_grad_norm_(1.0)`,
  `zero_grad(set_to_none=True)`; float32, eager, `torch.set_num_threads(--threads)`.

Runs are interleaved: after compilation and `--warmup` steps of each, every
round times `--steps` steps of each configuration in turn (ftjax, torch,
[ftjax bfloat16]), for `--rounds` rounds. The table gives the median over rounds
of steps/s, examples/s and the ratio to torch. Both sides train on one batch of
random token ids (fixed seed, full attention mask).

The headline comparison is float32 on both sides; `--bf16` (default on) adds a
row for ftjax with `compute_dtype=bfloat16` (weights and optimizer stay float32).

JAX_PLATFORMS defaults to `cpu` when it is unset and the machine has no NVIDIA
device; set it (e.g. `JAX_PLATFORMS=cuda`) to choose. Torch runs on CUDA only when
JAX does and torch has CUDA.

Flags: --rounds, --steps, --warmup, --batch_size, --seq_len, --threads,
--bf16/--no-bf16, --seed.
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

if "JAX_PLATFORMS" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
  os.environ["JAX_PLATFORMS"] = "cpu"

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from configs import minilm_sentiment  # noqa: E402
from ftjax import models, optim, step as step_lib  # noqa: E402
from ftjax import state as state_lib  # noqa: E402
from ftjax.hub import assets  # noqa: E402

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Long enough that the timed steps stay inside the schedule (warmup, then decay).
_SCHEDULE_STEPS = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name; None reads sys.argv.

  Returns:
    The parsed flags.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
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


class FtjaxBench:
  """The ftjax train step, compiled as the trainer compiles it, with its own state."""

  def __init__(self, config: Any, model: models.Model, params: Any,
               batch: dict[str, np.ndarray], compute_dtype: str):
    self.tx, self.schedule = optim.make_optimizer(config.optimizer, params, _SCHEDULE_STEPS)
    train = functools.partial(step_lib.train_step, model=model, tx=self.tx,
                              schedule=self.schedule, grad_accum_steps=1,
                              compute_dtype=_DTYPES[compute_dtype])
    # A private copy: the state is donated, and the params are shared between configurations.
    self.state = state_lib.create(jax.tree.map(jnp.array, params), self.tx, config.seed)
    self.batch = jax.device_put(batch)
    started = time.perf_counter()
    self.frozen = {}  # a full fine-tune: every parameter is trainable
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


class TorchBench:
  """A transformers BertModel fine-tune step with torch.optim.AdamW."""

  def __init__(self, config: Any, model_dir: str, batch: dict[str, np.ndarray],
               device: torch.device, seed: int):
    torch.manual_seed(seed)
    self.device = device
    self.model = TorchClassifier(model_dir, config.model.num_classes,
                                 dropout=self.hidden_dropout(model_dir)).to(device)
    self.model.train()
    self.attn_implementation = getattr(self.model.encoder.config, "_attn_implementation", "?")
    opt = config.optimizer
    decay, no_decay = [], []
    for name, param in self.model.named_parameters():
      (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
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
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
      self.optimizer.step()
      self.scheduler.step()
      self.optimizer.zero_grad(set_to_none=True)
    self._sync()
    seconds = time.perf_counter() - started
    if self.first_loss is None and loss is not None:
      self.first_loss = float(loss.detach())
    return seconds


def check_same_weights(model: models.Model, params: Any, torch_bench: TorchBench,
                       batch: dict[str, np.ndarray], rows: int = 2) -> float:
  """Max |difference| of the encoders' eval-mode hidden states on a few examples."""
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
      f"inter-op; transformers {transformers.__version__}",
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


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  torch.set_num_threads(args.threads)
  on_gpu = jax.default_backend() == "gpu"
  torch_device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
  if on_gpu != (torch_device.type == "cuda"):
    print(f"WARNING: jax runs on {jax.default_backend()}, torch on {torch_device}: "
          "the comparison is not on the same device", flush=True)

  config = minilm_sentiment.get_config(
      f"max_length={args.seq_len},batch_size={args.batch_size},seed={args.seed}")
  model_dir = assets.model_dir(config.model.pretrained)
  print("\n".join(machine_info(torch_device)), flush=True)
  print(f"model: {model_dir}", flush=True)

  model, params = models.create(config.model, config.seed)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  vocab_size = params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  batch = make_batch(args.batch_size, args.seq_len, vocab_size, args.seed)

  benches: dict[str, Any] = {}
  dtypes = ["float32"] + (["bfloat16"] if args.bf16 else [])
  for dtype in dtypes:
    bench = FtjaxBench(config, model, params, batch, dtype)
    print(f"ftjax {dtype}: compiled in {bench.compile_s:.1f}s", flush=True)
    benches[f"ftjax {dtype}"] = bench
  torch_bench = TorchBench(config, model_dir, batch, torch_device, args.seed)
  torch_params = sum(p.numel() for p in torch_bench.model.parameters())
  print(f"torch: attn_implementation={torch_bench.attn_implementation}; parameters "
        f"ftjax {num_params:,} / torch {torch_params:,}", flush=True)
  diff = check_same_weights(model, params, torch_bench, batch)
  print(f"same weights: max |hidden_ftjax - hidden_torch| (eval mode) = {diff:.2e}", flush=True)
  del params
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
  print()
  print(f"MiniLM-L6 full fine-tune train step, batch {args.batch_size} x seq {args.seq_len}, "
        f"2 classes; {args.rounds} interleaved rounds x {args.steps} steps "
        f"(after {args.warmup} warmup); median over rounds")
  print()
  print("| framework | compute dtype | steps/s (median) | min-max steps/s | examples/s "
        "| ms/step | ratio vs torch | paired ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for name in benches:
    framework, dtype = name.split()
    med = statistics.median(rates[name])
    print(f"| {framework} | {dtype} | {med:.3f} | {min(rates[name]):.3f}-{max(rates[name]):.3f} "
          f"| {med * args.batch_size:.1f} | {1000 / med:.0f} | {med / baseline:.2f}x "
          f"| {_paired_ratio(rates[name], rates['torch float32']):.2f}x |")
  print()
  print("ratio vs torch: median steps/s over median torch steps/s; paired ratio: median over "
        "rounds of the ratio within each round (less sensitive to machine-load drift).")
  print(f"ftjax/torch (float32) = {statistics.median(rates['ftjax float32']) / baseline:.2f} "
        f"(paired {_paired_ratio(rates['ftjax float32'], rates['torch float32']):.2f})")


if __name__ == "__main__":
  main()

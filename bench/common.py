"""What the train-step benchmarks share: set-up, the ftjax step, timing and reporting.

Importing this module chooses JAX's platform (`cpu` when JAX_PLATFORMS is unset and
the machine has no NVIDIA device) and puts the repository on sys.path, so it must
be imported before JAX. The benchmarks import it as `common` when run as scripts
(their folder is then on sys.path) and as `bench.common` when run with `python -m`.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

if "JAX_PLATFORMS" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
  os.environ["JAX_PLATFORMS"] = "cpu"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from ftjax import build, models, run_setup  # noqa: E402

DTYPES = build.DTYPES
# Long enough that the timed steps stay inside the schedule (warmup, then decay).
SCHEDULE_STEPS = 10_000


class Timed(Protocol):
  """A benchmarked train step: `run` times steps, `first_loss` is set by the first run."""

  first_loss: float | None

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took."""


def add_timing_flags(parser: argparse.ArgumentParser, steps: int) -> None:
  """Adds the flags every side-by-side bench times with: --rounds, --steps, --warmup,
  --threads (`steps`: the default of timed steps per round)."""
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=steps, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps of each configuration before the rounds")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="torch intra-op threads on CPU (XLA uses every core by default); "
                      "on a loaded machine use fewer than its idle cores")


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 positive: Iterable[str]) -> None:
  """Exits with a usage error unless the `positive` flags are >= 1 and --warmup >= 0.

  Args:
    parser: the parser that read `args`.
    args: the parsed flags.
    positive: names of the flags that must be at least 1.
  """
  for name in positive:
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.warmup < 0:
    parser.error("--warmup must be non-negative")


def setup(threads: int, warn_device: bool = True) -> torch.device:
  """Quietens the libraries' logging, sets torch's threads and picks torch's device.

  Args:
    threads: torch intra-op threads.
    warn_device: print a warning when JAX and torch run on different kinds of device.

  Returns:
    CUDA when JAX runs on a GPU and torch has CUDA, else the CPU.
  """
  absl_logging.set_verbosity(absl_logging.WARNING)
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  # peft calls a transformers method that warns of its deprecation on every wrap.
  warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
  torch.set_num_threads(threads)
  on_gpu = jax.default_backend() == "gpu"
  torch_device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
  if warn_device and on_gpu != (torch_device.type == "cuda"):
    print(f"WARNING: jax runs on {jax.default_backend()}, torch on {torch_device}: "
          "the comparison is not on the same device", flush=True)
  return torch_device


def num_params(tree: Any) -> int:
  """The number of elements of the arrays of `tree`."""
  return sum(x.size for x in jax.tree.leaves(tree))


def num_bytes(tree: Any) -> int:
  """The bytes of the arrays of `tree`."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def set_up_ftjax(config: Any, batch: dict[str, np.ndarray],
                 base: tuple[models.Model, Any] | None = None) -> run_setup.Setup:
  """The trainer's set-up of `config` (`ftjax.run_setup`) on one device, for batches
  like `batch`: model, state and jitted steps, not yet compiled.

  Args:
    config: the run config (its compute dtype, method and optimizer).
    batch: a batch of the run.
    base: the model of `config.model` and its parameters, created once for several
      configs (copied where the state would donate them); by default created from
      `config.model`.
  """
  placement = run_setup.place(config, jax.devices()[:1])
  spec = {key: (value.shape[1:], value.dtype) for key, value in batch.items()}
  return run_setup.set_up(config, placement, spec, (), SCHEDULE_STEPS, base=base)


class FtjaxBench:
  """The trainer's train step, set up and compiled as `ftjax.trainer` does it
  (`ftjax.run_setup` on one device), with its own state.

  Attributes:
    setup: the run's set-up (`ftjax.run_setup.Setup`: its task, placement and jitted
      steps, e.g. a pair task's reference step).
    built: what `ftjax.build.build` returned (model, optimizer, schedule, frozen part).
    schedule: the learning-rate schedule.
    state: the train state (donated to each step).
    frozen: the frozen parameters (empty for full fine-tuning).
    batch: the batch every step trains on, on the device.
    jitted: the jitted step, before lowering.
    compile_s: seconds spent lowering and compiling the step.
    first_loss: the loss of the first step run, once `run` has run.
  """

  def __init__(self, config: Any, batch: dict[str, np.ndarray],
               base: tuple[models.Model, Any] | None = None):
    """Builds the model and state (`set_up_ftjax`) and compiles the step; `batch` is
    the batch every step trains on."""
    setup = set_up_ftjax(config, batch, base)
    self.setup = setup
    self.built = setup.built
    self.schedule = self.built.schedule
    self.state, self.frozen = self.built.state, self.built.frozen
    self.batch = jax.device_put(batch, setup.placement.batch_sharding)
    self.jitted = setup.train
    started = time.perf_counter()
    self.step_fn = setup.train.lower(self.state, self.frozen, self.batch).compile()
    self.compile_s = time.perf_counter() - started
    self.first_loss: float | None = None

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took."""
    started = time.perf_counter()
    metrics = first = None
    for _ in range(steps):
      self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
      if first is None:
        first = metrics["loss"]
    jax.block_until_ready((self.state, metrics))
    seconds = time.perf_counter() - started
    if self.first_loss is None and first is not None:
      self.first_loss = float(first)
    return seconds


def lora_config(peft_config: Any, targets: list[str]) -> peft.LoraConfig:
  """The `peft` library's LoRA config for ftjax's `config.peft` (rank, alpha, dropout).

  Args:
    peft_config: `config.peft` of a LoRA run.
    targets: torch module names of the adapted layers.

  Returns:
    The `peft.LoraConfig`.
  """
  alpha = peft_config.alpha
  return peft.LoraConfig(
      r=peft_config.rank, lora_alpha=int(alpha) if alpha == int(alpha) else alpha,
      lora_dropout=peft_config.dropout, target_modules=targets)


class TorchBenchBase:
  """A torch train step: loss, backward, gradient clipping, AdamW and a LambdaLR schedule.

  Subclasses build `model` and call `make_optimizer`, and define `loss`.

  Attributes:
    device: where torch runs.
    model: the torch model (set by the subclass).
    trainable: the parameters that train, as `make_optimizer` found them.
    first_loss: the loss of the first step run, once `run` has run.
  """

  def __init__(self, device: torch.device):
    """Sets the device; the subclass builds the model and optimizer.

    Args:
      device: where torch runs.
    """
    self.device = device
    self.model: torch.nn.Module | None = None
    self.trainable: list[torch.nn.Parameter] = []
    self.first_loss: float | None = None

  def make_optimizer(self, opt: Any, lr_lambda: Callable[[int], float],
                     no_decay: Callable[[str], bool], fused: bool = False) -> None:
    """Builds AdamW over the parameters of `self.model` that require grad.

    Args:
      opt: `config.optimizer` (lr, b1, b2, eps, weight_decay, clip_norm).
      lr_lambda: the learning rate of step i over the peak, for `LambdaLR`.
      no_decay: whether the parameter of this name is exempt from weight decay.
      fused: use the fused AdamW (CUDA).
    """
    decay, exempt = [], []
    for name, param in self.model.named_parameters():
      if param.requires_grad:
        (exempt if no_decay(name) else decay).append(param)
    self.trainable = decay + exempt
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay},
         {"params": exempt, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, fused=fused)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
    self.clip_norm = opt.clip_norm

  def loss(self) -> torch.Tensor:
    """The forward pass and loss of one step on the benchmark's batch."""
    raise NotImplementedError

  def _sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took."""
    self._sync()
    started = time.perf_counter()
    first = None
    for _ in range(steps):
      loss = self.loss()
      loss.backward()
      if self.clip_norm:
        torch.nn.utils.clip_grad_norm_(self.trainable, self.clip_norm)
      self.optimizer.step()
      self.scheduler.step()
      self.optimizer.zero_grad(set_to_none=True)
      if first is None:
        first = loss.detach()
    self._sync()
    seconds = time.perf_counter() - started
    if self.first_loss is None and first is not None:
      self.first_loss = float(first)
    return seconds

  def num_trainable(self) -> int:
    """The number of trainable parameters (elements)."""
    return sum(p.numel() for p in self.trainable)


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
  """Lines describing the machine and library versions.

  Args:
    torch_device: where torch runs.

  Returns:
    The lines, without newlines.
  """
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


def load_average() -> str:
  """The 1-minute load average, to spot rounds disturbed by other processes."""
  try:
    return f"{os.getloadavg()[0]:.2f}"
  except OSError:
    return "n/a"


def paired_ratio(rates: Sequence[float], baseline: Sequence[float]) -> float:
  """Median over rounds of the per-round ratio rates[i] / baseline[i].

  Args:
    rates: one value per round.
    baseline: the baseline's value in the same rounds.

  Returns:
    The median ratio.
  """
  return statistics.median(r / b for r, b in zip(rates, baseline))


def time_interleaved(benches: Mapping[str, Timed], warmup: int, rounds: int, steps: int,
                     rate: bool, prefix: str = "") -> dict[str, list[float]]:
  """Warms each configuration up, then times `rounds` rounds of each in turn.

  Prints the warmup time of each configuration, and after each round its values and
  the load average.

  Args:
    benches: the configurations by name, timed in this order.
    warmup: untimed steps of each before the rounds (0: none).
    rounds: timing rounds.
    steps: timed steps of each configuration per round.
    rate: report steps per second (else seconds per step).
    prefix: put before every printed line.

  Returns:
    Per configuration, one value per round: steps/s when `rate`, else seconds per step.
  """
  for name, bench in benches.items():
    if warmup:
      seconds = bench.run(warmup)
      print(f"{prefix}warmup {name}: {warmup} steps in {seconds:.2f}s", flush=True)
  values: dict[str, list[float]] = {name: [] for name in benches}
  unit, fmt = ("steps/s", ".3f") if rate else ("s/step", ".4f")
  for index in range(rounds):
    for name, bench in benches.items():
      seconds = bench.run(steps)
      values[name].append(steps / seconds if rate else seconds / steps)
    print(f"{prefix}round {index + 1}/{rounds} {unit}: "
          + ", ".join(f"{name} {v[-1]:{fmt}}" for name, v in values.items())
          + f" (1-min load average {load_average()})", flush=True)
  return values


def print_markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
  """Prints a markdown table.

  Args:
    header: the column titles.
    rows: the cells of each row, already formatted.
  """
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")

r"""python bench/vision_train_step.py [--arch mobilenet_v2|efficientnet_lite0|both]

Train-step throughput of fine-tuning an ImageNet-pretrained convolutional network
(MobileNetV2 by default, or EfficientNet-lite0; 2.2M and 3.4M parameters with the
10-class head) on 10 classes with a new zero-initialised head: ftjax versus
PyTorch, on the same packaged weights, the same batch and the same machine. Batch
64 of 64x64 images by default, as `configs/mobilenet_fashion.py` trains on the CPU.

Both sides do the same work per step, in float32: the whole network in training
mode -- every BatchNorm layer normalises with the batch's statistics and updates
its running mean and variance (momentum 0.1 for MobileNetV2, 0.01 for
EfficientNet-lite0), dropout 0.2 before the head -- global average pooling, the
10-class linear head, softmax cross-entropy (mean over the batch), backward,
global-norm clipping to 1.0, AdamW (lr 5e-4, weight decay 0.01 except on biases
and BatchNorm scales) with a linear warmup then cosine decay. Every parameter
trains (full fine-tuning).

* ftjax: the config of `configs/mobilenet_fashion.get_config("arch=...,
  image_size=...,batch_size=...")`, built as the trainer builds it:
  `ftjax.build.build` (model with the packaged weights and a new head, train
  state holding the parameters, AdamW state and batch statistics, on a one-device
  mesh) and `ftjax.build.jit_steps` (`ftjax.step.train_step` jitted with explicit
  shardings, the state donated), lowered and compiled once; timing ends with
  `block_until_ready`.
* torch: `bench/torch_mobilenet_v2.MobileNetV2` (torchvision's network) or
  `efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0",
  image_size=None, drop_connect_rate=0.0)` (drop connect off: ftjax has none),
  loading the same checkpoint with `torch.load(weights_only=True)`; the
  classifier replaced by a zero-initialised `nn.Linear(1280, 10)`; `.train()`;
  `torch.optim.AdamW` (two groups: decay on the >= 2-D weights, none on the 1-D
  biases and BatchNorm scales), the same schedule as a `LambdaLR`,
  `clip_grad_norm_(1.0)`, `zero_grad(set_to_none=True)`; eager, NCHW,
  `torch.set_num_threads(--threads)`.

Not measured: data loading, augmentation and host-to-device copies. Both sides
train on one fixed batch of standard-normal images [B, S, S, 3] (NCHW for torch)
with uniformly random labels, already on the device.

Runs are interleaved per architecture: after compilation and `--warmup` steps of
each configuration, every round times `--steps` steps of each in turn (ftjax,
torch, [ftjax bfloat16]), for `--rounds` rounds. The table gives the median over
rounds of steps/s, images/s and the ratio to torch of the same architecture.
`--bf16` adds a row for ftjax with `compute_dtype=bfloat16` (parameters, batch
statistics and optimizer state stay float32).

Before timing, the eval-mode pooled features (the head's input) of both sides on
two images are compared, to show that both carry the same weights.

JAX_PLATFORMS defaults to `cpu` when it is unset and the machine has no NVIDIA
device; set it (e.g. `JAX_PLATFORMS=cuda`) to choose. Torch runs on CUDA only when
JAX does and torch has CUDA.

Flags: --arch, --rounds, --steps, --warmup, --batch_size, --image_size, --threads,
--bf16/--no-bf16, --seed.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any, Callable

# Sets JAX_PLATFORMS and puts the repository on sys.path: imported before JAX.
if __package__:  # python -m bench.vision_train_step
  from . import common
  from . import torch_mobilenet_v2
else:  # python bench/vision_train_step.py: this file's folder is on sys.path
  import common  # type: ignore[no-redef]
  import torch_mobilenet_v2  # type: ignore[no-redef]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import mobilenet_fashion  # noqa: E402
from ftjax import param_groups  # noqa: E402
from ftjax.hub import vision  # noqa: E402
from ftjax.models import batch_norm  # noqa: E402

ARCHS = ("mobilenet_v2", "efficientnet_lite0")
_LABELS = {"mobilenet_v2": "MobileNetV2", "efficientnet_lite0": "EfficientNet-lite0"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name; None reads sys.argv.

  Returns:
    The parsed flags.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", choices=ARCHS + ("both",), default="mobilenet_v2")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=64)
  common.add_timing_flags(parser, steps=10)
  parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                      help="also time ftjax with compute_dtype=bfloat16")
  parser.add_argument("--seed", type=int, default=0, help="seeds the batch and the model")
  args = parser.parse_args(argv)
  common.check_counts(parser, args, ("rounds", "steps", "batch_size", "image_size", "threads"))
  return args


def make_config(args: argparse.Namespace, arch: str, dtype: str) -> Any:
  """The packaged Fashion-MNIST fine-tuning config at the bench's shape (full fine-tuning)."""
  return mobilenet_fashion.get_config(
      f"arch={arch},image_size={args.image_size},batch_size={args.batch_size},"
      f"seed={args.seed},dtype={dtype}")


def make_batch(batch_size: int, image_size: int, num_classes: int,
               seed: int) -> dict[str, np.ndarray]:
  """A batch of random images and labels, as the image pipeline yields it (no mixing).

  Args:
    batch_size: number of images.
    image_size: height and width.
    num_classes: labels are drawn from [0, num_classes).
    seed: numpy seed.

  Returns:
    {"image": float32 [B, S, S, 3], "label", "label_mix" (= label): int32 [B],
    "mix": float32 [B] of ones, "mask": bool [B]}.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, (batch_size,), dtype=np.int32)
  return {
      "image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
      "label": labels,
      "label_mix": labels.copy(),
      "mix": np.ones((batch_size,), np.float32),
      "mask": np.ones((batch_size,), bool),
  }


class FtjaxBench(common.FtjaxBench):
  """`common.FtjaxBench`, and the pooled features of its starting weights."""

  def pooled_features(self, images: np.ndarray) -> np.ndarray:
    """The head's input [B, 1280] in evaluation mode (running statistics, no dropout).

    Reads the initial state: call before `run`, which donates it.
    """
    weights = param_groups.combine(param_groups.combine(self.state.params, self.frozen),
                                   self.state.stats)
    module = self.built.model.module(weights)
    batch_norm.set_updating(module, frozenset())
    return np.asarray(module.features({"image": jnp.asarray(images)}))


def torch_model(arch: str, num_classes: int) -> tuple[torch.nn.Module, torch.nn.Linear]:
  """The PyTorch network with the packaged ImageNet weights and a new zero-initialised head.

  Args:
    arch: a key of `ARCHS`.
    num_classes: the new head's width.

  Returns:
    (the model, its new head).
  """
  if arch == "mobilenet_v2":
    model = torch_mobilenet_v2.MobileNetV2()
  else:
    import efficientnet_lite_pytorch  # pylint: disable=import-outside-toplevel
    # image_size=None: 'SAME' padding computed per input, so any size works.
    model = efficientnet_lite_pytorch.EfficientNet.from_name(
        "efficientnet-lite0", image_size=None, drop_connect_rate=0.0)
  model.load_state_dict(torch.load(vision.weights_file(arch), weights_only=True))
  head = torch.nn.Linear(torch_mobilenet_v2.LAST_CHANNELS, num_classes)
  torch.nn.init.zeros_(head.weight)
  torch.nn.init.zeros_(head.bias)
  if arch == "mobilenet_v2":
    model.classifier[1] = head
  else:  # efficientnet_lite_pytorch names the head `_fc`
    model._fc = head  # pylint: disable=protected-access
  return model, head


def _lr_lambda(config: Any) -> Callable[[int], float]:
  """The ftjax schedule (linear warmup, cosine decay) as a LambdaLR multiplier."""
  opt = config.optimizer
  if opt.decay != "cosine":
    raise ValueError(f"torch side: optimizer.decay={opt.decay!r} is not benchmarked")
  warmup = int(opt.warmup_steps)
  decay_steps = max(common.SCHEDULE_STEPS - warmup, 1)

  def fn(step: int) -> float:
    if step < warmup:
      return step / warmup
    frac = min(step - warmup, decay_steps) / decay_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
    return (1.0 - opt.end_lr_factor) * cosine + opt.end_lr_factor

  return fn


class TorchBench(common.TorchBenchBase):
  """A PyTorch train step of the network in train mode with torch.optim.AdamW."""

  def __init__(self, config: Any, batch: dict[str, np.ndarray], device: torch.device,
               seed: int):
    """Builds the model and optimizer.

    Args:
      config: the run config (`model.name`, `model.num_classes`, `optimizer`).
      batch: the batch every step trains on.
      device: where torch runs.
      seed: torch seed (dropout).
    """
    super().__init__(device)
    torch.manual_seed(seed)
    self.model, self.head = torch_model(config.model.name, config.model.num_classes)
    self.model.to(device)
    self.model.train()
    ndims = {name: p.ndim for name, p in self.model.named_parameters()}
    self.make_optimizer(config.optimizer, _lr_lambda(config),
                        no_decay=lambda name: ndims[name] == 1)
    self.images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(device)
    self.labels = torch.from_numpy(batch["label"].astype(np.int64)).to(device)

  def loss(self) -> torch.Tensor:
    """The softmax cross-entropy of the classifier on the batch."""
    return torch.nn.functional.cross_entropy(self.model(self.images), self.labels)

  def pooled_features(self, rows: int) -> np.ndarray:
    """The head's input [rows, 1280] in evaluation mode, on the batch's first rows."""
    captured = []
    hook = self.head.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
    self.model.eval()
    try:
      with torch.no_grad():
        self.model(self.images[:rows])
    finally:
      hook.remove()
      self.model.train()
    return captured[0].float().cpu().numpy()


def decayed_counts(ftjax_bench: FtjaxBench, torch_bench: TorchBench,
                   config: Any) -> tuple[int, int]:
  """Elements under weight decay: (ftjax by `config.optimizer.wd_mults`, torch's group 0)."""
  params = ftjax_bench.state.params
  mults = param_groups.assign(params, [tuple(r) for r in config.optimizer.wd_mults],
                              "config.optimizer.wd_mults")
  ours = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mults)) if m)
  theirs = sum(p.numel() for p in torch_bench.optimizer.param_groups[0]["params"])
  return ours, theirs


def bench_arch(args: argparse.Namespace, arch: str,
               torch_device: torch.device) -> tuple[dict[str, list[float]], dict[str, Any]]:
  """Builds, checks and times one architecture's configurations.

  Args:
    args: the parsed flags.
    arch: a key of `ARCHS`.
    torch_device: where torch runs.

  Returns:
    (steps/s per round of each configuration, the configurations), in timing order.
  """
  prefix = f"[{arch}] "
  config = make_config(args, arch, "float32")
  batch = make_batch(args.batch_size, args.image_size, config.model.num_classes, args.seed)
  dtypes = ["float32"] + (["bfloat16"] if args.bf16 else [])
  benches: dict[str, Any] = {}
  for dtype in dtypes:
    bench = FtjaxBench(make_config(args, arch, dtype), batch)
    print(f"{prefix}ftjax {dtype}: compiled in {bench.compile_s:.1f}s", flush=True)
    benches[f"ftjax {dtype}"] = bench
  ours = benches["ftjax float32"]
  torch_bench = TorchBench(config, batch, torch_device, args.seed)
  count = common.num_params(ours.state.params)
  theirs = torch_bench.num_trainable()
  print(f"{prefix}trainable parameters: ftjax {count:,} / torch {theirs:,}"
        + ("" if count == theirs else "  WARNING: they differ"), flush=True)
  stats = common.num_params(ours.state.stats)
  buffers = sum(b.numel() for name, b in torch_bench.model.named_buffers()
                if name.endswith(("running_mean", "running_var")))
  print(f"{prefix}BatchNorm running statistics: ftjax {stats:,} / torch {buffers:,}; "
        f"updating layers: ftjax {len(ours.built.model.updating)}", flush=True)
  decayed = decayed_counts(ours, torch_bench, config)
  print(f"{prefix}weight-decayed elements: ftjax {decayed[0]:,} / torch {decayed[1]:,}"
        + ("" if decayed[0] == decayed[1] else "  WARNING: they differ"), flush=True)
  rows = min(2, args.batch_size)
  diff = np.abs(ours.pooled_features(batch["image"][:rows])
                - torch_bench.pooled_features(rows)).max()
  print(f"{prefix}same weights: max |features_ftjax - features_torch| (eval mode) = "
        f"{diff:.2e}", flush=True)
  # Round order: ftjax float32, torch, then ftjax bfloat16 (the headline pair adjacent).
  order = ["ftjax float32", "torch float32"] + [f"ftjax {d}" for d in dtypes[1:]]
  benches["torch float32"] = torch_bench
  benches = {name: benches[name] for name in order}
  rates = common.time_interleaved(benches, args.warmup, args.rounds, args.steps, rate=True,
                                  prefix=prefix)
  for name, bench in benches.items():
    loss = bench.first_loss
    print(f"{prefix}{name}: loss of the first step = {loss:.4f} "
          f"(ln {config.model.num_classes} = {math.log(config.model.num_classes):.4f})"
          if loss is not None else f"{prefix}{name}: no loss", flush=True)
  return rates, benches


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  torch_device = common.setup(args.threads)
  print("\n".join(common.machine_info(torch_device)), flush=True)
  archs = ARCHS if args.arch == "both" else (args.arch,)
  results = {arch: bench_arch(args, arch, torch_device)[0] for arch in archs}

  print()
  print(f"Full fine-tuning train step (BatchNorm in training mode), batch {args.batch_size} "
        f"x {args.image_size}x{args.image_size}x3, 10 classes; {args.rounds} interleaved "
        f"rounds x {args.steps} steps (after {args.warmup} warmup); median over rounds")
  print()
  rows = []
  for arch, rates in results.items():
    baseline = rates["torch float32"]
    for name, values in rates.items():
      framework, dtype = name.split()
      med = statistics.median(values)
      rows.append((_LABELS[arch], framework, dtype, f"{med:.3f}",
                   f"{min(values):.3f}-{max(values):.3f}", f"{med * args.batch_size:.1f}",
                   f"{1000 / med:.0f}", f"{med / statistics.median(baseline):.2f}x",
                   f"{common.paired_ratio(values, baseline):.2f}x"))
  common.print_markdown_table(
      ("arch", "side", "compute dtype", "steps/s (median)", "min-max steps/s", "images/s",
       "ms/step", "ratio vs torch", "paired ratio"), rows)
  print()
  print("ratio vs torch: median steps/s over the same architecture's median torch steps/s; "
        "paired ratio: median over rounds of the ratio within each round (less sensitive "
        "to machine-load drift).")
  for arch, rates in results.items():
    ours, theirs = rates["ftjax float32"], rates["torch float32"]
    print(f"{_LABELS[arch]}: ftjax/torch (float32) = "
          f"{statistics.median(ours) / statistics.median(theirs):.2f} "
          f"(paired {common.paired_ratio(ours, theirs):.2f})", flush=True)


if __name__ == "__main__":
  main()

r"""python bench/llama_train_step.py [--shape smollm2-135m|llama-1b|small-262k] [--methods full,lora]
    [--loss_grads fused,recompute]

Train-step throughput and model FLOPs utilisation (MFU) of a Llama-family causal
language model with random weights, full fine-tuning and LoRA: ftjax versus
Hugging Face transformers' PyTorch `LlamaForCausalLM` (plus the `peft` library's
LoRA), on the same weights, the same batch shape and the same machine.

Shapes (`--shape`; Hugging Face config fields, randomly initialised):
* `smollm2-135m`: SmolLM2-135M -- hidden 576, intermediate 1536, 30 layers, 9 heads,
  3 key/value heads, vocabulary 49152, tied embeddings, RoPE theta 100000.
* `llama-1b`: Llama-3.2-1B-like -- hidden 2048, intermediate 8192, 16 layers,
  32 heads, 8 key/value heads, vocabulary 128256, tied embeddings, RoPE theta
  500000 with llama3 scaling.
* `small-262k`: a small decoder under a Gemma-3-sized vocabulary, where the LM head
  is most of the work -- hidden 256, intermediate 768, 4 layers, 4 heads, 2
  key/value heads, vocabulary 262144, tied embeddings.

Both sides do the same work per step: the decoder on `--batch_size` rows of
`--seq_len` random token ids (one sequence per row, every target counted),
next-token cross-entropy, backward, global-norm clipping to 1.0, AdamW with the
config's warmup + cosine schedule (weight decay 0 in the config; never on
biases and norm scales).

* `full`: every parameter trains.
* `lora`: rank 8, alpha 16, dropout 0.05 on every projection of every block
  (q, k, v, o, gate, up, down), as `configs/smollm2_chat.py`; the final norm (the
  model's head with tied embeddings) trains too on both sides, the rest is frozen.

* ftjax: the train step the trainer compiles (`ftjax.step.train_step` over the
  model, trainable/frozen split, optimizer and schedule built from
  `configs/smollm2_chat.py` with `model.pretrained=""` and `model.arch` set to the
  shape), jitted with the state donated; the causal-LM task computes the logits
  `config.loss_chunk` tokens at a time. Weights and optimizer state stay float32;
  `--dtype` is the compute dtype. Timing ends with `block_until_ready`.
  `--loss_grads fused,recompute` times one ftjax step per `config.loss_grad` (the
  first is "ftjax", the others "ftjax loss_grad=..."), interleaved, and prints each
  step's FLOPs two ways: XLA's cost analysis of the compiled step (which counts a
  loop's body once, so the chunked loss's loop counts one chunk), and the matmul
  FLOPs of the traced step with every scan's body counted as often as it runs.
* torch: `LlamaForCausalLM(LlamaConfig(<same fields>))` (its default attention,
  SDPA) holding the same weights as ftjax's, wrapped by `peft.get_peft_model(...,
  LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=<the 7
  projections>))` for LoRA; float32 cross-entropy over the full logits;
  `torch.optim.AdamW` (fused on CUDA) over the parameters that require grad, the
  same learning rates step by step, `clip_grad_norm_`, `zero_grad(set_to_none=True)`.
  `--dtype bfloat16` runs the forward pass under `torch.autocast(bfloat16)`; float32
  on CUDA allows TF32 matmuls (`torch.set_float32_matmul_precision("high")`), as
  JAX's default matmul precision does on GPUs. `--remat full` turns on transformers'
  gradient checkpointing (non-reentrant); `dots_saveable` has no torch counterpart,
  so torch then runs without it. On GPU torch runs on CUDA and is synchronised
  before and after each timed run; on CPU it uses `--threads` intra-op threads
  (OpenMP threads wait for each other at every operation: when other processes
  keep the cores busy, fewer threads than cores can be many times faster).

Model FLOPs per token (the same count for both frameworks; recomputation for
remat or for the chunked loss is not counted, so this is MFU, not hardware FLOPs
utilisation):

  F = 6 * N_trainable + 4 * N_frozen + 6 * n_layers * seq_len * n_heads * head_dim

N_trainable / N_frozen count the parameters of the matmul weights that train /
stay frozen: the seven projections of every block, the LM head (with tied
embeddings the embedding matrix, counted once, as the head; an embedding lookup is
not a matmul) and LoRA's A and B. A trained weight costs 2 FLOPs per parameter per
token forward, 2 for the input gradient and 2 for its own gradient; a frozen one
needs no weight gradient (4). So full fine-tuning is 6 * N_matmul, and LoRA is
4 * N_base + 6 * N_lora (+ 6 per trained head parameter when the head is untied).
The last term is the attention scores (Q K^T) and the weighted values (P V),
2 matmuls x 2 FLOPs x 3 (forward + backward) per query, key and head dimension,
counted causally: each query attends to seq_len / 2 keys on average, half of the
12 * n_layers * seq_len * d_attn of the non-causal count (PaLM's convention).

MFU = F * tokens per step / step time / peak FLOP/s. The peak is `--peak_tflops`
when given; otherwise the dense bfloat16 tensor-core peak of a known device kind
(H100 SXM and H200: 989 TFLOP/s, H100 PCIe: 756, A100: 312), whatever `--dtype`;
otherwise (CPU, unknown devices) it is estimated with a timed large matmul in the
compute dtype in JAX -- on a loaded machine that estimate is low and the MFU high.
The run prints which peak it used and how it was obtained.

Timing: after compilation and `--warmup` steps of each, every round times
`--steps` steps of ftjax, then of torch, for `--rounds` rounds; the table gives the
median step time over rounds. Methods run one after the other, each freeing its
models before the next, so two full fine-tunes never share the device's memory.
ftjax's compile time (lowering + XLA compilation of the step) is printed per method.
XLA_PYTHON_CLIENT_PREALLOCATE defaults to false so that JAX and torch can share one
GPU; JAX_PLATFORMS defaults to `cpu` on machines without an NVIDIA device.

Flags: --shape, --methods, --batch_size, --seq_len, --dtype, --remat, --loss_chunk, --loss_grads,
--steps, --rounds, --warmup, --peak_tflops, --skip_torch, --threads, --seed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import statistics
import time
from typing import Any

# JAX would otherwise take most of the GPU's memory at start-up and leave none to torch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Sets JAX_PLATFORMS and puts the repository on sys.path: imported before JAX.
if __package__:  # python -m bench.llama_train_step
  from . import common
else:  # python bench/llama_train_step.py: this file's folder is on sys.path
  import common  # type: ignore[no-redef]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import smollm2_chat  # noqa: E402
from ftjax import models, param_groups  # noqa: E402
from ftjax.hub import llama as llama_hub  # noqa: E402

# Hugging Face config fields of the benchmarked shapes (random weights).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True),
    "small-262k": dict(
        vocab_size=262144, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
}
METHODS = ("full", "lora")
_METHOD_LABELS = {"full": "full", "lora": "LoRA r=8"}
# Dense bfloat16 tensor-core peaks (TFLOP/s, spec sheets) by `device_kind`: first match wins.
_PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100|H200", 989.0),
    (r"A100", 312.0),
)
# Parameter paths (ftjax) of matmul weights; with tied embeddings the embedding is the head.
_MATMUL = re.compile(r".*/(kernel|lora_a|lora_b)")
_EMBEDDING = "model/embed_tokens/embedding"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name; None reads sys.argv.

  Returns:
    The parsed flags, with `methods` a list.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
  parser.add_argument("--methods", default="full,lora",
                      help=f"comma-separated, from {list(METHODS)}")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="compute dtype (weights and optimizer state stay float32)")
  parser.add_argument("--remat", choices=("none", "full", "dots_saveable"), default="none",
                      help="gradient checkpointing of each decoder block")
  parser.add_argument("--loss_chunk", type=int, default=None,
                      help="tokens of logits at a time in ftjax's loss (default: the config's)")
  parser.add_argument("--loss_grads", default=None,
                      help="comma-separated config.loss_grad values (fused, recompute), one "
                      "ftjax step each, timed interleaved (default: the config's)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak FLOP/s (in TFLOP/s) for MFU; default: by device kind, "
                      "else estimated with a large matmul")
  parser.add_argument("--skip_torch", action="store_true", help="time ftjax only")
  common.add_timing_flags(parser, steps=3)
  parser.add_argument("--seed", type=int, default=0, help="seeds weights, batch and dropout")
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown or not args.methods:
    parser.error(f"--methods: {unknown or 'none given'}; choose from {list(METHODS)}")
  common.check_counts(parser, args, ("batch_size", "seq_len", "steps", "rounds", "threads"))
  if args.peak_tflops is not None and args.peak_tflops <= 0:
    parser.error("--peak_tflops must be positive")
  args.loss_grads = [g.strip() for g in (args.loss_grads or "").split(",") if g.strip()] or [
      None]
  if not set(args.loss_grads) <= {None, "fused", "recompute"}:
    parser.error(f"--loss_grads: {args.loss_grads}; choose from fused, recompute")
  return args


def make_config(args: argparse.Namespace, method: str,
                loss_grad: str | None = None) -> ml_collections.ConfigDict:
  """The SmolLM2 fine-tuning config at the bench's shape, with random weights."""
  config = smollm2_chat.get_config(
      f"peft={method},batch_size={args.batch_size},max_length={args.seq_len},"
      f"dtype={args.dtype},remat={args.remat},seed={args.seed}")
  with config.unlocked():
    config.model.pretrained = ""
    config.model.arch = SHAPES[args.shape]
    if args.loss_chunk is not None:
      config.loss_chunk = args.loss_chunk
    if loss_grad is not None:
      config.loss_grad = loss_grad
  return config


def _matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the dot_generals of `jaxpr`, a scan's body counted `length` times (a
  cond's costliest branch once; a while loop's body once)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    inner = []
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, jax_core.ClosedJaxpr):
          inner.append(_matmul_flops(item.jaxpr))
        elif isinstance(item, jax_core.Jaxpr):
          inner.append(_matmul_flops(item))
    if inner:
      repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      total += repeats * (max(inner) if eqn.primitive.name == "cond" else sum(inner))
  return total


def step_flops(bench: common.FtjaxBench) -> dict[str, float]:
  """{"xla": the compiled step's cost-analysis FLOPs, "matmul": its traced matmul FLOPs}."""
  cost = bench.step_fn.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  traced = bench.jitted.trace(bench.state, bench.frozen, bench.batch)
  return {"xla": float(cost["flops"]), "matmul": _matmul_flops(traced.jaxpr.jaxpr)}


def make_batch(batch_size: int, seq_len: int, vocab_size: int,
               seed: int) -> dict[str, np.ndarray]:
  """A language-model batch as the data pipeline yields it: one sequence per row.

  Args:
    batch_size: rows.
    seq_len: tokens per row.
    vocab_size: token ids are drawn from [0, vocab_size).
    seed: numpy seed.

  Returns:
    {"input_ids", "targets" (the next token of each position), "positions",
    "segment_ids" (1 everywhere): int32 [B, L]; "loss_mask": bool [B, L] (all True);
    "mask": bool [B] (all True)}.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  shape = (batch_size, seq_len)
  return {
      "input_ids": tokens[:, :-1].copy(),
      "targets": tokens[:, 1:].copy(),
      "loss_mask": np.ones(shape, bool),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
      "segment_ids": np.ones(shape, np.int32),
      "mask": np.ones((batch_size,), bool),
  }


def model_flops_per_token(trainable: Any, frozen: Any, arch: dict[str, Any],
                          seq_len: int) -> dict[str, float]:
  """Model FLOPs per trained token of one step (see the module docstring).

  Args:
    trainable: ftjax's trainable parameters.
    frozen: its frozen parameters.
    arch: the Hugging Face config fields of the model.
    seq_len: tokens per row (each row is one causal sequence).

  Returns:
    {"trainable": N_trainable, "frozen": N_frozen (matmul parameters),
    "attention": attention FLOPs, "total": FLOPs}, all per token.
  """
  tied = arch.get("tie_word_embeddings", False)

  def matmul_params(tree: Any) -> int:
    return sum(leaf.size for path, leaf in param_groups.flatten(tree).items()
               if _MATMUL.fullmatch(path) or (tied and path == _EMBEDDING))

  heads = arch["num_attention_heads"]
  head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
  counts = {"trainable": matmul_params(trainable), "frozen": matmul_params(frozen),
            "attention": 6 * arch["num_hidden_layers"] * seq_len * heads * head_dim}
  counts["total"] = 6 * counts["trainable"] + 4 * counts["frozen"] + counts["attention"]
  return {k: float(v) for k, v in counts.items()}


def matmul_flops_per_s(dtype: str, size: int, reps: int = 3) -> float:
  """Best FLOP/s of `reps` jitted [size, size] x [size, size] matmuls in `dtype`."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  x, y = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
  matmul = jax.jit(jnp.matmul)
  matmul(x, y).block_until_ready()
  best = math.inf
  for _ in range(reps):
    started = time.perf_counter()
    matmul(x, y).block_until_ready()
    best = min(best, time.perf_counter() - started)
  return 2.0 * size ** 3 / best


def peak_flops_per_s(args: argparse.Namespace) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained): the flag, the device kind's peak, or a measurement."""
  if args.peak_tflops is not None:
    return args.peak_tflops * 1e12, "--peak_tflops"
  device = jax.devices()[0]
  for pattern, tflops in _PEAK_TFLOPS:
    if re.search(pattern, device.device_kind):
      return tflops * 1e12, (f"dense bfloat16 spec-sheet peak of {device.device_kind!r} "
                             f"(matched {pattern!r})")
  size = 2048 if device.platform == "cpu" else 8192
  measured = matmul_flops_per_s(args.dtype, size)
  return measured, (f"estimated: best of 3 {size}x{size}x{size} {args.dtype} matmuls in JAX on "
                    f"{device.platform}:{device.device_kind} (pass --peak_tflops to set it)")


def hf_config(arch: dict[str, Any]) -> transformers.LlamaConfig:
  """The transformers config of `arch` (default attention implementation, no KV cache)."""
  return transformers.LlamaConfig(**arch, use_cache=False)


class TorchBench(common.TorchBenchBase):
  """A transformers LlamaForCausalLM train step (full, or peft LoRA) with torch AdamW."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, trainable_paths: set[str],
               lr_factors: np.ndarray, batch: dict[str, np.ndarray], device: torch.device):
    """Builds the model with ftjax's weights, and its optimizer.

    Args:
      config: the run config; `config.peft.method` is "full" or "lora".
      params: ftjax's base-model parameters (before LoRA), copied into torch's model.
      trainable_paths: ftjax paths of the base parameters that train (LoRA's A and B
        are added by peft and always train).
      lr_factors: the learning rate of step i over the peak, for every step run.
      batch: the batch every step trains on (see `make_batch`).
      device: where torch runs.
    """
    super().__init__(device)
    torch.manual_seed(config.seed)
    self.bf16 = config.compute_dtype == "bfloat16"
    arch = ml_collections.ConfigDict(config.model.arch).to_dict()
    with device:
      model = transformers.LlamaForCausalLM(hf_config(arch))
    self.attn_implementation = getattr(model.config, "_attn_implementation", "?")
    trains = self._copy_weights(params, model, trainable_paths)
    if config.model.remat == "full":
      model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    method = config.peft.method
    if method == "lora":
      model = peft.get_peft_model(
          model, common.lora_config(config.peft, self.lora_targets(config)))
      for param in trains:  # peft froze every base parameter; the head trains in ftjax too
        param.requires_grad_(True)
    elif method != "full":
      raise ValueError(f"torch side: peft method {method!r} is not benchmarked")
    self.model = model
    self.model.train()
    factors = [float(f) for f in lr_factors]
    # As the config's wd_mults: no decay of biases and norm scales.
    self.make_optimizer(config.optimizer, lambda step: factors[min(step, len(factors) - 1)],
                        no_decay=lambda name: name.endswith(("bias", "norm.weight")),
                        fused=device.type == "cuda")
    self.input_ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
    self.targets = torch.from_numpy(batch["targets"].astype(np.int64)).to(device)

  @staticmethod
  def lora_targets(config: ml_collections.ConfigDict) -> list[str]:
    """Module names (q_proj, ...) that `config.peft.target` adapts in ftjax."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    kernel = "model/layers/0/{}/{}/kernel"
    targets = [name for name in names
               if any(re.fullmatch(config.peft.target, kernel.format(block, name))
                      for block in ("self_attn", "mlp"))]
    if not targets:
      raise ValueError(f"config.peft.target={config.peft.target!r} adapts no projection")
    return targets

  @staticmethod
  def _copy_weights(params: Any, model: torch.nn.Module,
                    trainable_paths: set[str]) -> list[torch.nn.Parameter]:
    """Copies ftjax's parameters into `model`; returns the torch parameters that train.

    Raises:
      ValueError: if a torch parameter has no ftjax counterpart or the counts differ.
    """
    flat = param_groups.flatten(params)
    trains, copied = [], 0
    with torch.no_grad():
      for name, param in model.named_parameters():  # tied weights are listed once
        mapped = llama_hub.hf_name_to_path(name)
        if mapped is None or mapped[0] not in flat:
          raise ValueError(f"torch parameter {name}: no ftjax parameter")
        path, transform = mapped  # identity or transpose: each its own inverse
        param.copy_(torch.from_numpy(np.array(transform(np.asarray(flat[path])), order="C")))
        copied += 1
        if path in trainable_paths:
          trains.append(param)
    if copied != len(flat):
      raise ValueError(f"copied {copied} tensors into torch, ftjax has {len(flat)}")
    return trains

  def loss(self) -> torch.Tensor:
    """Next-token cross-entropy (float32) over every position of the batch."""
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.model(input_ids=self.input_ids).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             self.targets.flatten())


def run_method(args: argparse.Namespace, method: str, base: tuple[models.Model, Any],
               batch: dict[str, np.ndarray], torch_device: torch.device) -> dict[str, Any]:
  """Compiles, warms up and times one method on both sides; returns its results.

  Returns:
    {"seconds": {framework: [seconds per step, per round]}, "compile_s",
    "flops": `model_flops_per_token`, "loss": {framework: loss of the first step},
    "trainable": ftjax's trainable parameter count}.
  """
  config = make_config(args, method, args.loss_grads[0])
  base_params = base[1]
  ftjax_bench = common.FtjaxBench(config, batch, base)
  names = ["ftjax"] + [f"ftjax loss_grad={g}" for g in args.loss_grads[1:]]
  ftjax_benches = {"ftjax": ftjax_bench}
  for name, loss_grad in zip(names[1:], args.loss_grads[1:]):
    ftjax_benches[name] = common.FtjaxBench(make_config(args, method, loss_grad), batch, base)
  compiled_flops = {name: step_flops(bench) for name, bench in ftjax_benches.items()}
  trainable = ftjax_bench.state.params
  flops = model_flops_per_token(trainable, ftjax_bench.frozen, SHAPES[args.shape],
                                args.seq_len)
  num_trainable = common.num_params(trainable)
  label = _METHOD_LABELS[method]
  print(f"{label}: ftjax compiled in {ftjax_bench.compile_s:.1f}s; {num_trainable:,} trainable "
        f"parameters; {flops['total'] / 1e9:.3f} GFLOP per token", flush=True)
  for name, counted in compiled_flops.items():
    print(f"{label}: {name} step: XLA cost analysis "
          f"{counted['xla'] / 1e12:.4f} TFLOP, traced matmuls {counted['matmul'] / 1e12:.4f} TFLOP",
          flush=True)
  benches: dict[str, Any] = dict(ftjax_benches)
  if not args.skip_torch:
    trainable_paths = set(param_groups.flatten(ftjax_bench.state.params))
    total = args.warmup + args.rounds * args.steps + 1
    lr_factors = np.asarray(ftjax_bench.schedule(jnp.arange(total))) / config.optimizer.lr
    torch_bench = TorchBench(config, base_params, trainable_paths, lr_factors, batch,
                             torch_device)
    theirs = torch_bench.num_trainable()
    print(f"{label}: torch attn_implementation={torch_bench.attn_implementation}; trainable "
          f"parameters ftjax {num_trainable:,} / torch {theirs:,}"
          + ("" if theirs == num_trainable else "  WARNING: they differ"), flush=True)
    benches["torch"] = torch_bench

  seconds = common.time_interleaved(benches, args.warmup, args.rounds, args.steps, rate=False,
                                    prefix=f"{label}: ")
  losses = {name: bench.first_loss for name, bench in benches.items()}
  compile_s = ftjax_bench.compile_s
  del benches, ftjax_bench, ftjax_benches
  gc.collect()
  if torch_device.type == "cuda":
    torch.cuda.empty_cache()
  return {"seconds": seconds, "compile_s": compile_s, "flops": flops, "loss": losses,
          "trainable": num_trainable, "compiled_flops": compiled_flops}


def print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]], peak: float,
                peak_source: str, num_params: int) -> None:
  """Prints the markdown table of step time, tokens/s, MFU and speedup, and its notes."""
  tokens = args.batch_size * args.seq_len
  torch_label = {"full": "torch", "lora": "torch + peft"}
  print()
  print(f"{args.shape} ({num_params / 1e6:.1f}M parameters, random weights) train step, "
        f"batch {args.batch_size} x seq {args.seq_len} = {tokens:,} tokens, compute "
        f"{args.dtype}, remat {args.remat}; median over {args.rounds} interleaved rounds x "
        f"{args.steps} steps (after {args.warmup} warmup)")
  print()
  rows = []
  for method, result in results.items():
    medians = {name: statistics.median(s) for name, s in result["seconds"].items()}
    for name, median in medians.items():
      mfu = result["flops"]["total"] * tokens / median / peak
      speedup = (f"{medians['torch'] / median:.2f}x" if "torch" in medians else "n/a")
      if name in result["compiled_flops"]:
        counted = result["compiled_flops"][name]
        framework_flops = (f"{counted['xla'] / 1e12:.3f}", f"{counted['matmul'] / 1e12:.3f}")
      else:
        framework_flops = ("", "")
      framework = torch_label[method] if name == "torch" else name
      rows.append((_METHOD_LABELS[method], framework, f"{median:.4f}", f"{tokens / median:,.0f}",
                   f"{100 * mfu:.1f}%", speedup, *framework_flops))
  common.print_markdown_table(
      ("method", "framework", "step time (s)", "tokens/s", "MFU", "speedup vs torch",
       "XLA TFLOP/step", "matmul TFLOP/step"), rows)
  print()
  print("XLA TFLOP/step: the compiled step's cost analysis (a loop's body counted once: "
        "one chunk of the loss); matmul TFLOP/step: the traced step's matmuls, each scan's "
        "body counted as often as it runs.")
  print(f"MFU = model FLOPs per token x tokens per step / step time / peak; peak "
        f"{peak / 1e12:.3g} TFLOP/s ({peak_source}).")
  print("Model FLOPs per token = 6 N_trainable + 4 N_frozen + 6 n_layers seq_len n_heads "
        "head_dim: N_* = parameters of the matmul weights that train / stay frozen (block "
        "projections, the LM head -- the tied embedding counted once -- and LoRA A, B); "
        "attention counted causally (half the non-causal 12 n_layers seq_len d_attn); "
        "rematerialisation and the chunked loss's recomputation not counted.")
  for method, result in results.items():
    flops = result["flops"]
    print(f"{_METHOD_LABELS[method]}: N_trainable {flops['trainable']:,.0f}, N_frozen "
          f"{flops['frozen']:,.0f}, attention {flops['attention'] / 1e6:,.1f} MFLOP/token, "
          f"total {flops['total'] / 1e9:.4f} GFLOP/token = "
          f"{flops['total'] * tokens / 1e12:.3f} TFLOP/step; ftjax compile "
          f"{result['compile_s']:.1f}s", end="")
    if "torch" in result["seconds"]:
      paired = common.paired_ratio(
          [1 / s for s in result["seconds"]["ftjax"]], [1 / s for s in result["seconds"]["torch"]])
      print(f"; paired speedup (median of per-round ratios) {paired:.2f}x", end="")
    print()
  for method, result in results.items():
    losses = ", ".join(f"{name} {loss:.4f}" for name, loss in result["loss"].items())
    print(f"{_METHOD_LABELS[method]}: loss of the first step: {losses} (ln vocab = "
          f"{math.log(SHAPES[args.shape]['vocab_size']):.4f})")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  torch_device = common.setup(args.threads, warn_device=not args.skip_torch)
  if torch_device.type == "cuda" and args.dtype == "float32":
    torch.set_float32_matmul_precision("high")  # TF32, as JAX's default precision on GPU
  print("\n".join(common.machine_info(torch_device)), flush=True)
  peak, peak_source = peak_flops_per_s(args)
  print(f"peak: {peak / 1e12:.3g} TFLOP/s ({peak_source})", flush=True)

  base_config = make_config(args, "full")
  base = models.create(base_config.model, base_config.seed)
  num_params = common.num_params(base[1])
  batch = make_batch(args.batch_size, args.seq_len, SHAPES[args.shape]["vocab_size"], args.seed)
  results = {method: run_method(args, method, base, batch, torch_device)
             for method in args.methods}
  print_table(args, results, peak, peak_source, num_params)


if __name__ == "__main__":
  main()

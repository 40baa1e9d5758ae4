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
import math
import re
import statistics
from typing import Any, Callable

# Sets JAX_PLATFORMS and puts the repository on sys.path: imported before JAX.
if __package__:  # python -m bench.bert_train_step
  from . import common
else:  # python bench/bert_train_step.py: this file's folder is on sys.path
  import common  # type: ignore[no-redef]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import minilm_sentiment  # noqa: E402
from ftjax import models, param_groups  # noqa: E402
from ftjax.hub import assets  # noqa: E402
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
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=128)
  common.add_timing_flags(parser, steps=3)
  parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                      help="also time ftjax with compute_dtype=bfloat16")
  parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                      help="also print optimizer-state bytes and trainable counts per method")
  parser.add_argument("--seed", type=int, default=0, help="seeds the batch and the head")
  args = parser.parse_args(argv)
  common.check_counts(parser, args, ("rounds", "steps", "batch_size", "seq_len", "threads"))
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


def make_config(args: argparse.Namespace, peft_arg: str, dtype: str = "float32") -> Any:
  """The packaged MiniLM sentiment config at the bench's shape and compute `dtype`, with
  `peft_arg` added."""
  return minilm_sentiment.get_config(
      f"{peft_arg},max_length={args.seq_len},batch_size={args.batch_size},seed={args.seed},"
      f"dtype={dtype}")


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
  decay_steps = max(common.SCHEDULE_STEPS - warmup, 1)

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


class TorchBench(common.TorchBenchBase):
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
    super().__init__(device)
    torch.manual_seed(seed)
    self.model = TorchClassifier(model_dir, config.model.num_classes,
                                 dropout=self.hidden_dropout(model_dir))
    self.attn_implementation = getattr(self.model.encoder.config, "_attn_implementation", "?")
    if config.peft.method == "lora":
      self.model.encoder = peft.get_peft_model(
          self.model.encoder, common.lora_config(config.peft, _TORCH_LORA_TARGETS))
      if lora_from is not None:
        copy_lora_a(lora_from, self.model.encoder)
    elif config.peft.method != "full":
      raise ValueError(f"torch side: peft method {config.peft.method!r} is not benchmarked")
    self.model.to(device)
    self.model.train()
    self.make_optimizer(config.optimizer, _lr_lambda(config),
                        no_decay=lambda name: name.endswith("bias") or "LayerNorm" in name)
    self.inputs = {k: torch.from_numpy(batch[k].astype(np.int64)).to(device)
                   for k in ("input_ids", "attention_mask", "token_type_ids")}
    self.labels = torch.from_numpy(batch["label"].astype(np.int64)).to(device)

  @staticmethod
  def hidden_dropout(model_dir: str) -> float:
    """The encoder's hidden dropout rate, which the head's dropout uses too."""
    return transformers.BertConfig.from_pretrained(model_dir).hidden_dropout_prob

  def loss(self) -> torch.Tensor:
    """The softmax cross-entropy of the classifier on the batch."""
    logits = self.model(**self.inputs)
    return torch.nn.functional.cross_entropy(logits, self.labels)

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


def memory_table(args: argparse.Namespace, model_dir: str, torch_device: torch.device) -> None:
  """Prints optimizer-state bytes and trainable parameter counts per method (no timing)."""
  base_config = make_config(args, "peft=full")
  base_model, base_params = models.create(base_config.model, base_config.seed)
  base_count = common.num_params(base_params)
  rows = []
  vocab_size = base_params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  tiny = make_batch(2, 16, vocab_size, args.seed)
  for label, peft_arg in _MEMORY_METHODS:
    built = common.set_up_ftjax(make_config(args, peft_arg), tiny,
                                (base_model, base_params)).built
    trainable, frozen, opt_state = built.state.params, built.frozen, built.state.opt_state
    counters = sum(x.nbytes for x in jax.tree.leaves(opt_state) if x.ndim == 0)
    rows.append(("ftjax (optax)", label, common.num_params(trainable),
                 common.num_bytes(opt_state), f"{counters} B of step counters",
                 common.num_bytes(trainable) + common.num_bytes(frozen)))
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
  common.print_markdown_table(
      ("framework", "method", "trainable params", "% of base", "optimizer state bytes", "MiB",
       "weights MiB", "note"),
      ((framework, label, f"{count:,}", f"{100 * count / base_count:.3f}%", f"{state_bytes:,}",
        f"{state_bytes / 2**20:.2f}", f"{weights / 2**20:.1f}", note)
       for framework, label, count, state_bytes, note, weights in rows))
  print()
  print("ftjax: every leaf of `tx.init(trainable)` (Adam mu + nu, float32, plus int32 step "
        "counters); torch: exp_avg + exp_avg_sq after one step. weights: trainable + frozen "
        "parameter storage (QLoRA: NF4 codes + float32 block absmaxes for the encoder's "
        "linear kernels).")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  torch_device = common.setup(args.threads)

  lora = args.peft == "lora"
  peft_arg = "peft=lora,rank=8" if lora else "peft=full"
  config = make_config(args, peft_arg)
  model_dir = assets.model_dir(config.model.pretrained)
  print("\n".join(common.machine_info(torch_device)), flush=True)
  print(f"model: {model_dir}", flush=True)
  what = (f"LoRA r={config.peft.rank} (query, value; alpha {config.peft.alpha:g}, dropout "
          f"{config.peft.dropout:g}) + head" if lora else "full fine-tune")
  print(f"method: {what}, lr {config.optimizer.lr:g}", flush=True)

  base = models.create(config.model, config.seed)
  vocab_size = base[1]["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  batch = make_batch(args.batch_size, args.seq_len, vocab_size, args.seed)

  benches: dict[str, Any] = {}
  dtypes = ["float32"] + (["bfloat16"] if args.bf16 else [])
  for dtype in dtypes:
    bench = common.FtjaxBench(make_config(args, peft_arg, dtype), batch, base)
    print(f"ftjax {dtype}: compiled in {bench.compile_s:.1f}s", flush=True)
    benches[f"ftjax {dtype}"] = bench
  ours = benches["ftjax float32"]  # its starting weights, read before any step donates them
  model, trainable, frozen = ours.built.model, ours.state.params, ours.frozen
  num_params = common.num_params(trainable) + common.num_params(frozen)
  every = param_groups.combine(trainable, frozen)
  torch_bench = TorchBench(config, model_dir, batch, torch_device, args.seed,
                           lora_from=trainable if lora else None)
  torch_params = sum(p.numel() for p in torch_bench.model.parameters())
  print(f"torch: attn_implementation={torch_bench.attn_implementation}; parameters "
        f"ftjax {num_params:,} / torch {torch_params:,}", flush=True)
  ours, theirs = common.num_params(trainable), torch_bench.num_trainable()
  print(f"trainable parameters: ftjax {ours:,} / torch {theirs:,}"
        + ("" if ours == theirs else "  WARNING: they differ"), flush=True)
  diff = check_same_weights(model, every, torch_bench, batch)
  print(f"same weights: max |hidden_ftjax - hidden_torch| (eval mode) = {diff:.2e}", flush=True)
  del trainable, frozen, every
  # Round order: ftjax float32, torch, then ftjax bfloat16 (the headline pair adjacent).
  order = ["ftjax float32", "torch float32"] + [f"ftjax {d}" for d in dtypes[1:]]
  benches["torch float32"] = torch_bench
  benches = {name: benches[name] for name in order}

  rates = common.time_interleaved(benches, args.warmup, args.rounds, args.steps, rate=True)

  for name, bench in benches.items():
    loss = bench.first_loss
    print(f"{name}: loss of the first step = {loss:.4f} (ln 2 = {math.log(2):.4f})"
          if loss is not None else f"{name}: no loss")

  baseline = statistics.median(rates["torch float32"])
  torch_label = "torch + peft" if lora else "torch"
  print()
  print(f"MiniLM-L6 {what} train step, batch {args.batch_size} x seq {args.seq_len}, "
        f"2 classes; {args.rounds} interleaved rounds x {args.steps} steps "
        f"(after {args.warmup} warmup); median over rounds")
  print()
  rows = []
  for name in benches:
    framework, dtype = name.split()
    framework = torch_label if framework == "torch" else framework
    med = statistics.median(rates[name])
    rows.append((framework, dtype, f"{med:.3f}", f"{min(rates[name]):.3f}-{max(rates[name]):.3f}",
                 f"{med * args.batch_size:.1f}", f"{1000 / med:.0f}", f"{med / baseline:.2f}x",
                 f"{common.paired_ratio(rates[name], rates['torch float32']):.2f}x"))
  common.print_markdown_table(
      ("framework", "compute dtype", "steps/s (median)", "min-max steps/s", "examples/s",
       "ms/step", "ratio vs torch", "paired ratio"), rows)
  print()
  print("ratio vs torch: median steps/s over median torch steps/s; paired ratio: median over "
        "rounds of the ratio within each round (less sensitive to machine-load drift).")
  print(f"ftjax/{torch_label} (float32, {args.peft}) = "
        f"{statistics.median(rates['ftjax float32']) / baseline:.2f} "
        f"(paired {common.paired_ratio(rates['ftjax float32'], rates['torch float32']):.2f})",
        flush=True)
  if args.memory:
    memory_table(args, model_dir, torch_device)


if __name__ == "__main__":
  main()

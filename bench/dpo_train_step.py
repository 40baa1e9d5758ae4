r"""python bench/dpo_train_step.py [--methods lora,full] [--pairs 4] [--seq_len 128]

DPO train step of SmolLM2-135M-Instruct: ftjax against TRL's `DPOTrainer`, on the
same weights, the same pairs and the same machine: time per step, pairs/s, peak
host memory and the bytes of weights each side holds.

Both sides read the packaged model's llama.cpp GGUF file (Q4_1, dequantized to
float32: ftjax with its own reader, transformers with
`AutoModelForCausalLM.from_pretrained(<folder>, gguf_file=...)`) and its
tokenizer, and train on the same `--pairs` string pairs (a prompt of about
seq_len / 4 words, a chosen and a rejected completion of seq_len words; seeded
synthetic text), each side truncated to `--seq_len` tokens as TRL truncates
(keep the start), so every step is 2 x pairs sequences of exactly seq_len tokens
on both sides. DPO (sigmoid loss), beta 0.1, float32, AdamW with the config's
learning rate, warmup and cosine decay, clipping to 1.0, no weight decay, no
gradient checkpointing (the config's `remat=none`; TRL's `DPOConfig` turns it on
by default, here `gradient_checkpointing=False`).

* `lora`: rank 8, alpha 16 on the seven projections of every block
  (`configs/smollm2_preference.py`). ftjax: the config's LoRA (adapter dropout
  0.05, as the config has it). TRL: `peft_config=LoraConfig(r=8, lora_alpha=16,
  lora_dropout=0.05, target_modules=<the 7 projections>)` and no `ref_model`, so
  its reference pass runs the policy with the adapters disabled; `DPOConfig`'s
  default `disable_dropout=True` sets every dropout, the adapters' too, to 0.
* `full`: every parameter trains. TRL twice: with a second copy of the model as
  `ref_model` (what `DPOTrainer` does without `precompute_ref_log_probs`: a
  reference forward pass every step), and with `precompute_ref_log_probs=True`
  (the reference log-probabilities computed once before training by the policy
  itself, no second copy).

* ftjax: the trainer's set-up (`ftjax.run_setup` from
  `configs/smollm2_preference.py:peft=<method>,batch_size=<pairs>,
  max_length=<seq_len>,dtype=float32`), the pairs tokenized by
  `ftjax.data.preference.tokenize_pairs`; the reference step the trainer runs
  before training fills the batch's `ref_logps` (it is not held as a second
  model), then the compiled, state-donating train step is timed on that batch
  (timing ends with `block_until_ready`).
* TRL: `trainer.train()` with `max_steps` = warmup + rounds x steps, run in a
  thread; a callback times the steps from one `on_step_end` to another (so a step
  includes the Trainer's batch fetch and collation, the policy's forward and
  backward, the reference forward where there is one, clipping, AdamW and the
  schedule) and holds the loop between timed runs.

Each (side, method) runs in its own process, so the peak resident memory
(`getrusage(RUSAGE_SELF).ru_maxrss`, after set-up and every step; on a CPU this is
where both frameworks keep weights and activations) is that side's alone. Every
process imports JAX, torch, transformers and TRL; the "imports only" row is such a
process that loads nothing, the floor under every other row. "weights held" is
computed from the arrays after the last step: ftjax's parameters (trainable and
frozen) and optimizer state; TRL's policy (with LoRA: base and adapters), its
reference model if it has one, and the AdamW state.

Timing: the processes of one method are set up one after another and stay alive;
after `--warmup` steps of each, every round times `--steps` steps of each in turn,
for `--rounds` rounds (interleaved, so a change in the machine's load hits every
side). The table gives the median step time over rounds, pairs/s and the median of
the per-round ratios to TRL's default set-up (LoRA: adapters disabled for the
reference; full: a reference copy); "set-up" is the seconds from a process's start
(after its imports) to its first step: loading the model, compiling (ftjax) and the
reference pass (ftjax; TRL with `precompute_ref_log_probs`). The first step's loss
is log 2 = 0.6931 on every side up to float32 rounding (the policy starts as the
reference). Torch uses `--threads` intra-op threads and XLA every core: on a
loaded machine `--threads 1` keeps torch's threads from waiting for each other at
every operation (many times slower otherwise). Methods run
one after another, so the processes of only one method share the memory at a
time. JAX_PLATFORMS defaults to `cpu` on machines without an NVIDIA device; torch
runs on the CPU here whatever JAX runs on.

Flags: --methods, --pairs, --seq_len, --rounds, --steps, --warmup, --threads, --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, TextIO

# Sets JAX_PLATFORMS and puts the repository on sys.path: imported before JAX.
if __package__:  # python -m bench.dpo_train_step
  from . import common
else:  # python bench/dpo_train_step.py: this file's folder is on sys.path
  import common  # type: ignore[no-redef]

import datasets  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

from configs import smollm2_preference  # noqa: E402
from ftjax.data import preference  # noqa: E402
from ftjax.data import tokenizer as tokenizer_lib  # noqa: E402
from ftjax.hub import assets, gguf  # noqa: E402

MODEL = "smollm2-135m-instruct"
METHODS = ("lora", "full")
# (side, method) of each process, in the order of the table's rows.
SIDES = {"lora": ("ftjax", "trl"), "full": ("ftjax", "trl", "trl precompute")}
_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_WORDS = ("the", "film", "was", "a", "warm", "funny", "quiet", "long", "slow", "bright", "dull",
          "story", "of", "an", "old", "man", "who", "finds", "his", "way", "home", "after",
          "years", "at", "sea", "with", "plot", "music", "cast", "scenes", "ending", "and",
          "every", "moment", "felt", "true", "or", "false", "to", "me")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line; `methods` becomes a list."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default="lora,full",
                      help=f"comma-separated, from {list(METHODS)}")
  parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
  parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
  common.add_timing_flags(parser, steps=1)
  parser.set_defaults(rounds=3, warmup=1)
  parser.add_argument("--seed", type=int, default=0, help="seeds the pairs and LoRA's A")
  parser.add_argument("--child", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not args.methods or not set(args.methods) <= set(METHODS):
    parser.error(f"--methods: {args.methods}; choose from {list(METHODS)}")
  common.check_counts(parser, args, ("pairs", "seq_len", "steps", "rounds", "threads",
                                     "warmup"))
  if args.seq_len < 16:
    parser.error("--seq_len must be at least 16 (a prompt and a completion)")
  return args


def make_pairs(count: int, seq_len: int, seed: int) -> list[dict[str, str]]:
  """`count` string pairs whose prompt + completion run past `seq_len` tokens."""
  rng = np.random.default_rng(seed)
  text = lambda words: " ".join(rng.choice(_WORDS, words))
  return [{"prompt": f"Review {i}: {text(seq_len // 4)}.", "chosen": f" {text(seq_len)}",
           "rejected": f" {text(seq_len)}"} for i in range(count)]


def make_config(args: argparse.Namespace, method: str) -> ml_collections.ConfigDict:
  """The preference config of the bench: DPO, beta 0.1, float32, `method`."""
  return smollm2_preference.get_config(
      f"loss=dpo,beta=0.1,peft={method},batch_size={args.pairs},max_length={args.seq_len},"
      f"dtype=float32,seed={args.seed}")


def weights_bytes(tensors: Any) -> int:
  """The bytes of an iterable of torch tensors."""
  return sum(t.numel() * t.element_size() for t in tensors)


def load_torch_model() -> torch.nn.Module:
  """The packaged model as transformers reads its GGUF file, in float32.

  transformers dequantizes the file's tensors on loading but marks the model as
  GGUF-quantized, which the Trainer refuses to train; the mark is removed, as
  transformers does for a model loaded with `dequantize=True`.
  """
  folder = assets.model_dir(MODEL)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=os.path.basename(gguf.find_gguf(folder)), dtype=torch.float32)
  model.hf_quantizer.remove_quantization_config(model)
  return model


class FtjaxSide:
  """ftjax's trainer step on the pairs, with the reference log-probabilities of its
  reference step in the batch."""

  def __init__(self, args: argparse.Namespace, method: str, tokenizer: Any,
               pairs: list[dict[str, str]]):
    """Tokenizes the pairs, builds and compiles the step and runs the reference step."""
    source = [{"id": str(i), **{key: json.dumps(text) for key, text in pair.items()}}
              for i, pair in enumerate(pairs)]
    rows = preference.tokenize_pairs(source, preference.PairTokenizer(tokenizer, None),
                                     max_length=args.seq_len, pad_id=tokenizer.pad_token_id)
    if rows.stats.truncated != len(pairs) or rows.stats.prompt_mismatch:
      raise ValueError(f"pairs not all cut to {args.seq_len} tokens: {rows.stats.summary('')}")
    batch = {**rows.arrays, "mask": np.ones(len(pairs), bool)}
    self.bench = common.FtjaxBench(make_config(args, method), batch)
    bench = self.bench
    logps, _, _ = bench.setup.reference_step()(bench.state.params, bench.state.stats,
                                               bench.frozen, bench.batch)
    bench.batch["ref_logps"] = jax.device_put(np.asarray(logps),
                                              bench.setup.placement.batch_sharding)
    self.trainable = common.num_params(bench.state.params)

  @property
  def first_loss(self) -> float | None:
    return self.bench.first_loss

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took."""
    return self.bench.run(steps)

  def weights_bytes(self) -> int:
    """Parameters (trainable and frozen) and optimizer state."""
    return common.num_bytes((self.bench.state.params, self.bench.state.opt_state,
                             self.bench.frozen))


class TrlSide(transformers.TrainerCallback):
  """TRL's `DPOTrainer.train()` in a thread, held by this callback between timed runs."""

  def __init__(self, args: argparse.Namespace, method: str, precompute: bool, tokenizer: Any,
               pairs: list[dict[str, str]]):
    """Loads the model (and the reference copy) and builds the trainer."""
    config = make_config(args, method)
    opt = config.optimizer
    self.total = args.warmup + args.rounds * args.steps
    self._output = tempfile.TemporaryDirectory()
    dpo_args = trl.DPOConfig(
        output_dir=self._output.name, beta=config.preference.beta,
        max_length=args.seq_len, per_device_train_batch_size=args.pairs,
        learning_rate=opt.lr, lr_scheduler_type="cosine", warmup_steps=opt.warmup_steps,
        weight_decay=opt.weight_decay, adam_beta1=opt.b1, adam_beta2=opt.b2,
        adam_epsilon=opt.eps, max_grad_norm=opt.clip_norm, max_steps=self.total,
        precompute_ref_log_probs=precompute, logging_first_step=True,
        logging_steps=self.total + 1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
    peft_config = None
    if method == "lora":
      peft_config = common.lora_config(config.peft, _PROJECTIONS)
    self.trainer = trl.DPOTrainer(
        model=load_torch_model(),
        ref_model=load_torch_model() if method == "full" and not precompute else None,
        args=dpo_args, train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[self])
    collated = self.trainer.data_collator(
        [self.trainer.train_dataset[i] for i in range(len(pairs))])
    if tuple(collated["input_ids"].shape) != (2 * args.pairs, args.seq_len):
      raise ValueError(f"TRL's batch is {tuple(collated['input_ids'].shape)}")
    self.trainable = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
    self.first_loss: float | None = None
    self._commands: queue.Queue[int] = queue.Queue()
    self._results: queue.Queue[Any] = queue.Queue()
    self._thread: threading.Thread | None = None
    self._count = self._target = 0
    self._started = 0.0

  def _train(self) -> None:
    try:
      self.trainer.train()
    except BaseException as error:  # noqa: BLE001 (raised again by `run`)
      self._results.put(error)

  def run(self, steps: int) -> float:
    """Runs `steps` train steps; returns the wall-clock seconds they took (the first
    run also starts `train()`: use it as warmup)."""
    if self._thread is None:
      self._target, self._started = steps, time.perf_counter()
      self._thread = threading.Thread(target=self._train, daemon=True)
      self._thread.start()
    else:
      self._commands.put(steps)
    result = self._results.get()
    if isinstance(result, BaseException):
      raise result
    if self._count == self.total:
      self._thread.join()
    return result

  def on_step_end(self, args, state, control, **kwargs):
    """Ends a timed run at its last step, then waits for the next one."""
    self._count += 1
    if self._count == self._target:
      self._results.put(time.perf_counter() - self._started)
      if self._count < self.total:
        self._target += self._commands.get()
        self._started = time.perf_counter()

  def on_log(self, args, state, control, logs=None, **kwargs):
    """Keeps the first logged loss (the first step's)."""
    if self.first_loss is None and logs and "loss" in logs:
      self.first_loss = float(logs["loss"])

  def weights_bytes(self) -> int:
    """The policy, the reference model if any, and the optimizer state."""
    total = weights_bytes(self.trainer.model.parameters())
    if self.trainer.ref_model is not None:
      total += weights_bytes(self.trainer.ref_model.parameters())
    return total + weights_bytes(
        value for state in self.trainer.optimizer.state.values() for value in state.values()
        if isinstance(value, torch.Tensor))


def _child(args: argparse.Namespace) -> None:
  """One side of one method in this process: set-up, then the parent's commands on
  stdin ("run N", "done"); its replies are JSON lines on the original stdout."""
  channel = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # libraries' prints go to stderr
  side_name, method = args.child
  started = time.perf_counter()
  common.setup(args.threads, warn_device=False)
  side: Any = None
  if side_name != "imports":
    tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir(MODEL))
    pairs = make_pairs(args.pairs, args.seq_len, args.seed)
    if side_name == "ftjax":
      side = FtjaxSide(args, method, tokenizer, pairs)
    else:
      side = TrlSide(args, method, side_name == "trl precompute", tokenizer, pairs)
  send = lambda **message: print(json.dumps(message), file=channel, flush=True)
  send(setup_s=time.perf_counter() - started, trainable=side.trainable if side else 0)
  for line in sys.stdin:
    if line.startswith("run "):
      send(seconds=side.run(int(line.split()[1])))
    else:
      break
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  send(rss=rss, weights=side.weights_bytes() if side else 0,
       first_loss=side.first_loss if side else None)


class Process:
  """A child process running one side (`_child`), timed through its pipe."""

  def __init__(self, args: argparse.Namespace, side: str, method: str, log: TextIO):
    """Starts the child and waits until it is set up; its stderr goes to `log`."""
    command = [sys.executable, os.path.abspath(__file__), "--child", side, method,
               f"--pairs={args.pairs}", f"--seq_len={args.seq_len}", f"--rounds={args.rounds}",
               f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}",
               f"--seed={args.seed}"]
    self.name = side if side == "imports" else f"{side} {method}"
    self._log = log
    self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True, env=os.environ.copy())
    self.ready = self._reply()
    self.first_loss: float | None = None
    self.final: dict[str, Any] = {}

  def _reply(self) -> dict[str, Any]:
    line = self._process.stdout.readline()
    if not line:
      self._process.wait()
      self._log.seek(0)
      sys.exit(f"{self.name} failed (exit {self._process.returncode}):\n"
               f"{self._log.read()[-4000:]}")
    return json.loads(line)

  def run(self, steps: int) -> float:
    """Has the child run `steps` steps; returns their seconds."""
    self._process.stdin.write(f"run {steps}\n")
    self._process.stdin.flush()
    return self._reply()["seconds"]

  def finish(self) -> dict[str, Any]:
    """Ends the child; returns its peak RSS, weight bytes and first loss."""
    self._process.stdin.write("done\n")
    self._process.stdin.flush()
    self.final = self._reply()
    self.first_loss = self.final["first_loss"]
    self._process.wait()
    return self.final


def run_method(args: argparse.Namespace, method: str, log: TextIO) -> list[dict[str, Any]]:
  """Sets up, warms up and times every side of `method`; returns one result per side."""
  processes = {}
  for side in SIDES[method]:
    process = Process(args, side, method, log)
    print(f"{process.name}: set up in {process.ready['setup_s']:.1f}s, "
          f"{process.ready['trainable']:,} trainable parameters", flush=True)
    processes[process.name] = process
  seconds = common.time_interleaved(processes, args.warmup, args.rounds, args.steps, rate=False)
  results = []
  for name, process in processes.items():
    results.append({"method": method, "side": name.rsplit(" ", 1)[0], "seconds": seconds[name],
                    **process.ready, **process.finish()})
  return results


def print_table(args: argparse.Namespace, results: list[dict[str, Any]],
                floor: dict[str, Any]) -> None:
  """Prints the Markdown table of step time, pairs/s, memory and set-up."""
  mib = lambda n: f"{n / 2**20:,.0f}"
  rows = []
  for result in results:
    step = statistics.median(result["seconds"])
    baseline = next(r for r in results if r["method"] == result["method"] and r["side"] == "trl")
    ratio = common.paired_ratio([1 / s for s in result["seconds"]],
                                [1 / s for s in baseline["seconds"]])
    loss = result["first_loss"]
    rows.append((result["method"], result["side"], f"{step:.3f}", f"{args.pairs / step:.2f}",
                 f"{ratio:.2f}x", "n/a" if loss is None else f"{loss:.4f}",
                 f"{result['trainable']:,}", mib(result["weights"]), mib(result["rss"]),
                 f"{result['setup_s']:.0f}"))
  rows.append(("-", "imports only", "", "", "", "", "", "", mib(floor["rss"]), ""))
  print()
  print(f"{MODEL}, DPO beta 0.1, float32: {args.pairs} pairs x 2 sequences x {args.seq_len} "
        f"tokens per step; median over {args.rounds} interleaved rounds x {args.steps} steps "
        f"(after {args.warmup} warmup)")
  print()
  common.print_markdown_table(
      ("method", "side", "step (s)", "pairs/s", "speed vs trl", "first loss", "trainable",
       "weights held (MiB)", "peak RSS (MiB)", "set-up (s)"), rows)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child:
    _child(args)
    return
  started = time.perf_counter()
  torch_device = common.setup(args.threads, warn_device=False)
  print("\n".join(common.machine_info(torch_device)) + f"; trl {trl.__version__}", flush=True)
  with tempfile.TemporaryFile("w+") as log:
    floor = Process(args, "imports", "-", log)
    floor.finish()
    results = [result for method in args.methods for result in run_method(args, method, log)]
  print_table(args, results, floor.final)
  print(f"\nwall time {time.perf_counter() - started:.0f}s, 1-min load average "
        f"{common.load_average()}")


if __name__ == "__main__":
  main()

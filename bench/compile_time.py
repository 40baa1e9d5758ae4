r"""python bench/compile_time.py [--depths 4,16,32] [--methods full,lora] [--hidden 64]

Compile time of the train step against the decoder's depth, with the blocks in a
Python loop (`config.model.scan_layers=False`) and scanned (`True`), for full
fine-tuning and LoRA, plus the step time once compiled.

The step is the one the trainer compiles (`bench/common.py`'s `FtjaxBench`: the
config of `configs/smollm2_chat.py` with random weights of a small Llama-shaped
decoder: `--hidden` wide, 4 heads, 2 key/value heads, an MLP 4 times as wide, a
vocabulary of 512); LoRA is that config's (rank 8 on every projection, dropout
0.05). Compile time is `lower(...).compile()` of the jitted step; step time the
median over `--rounds` rounds of `--steps` steps. On a shared machine, note the
load (`uptime`) with the figures: the table prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics

if __package__:  # python -m bench.compile_time
  from . import common
  from .llama_train_step import make_batch
else:  # python bench/compile_time.py
  import common  # type: ignore[no-redef]
  from llama_train_step import make_batch  # type: ignore[no-redef]

from configs import smollm2_chat  # noqa: E402


def make_config(method: str, depth: int, scan: bool, args: argparse.Namespace):
  """The SmolLM2 fine-tuning config with a random decoder of `depth` blocks."""
  config = smollm2_chat.get_config(f"peft={method},batch_size={args.batch_size},"
                                   f"max_length={args.seq_len},dtype=float32")
  with config.unlocked():
    config.model.pretrained = ""
    config.model.arch = dict(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    config.model.scan_layers = scan
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="4,16,32")
  parser.add_argument("--methods", default="full,lora")
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  batch = make_batch(args.batch_size, args.seq_len, 512, seed=0)
  rows = []
  for method in args.methods.split(","):
    for depth in (int(d) for d in args.depths.split(",")):
      for scan in (False, True):
        bench = common.FtjaxBench(make_config(method, depth, scan, args), batch)
        bench.run(1)  # warm-up
        step_s = statistics.median(bench.run(args.steps) / args.steps
                                   for _ in range(args.rounds))
        load = os.getloadavg()[0]
        rows.append((method, depth, "scan" if scan else "loop", bench.compile_s, step_s, load))
        print(f"{method} depth {depth} {rows[-1][2]}: compiled in {bench.compile_s:.2f}s, "
              f"{step_s * 1e3:.1f} ms/step (load {load:.1f})", flush=True)
  import jax  # pylint: disable=import-outside-toplevel
  print(f"\njax {jax.__version__}, {jax.devices()[0].device_kind}, cpu: {common._cpu_model()}, "
        f"{os.cpu_count()} cores; load at the end {common.load_average()}")
  print("| method | blocks | loop compile (s) | scan compile (s) | loop step (ms) "
        "| scan step (ms) | load (1 min) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for i in range(0, len(rows), 2):
    loop, scan = rows[i], rows[i + 1]
    print(f"| {loop[0]} | {loop[1]} | {loop[3]:.2f} | {scan[3]:.2f} | {loop[4] * 1e3:.1f} "
          f"| {scan[4] * 1e3:.1f} | {loop[5]:.1f}-{scan[5]:.1f} |")


if __name__ == "__main__":
  main()

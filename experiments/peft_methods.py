r"""python experiments/peft_methods.py --workdir=/tmp/ftjax/peft_methods

Fine-tunes MiniLM-L6 on Rotten Tomatoes once per method of choosing what trains
(full fine-tuning, linear probe, frozen blocks, BitFit, LoRA, DoRA, QLoRA,
layer-wise LR decay, gradual unfreezing), each with the config's defaults
(one epoch), and writes a markdown table of test accuracy, trainable
parameters, parameter and optimizer-state memory and training speed to
`peft_methods.md` next to this file. Runs already finished in the workdir are
not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/minilm_sentiment.py"
VARIANTS = ["", "freeze=all_but_head", "freeze_blocks=3", "peft=bitfit", "peft=lora,rank=8",
            "peft=dora,rank=8", "peft=qlora,rank=8", "llrd=0.8", "unfreeze_every=40"]


def run_variant(arg: str, workdir: str) -> str:
  """Trains one variant (unless finished); returns its log."""
  log_path = os.path.join(workdir, "train.log")
  if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
    os.makedirs(workdir, exist_ok=True)
    with open(log_path, "w") as log:
      subprocess.run([sys.executable, os.path.join(_REPO, "launch", "train.py"),
                      f"--config={CONFIG}:{arg}", f"--workdir={workdir}"],
                     cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  with open(log_path) as f:
    return f.read()


def summarize(arg: str, workdir: str, log: str) -> str:
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  summary = re.search(r"parameters: ([\d,]+) trainable, ([\d,]+) in the base model; "
                      r"parameter memory ([\d.]+) MiB .*optimizer state ([\d.]+) MiB", log)
  rates = [float(r) for r in re.findall(r"([\d.]+) steps/s", log)]
  trainable, base, param_mib, opt_mib = summary.groups()
  share = 100 * int(trainable.replace(",", "")) / int(base.replace(",", ""))
  return (f"| `{arg or '(full fine-tune)'}` | {final['test']['accuracy']:.4f} "
          f"| {final['validation']['accuracy']:.4f} | {trainable} ({share:.2f}%) "
          f"| {param_mib} | {opt_mib} | {statistics.median(rates):.2f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variants", nargs="*", default=VARIANTS)
  args = parser.parse_args()
  rows = []
  for arg in args.variants:
    workdir = os.path.join(args.workdir, re.sub(r"[^\w]+", "_", arg) or "full")
    log = run_variant(arg, workdir)
    rows.append(summarize(arg, workdir, log))
    print(rows[-1], flush=True)
  table = "\n".join([
      "| variant | test accuracy | validation accuracy | trainable parameters "
      "| parameter MiB | optimizer state MiB | steps/s |",
      "|---|---|---|---|---|---|---|", *rows])
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_methods.md"),
            "w") as f:
    f.write(f"# Rotten Tomatoes with MiniLM-L6: what to train\n\n`python {__doc__.split()[1]} "
            f"--workdir=...`; one epoch each, seed 0, CPU.\n\n{table}\n")
  print(table)


if __name__ == "__main__":
  main()

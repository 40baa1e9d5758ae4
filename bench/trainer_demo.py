r"""The demo end to end against transformers' Trainer with the same recipe, interleaved.

    python bench/trainer_demo.py [--rounds=1] [--workdir=/tmp/ftjax_trainer_demo]

Each round runs, one after the other on the same machine, each as a fresh process:

* ftjax: `launch/train.py --config=configs/minilm_sentiment.py` (what `make demo`
  runs), each batch's texts packed end to end (`config.data.packing`; `--packing=off`
  pads each batch to its bucket, `config.data.buckets`, and with `--buckets=off` to 64
  tokens), compiling every step afresh (`--compile_cache=off`: a first run's cost);
* transformers: `Trainer` on the same split of Rotten Tomatoes (ftjax's prepared
  copy), the same weights (the packaged all-MiniLM-L6-v2) and the same recipe:
  transformers' `BertModel` + masked mean pooling + dropout + a zero-initialised
  linear head, batch 32, one epoch, texts truncated to 64 tokens and each batch
  padded to its longest (`DataCollatorWithPadding`), AdamW (lr 5e-5, weight decay
  0.01, not on biases and LayerNorm), 60 warmup steps then linear decay, gradient
  clipping at 1.0, validation every 200 steps and at the end, the best model tested.

It prints each side's wall time (start of the process to its test accuracy),
training steps/s (steps over the time from the first step to the last validation,
validations included, as the Trainer's `train_runtime` counts them), test accuracy
and macro-F1, and the load average at the start and end of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 64


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _env() -> dict[str, str]:
  """The environment of the runs: this checkout's ftjax first."""
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}


def _run_ftjax(workdir: str, packing: str, buckets: str, max_steps: int) -> dict:
  """The demo's command in a fresh process; its figures from its output and files."""
  shutil.rmtree(workdir, ignore_errors=True)
  command = [sys.executable, os.path.join(REPO, "launch", "train.py"),
             "--config=configs/minilm_sentiment.py", f"--workdir={workdir}",
             "--compile_cache=off", f"--config.data.packing={packing}",
             f"--config.data.buckets={buckets}"] + (
                 [f"--config.total_steps={max_steps}"] if max_steps > 0 else [])
  started = time.perf_counter()
  first_step = last_eval = None
  steps = 0
  with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, env=_env()) as process:
    for line in process.stdout:
      now = time.perf_counter() - started
      if " steps (" in line and "per epoch" in line:  # the loop starts
        first_step, steps = now, int(line.split()[0])
      elif line.startswith("validation step"):
        last_eval = now
    if process.wait():
      raise RuntimeError(f"ftjax exited with {process.returncode}")
  wall = time.perf_counter() - started
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    test = json.load(f)["test"]
  return {"wall_s": wall, "train_s": last_eval - first_step,
          "steps_per_s": steps / (last_eval - first_step), "steps": steps,
          "accuracy": test["accuracy"], "macro_f1": test["macro_f1"]}


def _run_trainer(workdir: str, max_steps: int) -> dict:
  """transformers' Trainer on the same data and recipe (in this process)."""
  started = time.perf_counter()
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from ftjax.data import sources  # pylint: disable=import-outside-toplevel
  from ftjax.hub import assets  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count() or 1)
  model_dir = assets.model_dir("minilm-l6")
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  splits = sources.load_splits("rotten_tomatoes",
                               os.path.expanduser("~/.cache/ftjax/tensorflow_datasets"), None)

  class Examples(torch.utils.data.Dataset):
    def __init__(self, split):
      texts = [e["text"].decode("utf-8") for e in (split[i] for i in range(len(split)))]
      self.labels = [int(split[i]["label"]) for i in range(len(split))]
      self.encodings = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)

    def __len__(self):
      return len(self.labels)

    def __getitem__(self, i):
      item = {k: v[i] for k, v in self.encodings.items()}
      item["labels"] = self.labels[i]
      return item

  class Classifier(torch.nn.Module):
    """BertModel + masked mean pooling + dropout + zero-initialised linear head."""

    def __init__(self):
      super().__init__()
      self.encoder = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False)
      self.dropout = torch.nn.Dropout(self.encoder.config.hidden_dropout_prob)
      self.head = torch.nn.Linear(self.encoder.config.hidden_size, 2)
      torch.nn.init.zeros_(self.head.weight)
      torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, token_type_ids, labels=None):
      hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
      weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
      logits = self.head(self.dropout((hidden * weights).sum(1) / weights.sum(1)))
      loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
      return {"loss": loss, "logits": logits}

  def metrics(prediction):
    predicted, labels = prediction.predictions.argmax(-1), prediction.label_ids
    f1 = []
    for c in (0, 1):
      tp = np.sum((predicted == c) & (labels == c))
      f1.append(2 * tp / max(np.sum(predicted == c) + np.sum(labels == c), 1))
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1))}

  transformers.set_seed(0)
  data = {name: Examples(split) for name, split in splits.items()}
  args = transformers.TrainingArguments(
      output_dir=workdir, per_device_train_batch_size=32, per_device_eval_batch_size=128,
      learning_rate=5e-5, weight_decay=0.01, warmup_steps=60, lr_scheduler_type="linear",
      max_grad_norm=1.0, num_train_epochs=1, eval_strategy="steps", eval_steps=200,
      save_strategy="steps", save_steps=200, save_only_model=True,
      load_best_model_at_end=True, metric_for_best_model="accuracy", logging_steps=20,
      seed=0, report_to=[], use_cpu=True, disable_tqdm=True, max_steps=max_steps)
  trainer = transformers.Trainer(
      model=Classifier(), args=args, train_dataset=data["train"],
      eval_dataset=data["validation"], compute_metrics=metrics,
      data_collator=transformers.DataCollatorWithPadding(tokenizer))
  train = trainer.train()
  test = trainer.evaluate(data["test"], metric_key_prefix="test")
  return {"wall_s": time.perf_counter() - started, "train_s": train.metrics["train_runtime"],
          "steps_per_s": train.global_step / train.metrics["train_runtime"],
          "steps": train.global_step, "accuracy": test["test_accuracy"],
          "macro_f1": test["test_macro_f1"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--workdir", default="/tmp/ftjax_trainer_demo")
  parser.add_argument("--packing", default="auto", help="ftjax's config.data.packing")
  parser.add_argument("--buckets", default="auto", help="ftjax's config.data.buckets")
  parser.add_argument("--max_steps", type=int, default=-1,
                      help="> 0: stop both after this many steps (a quick check of the script)")
  parser.add_argument("--side", choices=("both", "ftjax", "trainer"), default="both")
  args = parser.parse_args()
  if args.side == "trainer":  # a fresh process of its own, started below
    shutil.rmtree(args.workdir, ignore_errors=True)
    print(json.dumps(_run_trainer(args.workdir, args.max_steps)))
    return
  rows = []
  for round_ in range(args.rounds):
    for side in (("ftjax", "trainer") if args.side == "both" else (args.side,)):
      load_before = _load()
      if side == "ftjax":
        result = _run_ftjax(os.path.join(args.workdir, "ftjax"), args.packing, args.buckets,
                            args.max_steps)
      else:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--side=trainer",
                              f"--workdir={os.path.join(args.workdir, 'trainer')}",
                              f"--max_steps={args.max_steps}"],
                             cwd=REPO, capture_output=True, text=True, check=True,
                             env=_env())
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - started  # the process's start included
      result.update(side=side, round=round_, load=f"{load_before} -> {_load()}")
      rows.append(result)
      print(json.dumps(result), flush=True)
  print("| round | side | wall time | training steps/s | test accuracy | test macro-F1 | "
        "load average (1, 5, 15 min) before -> after |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    minutes, seconds = divmod(round(r["wall_s"]), 60)
    print(f"| {r['round']} | {r['side']} | {minutes} min {seconds:02d} s | "
          f"{r['steps_per_s']:.3f} ({r['steps']} steps in {r['train_s']:.0f} s) | "
          f"{r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['load']} |")


if __name__ == "__main__":
  main()

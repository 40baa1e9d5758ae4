r"""Controlled sentiment generation (DPO paper, Rafailov et al. 2023, Figure 2 left), CPU-sized.

  nice -n 10 python experiments/dpo_sentiment.py --workdir=/tmp/ftjax/dpo_sentiment

About 45 minutes on 2 CPU cores shared with other work (the committed results: 43 min
for this script, 4-7 min per LoRA run, plus 4 min for the reward run);
`--preference_lrs=1e-3` alone (three preference runs instead of six) takes about 30.

SmolLM2-135M-Instruct continues the first words of Rotten Tomatoes reviews as plain
text (no chat template); the reward of a text (prompt + completion) is the
probability of "fresh" under a MiniLM-L6 classifier fine-tuned with ftjax
(`configs/minilm_sentiment.py:short`). The steps, each skipped when already done:

1. the reward model's run (`<workdir>/reward`);
2. preference pairs: two completions sampled (temperature 1) for each training
   prompt (the first `--prompt_words` words of a train-split review), the one with
   the higher reward chosen, written as TRL's explicit-prompt JSON Lines to
   `<results_dir>/pairs.jsonl`; an existing file is reused as it is (delete it to
   sample new pairs, e.g. after changing the sizes);
3. LoRA runs of SmolLM2-135M-Instruct through `launch/train.py`: SFT on the fresh
   train-split reviews, DPO at each of `--betas` and SimPO on the pairs, the
   preference runs at each of `--preference_lrs` (`<workdir>/<method>`; a finished
   run is not run again). The SFT data are the reviews as plain-text passages
   (`{"text"}` rows, every token trained), not prompt-completion rows: ftjax renders
   string prompt-completion rows as a user and an assistant turn of the chat
   template, and the models here continue plain text;
4. evaluation on `--eval_prompts` test-split prompts, for the starting model and
   each run: the mean reward of greedy and of sampled (temperature 1)
   completions, and the KL divergence from the starting model on the sampled
   completions, sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]
   averaged over samples (kept per model in `<workdir>/<method>/eval.json`);
5. `<results_dir>/results.md` (the table, sizes, commands, times) and
   `<results_dir>/reward_vs_kl.png`.

On a GPU, the same code at larger sizes: more prompts, longer completions, more
steps, the longer reward run, full fine-tuning (at learning rates around the
preference config's default for it, 1e-6):

  python experiments/dpo_sentiment.py --workdir=/tmp/ftjax/dpo_sentiment_gpu \
      --results_dir=experiments/results/dpo_sentiment_gpu --train_prompts=4096 \
      --eval_prompts=512 --new_tokens=48 --max_length=64 --steps=1000 --batch_size=32 \
      --betas=0.05,0.1,0.5,1 --peft=full --preference_lrs=1e-6,5e-6 \
      --reward_config=configs/minilm_sentiment.py
"""

from __future__ import annotations

import functools
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from ftjax import generate as generate_lib
from ftjax import runs, tasks
from ftjax.data import registry, sources
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.hub import assets

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ftjax/dpo_sentiment",
                               "Where the runs, logs and per-model evaluations go.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "experiments/results/dpo_sentiment",
                                   "Where pairs.jsonl, results.md and the plot go.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/.cache/ftjax/tensorflow_datasets",
                                "The prepared data sets.")
_REWARD_CONFIG = flags.DEFINE_string("reward_config", "configs/minilm_sentiment.py:short",
                                     "The reward classifier's config.")
_TRAIN_PROMPTS = flags.DEFINE_integer("train_prompts", 256, "Training prompts (= pairs).")
_EVAL_PROMPTS = flags.DEFINE_integer("eval_prompts", 64, "Held-out (test-split) prompts.")
_PROMPT_WORDS = flags.DEFINE_integer("prompt_words", 5, "Words of a review in its prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 20, "Tokens generated per completion.")
_STEPS = flags.DEFINE_integer("steps", 50, "Optimizer steps of each run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Pairs (SFT: packed rows) per step.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 32, "Tokens per training sequence.")
_BETAS = flags.DEFINE_list("betas", ["0.1", "0.5"], "DPO's beta values.")
_SIMPO_BETA = flags.DEFINE_float("simpo_beta", 2.0, "SimPO's beta (0: no SimPO run).")
_PEFT = flags.DEFINE_string("peft", "lora", "lora, full, dora or qlora.")
_PREFERENCE_LRS = flags.DEFINE_list(
    "preference_lrs", ["2e-4", "1e-3"], "DPO / SimPO learning rates, a run of each method "
    "at each (0: the config's default, 5e-5 for LoRA, 1e-6 full); the runs at the first "
    "are named <method>_<beta>, the others <method>_<beta>_lr<lr>. LoRA's SFT rate and "
    "five times that by default, so that a few dozen steps move the model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds prompt choice, sampling and the runs.")

BASE = "smollm2-135m-instruct"
FRESH = "fresh"


def _python() -> str:
  """This interpreter, relative to the repository when inside it (for the commands)."""
  return os.path.relpath(sys.executable, _REPO) if sys.executable.startswith(_REPO) else (
      sys.executable)


# ----------------------------------------------------------------------------- runs


def train(name: str, args: Sequence[str]) -> tuple[str, str]:
  """Runs `launch/train.py` with `args` in `<workdir>/<name>` unless finished there.

  Returns:
    (workdir of the run, the command line).
  """
  workdir = os.path.join(_WORKDIR.value, name)
  command = [_python(), "launch/train.py", *args, f"--workdir={workdir}"]
  if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
    os.makedirs(workdir, exist_ok=True)
    print(f"training {name}: {' '.join(command)}", flush=True)
    with open(os.path.join(workdir, "train.log"), "a") as log:
      subprocess.run(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  return workdir, " ".join(command)


def lm_args(config: str, words: str) -> list[str]:
  """The arguments of a SmolLM2 run: sizes in the arg string; validation at the end (and
  at each epoch's end), whose lowest loss picks the weights evaluated here."""
  steps = _STEPS.value
  arg = (f"{words},peft={_PEFT.value},steps={steps},batch_size={_BATCH_SIZE.value},"
         f"max_length={_MAX_LENGTH.value},seed={_SEED.value}")
  return [f"--config={config}:{arg.lstrip(',')}", "--config.eval_at_start=False",
          f"--config.eval_every={steps}", f"--config.checkpoint.every={steps}"]


# ----------------------------------------------------------------------------- reward


class Reward:
  """P(fresh) of texts under a finished classification run's best weights."""

  def __init__(self, workdir: str, max_length: int = 64, batch: int = 64):
    config, model, self.weights = runs.best_weights(workdir)
    self.index = runs.class_names(workdir).index(FRESH)
    source = config.data.tokenizer or config.model.pretrained
    path = source if os.path.isfile(source) else os.path.join(assets.model_dir(source),
                                                               "tokenizer.json")
    self.tokenizer = tokenizer_lib.load_tokenizer(path, max_length)
    self.batch = batch
    self.probs = jax.jit(lambda w, b: jax.nn.softmax(model.apply(w, b, train=False), -1))

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    out = []
    for start in range(0, len(texts), self.batch):
      chunk = list(texts[start:start + self.batch])
      filled = chunk + [""] * (self.batch - len(chunk))  # one compiled shape
      probs = self.probs(self.weights, self.tokenizer.encode(filled))
      out.append(np.asarray(probs)[:len(chunk), self.index])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- data


def prompts_of(split: Any, count: int, words: int, seed: int) -> list[str]:
  """The first `words` words of `count` reviews of `split` (seeded choice among those
  with at least `words` + 4 words)."""
  order = np.random.default_rng(seed).permutation(len(split))
  prompts = []
  for index in order:
    text = split[int(index)]["text"].decode().split()
    if len(text) >= words + 4:
      prompts.append(" ".join(text[:words]))
      if len(prompts) == count:
        break
  return prompts


class Lm:
  """A SmolLM2 model (pretrained or a run's, adapters merged) with its tokenizer."""

  def __init__(self, tokenizer: Any, *, workdir: str | None = None,
               pretrained: str | None = None):
    _, self.model, self.params, self.dtype = generate_lib.load_model(workdir=workdir,
                                                                     pretrained=pretrained)
    self.tokenizer = tokenizer
    # A plain-text continuation ends at <|endoftext|>; the pairs' completions at the EOS.
    self.stops = sorted({tokenizer.eos_token_id,
                         tokenizer.convert_tokens_to_ids("<|endoftext|>")})

  def sample(self, prompts: Sequence[list[int]], *, temperature: float, seed: int,
             new_tokens: int, batch: int = 64) -> list[list[int]]:
    """Completion tokens of each prompt (a final stop token included)."""
    out = []
    for start in range(0, len(prompts), batch):
      out += generate_lib.generate(
          self.model, self.params, prompts[start:start + batch], max_new_tokens=new_tokens,
          temperature=temperature, stop_tokens=self.stops, pad_id=self.tokenizer.pad_token_id,
          seed=seed + start, compute_dtype=self.dtype)
    return out

  def logps(self, prompts: Sequence[list[int]], completions: Sequence[list[int]],
            batch: int = 64) -> np.ndarray:
    """log pi(completion | prompt), summed over the completion's tokens."""
    length = generate_lib.bucket_length(max(len(p) + len(c)
                                            for p, c in zip(prompts, completions)))
    out = []
    for start in range(0, len(prompts), batch):
      rows = {key: np.zeros((batch, length), np.int32)
              for key in ("input_ids", "positions", "segment_ids", "targets")}
      mask = np.zeros((batch, length), np.float32)
      for row, (p, c) in enumerate(zip(prompts[start:start + batch],
                                       completions[start:start + batch])):
        ids = p + c
        rows["input_ids"][row, :len(ids)] = ids
        rows["positions"][row, :len(ids)] = np.arange(len(ids))
        rows["segment_ids"][row, :len(ids)] = 1
        rows["targets"][row, :len(ids) - 1] = ids[1:]
        mask[row, len(p) - 1:len(ids) - 1] = 1.0
      sums = _sequence_logps(self.model, self.params, rows, mask)
      out.append(np.asarray(sums)[:min(batch, len(prompts) - start)])
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames="model")
def _sequence_logps(model: Any, params: Any, rows: dict[str, jax.Array],
                    mask: jax.Array) -> jax.Array:
  """The sum over each row of the log-probabilities of its targets where `mask` is 1."""
  features = model.apply(params, rows, train=False, features=True)
  per_token = tasks.token_log_probs(features.hidden, features.unembed, rows["targets"], 0)
  return (per_token * mask).sum(-1)


def text_of(tokenizer: Any, ids: Sequence[int]) -> str:
  """The text of generated tokens, without special tokens (a final stop token)."""
  return tokenizer.decode(ids, skip_special_tokens=True)


def make_pairs(path: str, base: Lm, reward: Reward, prompts: list[str]) -> dict[str, float]:
  """Samples two completions per prompt, writes the pairs; returns reward statistics."""
  ids = [base.tokenizer(p)["input_ids"] for p in prompts]
  samples = [[text_of(base.tokenizer, c) for c in
              base.sample(ids, temperature=1.0, seed=_SEED.value + 1000 * k,
                          new_tokens=_NEW_TOKENS.value)] for k in range(2)]
  scores = [reward([p + c for p, c in zip(prompts, side)]) for side in samples]
  first_wins = scores[0] >= scores[1]
  # A completion that is empty (or blank) once decoded is no completion to train on.
  kept = [i for i in range(len(prompts)) if samples[0][i].strip() and samples[1][i].strip()]
  with open(path + ".tmp", "w") as f:
    for i in kept:
      prompt = prompts[i]
      chosen, rejected = (0, 1) if first_wins[i] else (1, 0)
      f.write(json.dumps({"prompt": prompt, "chosen": samples[chosen][i],
                          "rejected": samples[rejected][i]}, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)
  high, low = np.maximum(*scores)[kept], np.minimum(*scores)[kept]
  return {"chosen": float(high.mean()), "rejected": float(low.mean()),
          "dropped_empty": len(prompts) - len(kept),
          "identical": int(sum(samples[0][i] == samples[1][i] for i in kept))}


def write_sft_data(path: str, split: Any, fresh: int) -> int:
  """The fresh reviews of `split` as {"text"} JSON Lines; returns how many."""
  count = 0
  with open(path, "w") as f:
    for i in range(len(split)):
      if int(split[i]["label"]) == fresh:
        f.write(json.dumps({"text": split[i]["text"].decode()}, ensure_ascii=False) + "\n")
        count += 1
  return count


# ----------------------------------------------------------------------------- evaluation


def evaluate(name: str, load_policy: Callable[[], Lm], base: Lm, reward: Reward,
             prompts: list[str]) -> dict[str, Any]:
  """Greedy and sampled rewards of the policy (made by `load_policy`) and its KL from
  `base` (cached in `<workdir>/<name>`)."""
  path = os.path.join(_WORKDIR.value, name, "eval.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  started = time.perf_counter()
  policy = load_policy()
  ids = [policy.tokenizer(p)["input_ids"] for p in prompts]
  greedy = policy.sample(ids, temperature=0.0, seed=0, new_tokens=_NEW_TOKENS.value)
  sampled = policy.sample(ids, temperature=1.0, seed=_SEED.value + 7,
                          new_tokens=_NEW_TOKENS.value)
  kl = policy.logps(ids, sampled) - base.logps(ids, sampled)
  texts = {kind: [text_of(policy.tokenizer, c) for c in out]
           for kind, out in (("greedy", greedy), ("sampled", sampled))}
  result = {
      "name": name,
      "reward_greedy": float(reward([p + c for p, c in zip(prompts, texts["greedy"])]).mean()),
      "reward_sampled": float(reward([p + c for p, c in zip(prompts, texts["sampled"])]).mean()),
      "kl": float(kl.mean()), "kl_sem": float(kl.std() / np.sqrt(len(kl))),
      "sampled_tokens": float(np.mean([len(c) for c in sampled])),
      "greedy_examples": texts["greedy"][:4], "sampled_examples": texts["sampled"][:4],
      "eval_seconds": time.perf_counter() - started,
  }
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{name}: {result}", flush=True)
  return result


def plot(path: str, results: list[dict[str, Any]]) -> None:
  """Reward against KL from the starting model, a marker per run (filled: sampled
  completions, hollow: greedy), a color per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.2, 4.4))
  colors = {"start": "black", "sft": "tab:green", "dpo": "tab:blue", "simpo": "tab:orange"}
  shapes = "o^Dvsp<>"
  for family in ("dpo", "simpo"):  # a method's points joined in the order of their KL
    points = sorted((r for r in results if r["name"].startswith(family + "_")),
                    key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in points], [r["reward_sampled"] for r in points],
            color=colors[family], alpha=0.4)
  seen: dict[str, int] = {}
  for r in results:
    family = r["name"].split("_")[0]
    color, shape = colors[family], shapes[seen.get(family, 0) % len(shapes)]
    seen[family] = seen.get(family, 0) + 1
    ax.errorbar(r["kl"], r["reward_sampled"], xerr=r["kl_sem"], fmt=shape, color=color,
                label=r["label"])
    ax.scatter(r["kl"], r["reward_greedy"], marker=shape, facecolors="none",
               edgecolors=color)
  ax.set_xlabel("KL(policy || starting model), nats per completion")
  ax.set_ylabel("mean reward  P(fresh)")
  ax.set_title("Rotten Tomatoes sentiment: reward vs KL (SmolLM2-135M-Instruct, LoRA)\n"
               "filled: sampled completions (temperature 1), hollow: greedy", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str]) -> None:
  """Runs the steps of the module docstring, skipping those already done."""
  del argv
  started = time.perf_counter()
  os.chdir(_REPO)
  results_dir = _RESULTS_DIR.value
  os.makedirs(results_dir, exist_ok=True)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  stage_seconds: dict[str, float] = {}

  def stage(name: str, since: float) -> float:
    """Adds the seconds since `since` to stage `name`; returns now."""
    now = time.perf_counter()
    stage_seconds[name] = stage_seconds.get(name, 0.0) + now - since
    return now

  t = time.perf_counter()
  reward_dir, reward_command = train("reward", [f"--config={_REWARD_CONFIG.value}"])
  with open(os.path.join(reward_dir, "final_metrics.json")) as f:
    reward_final = json.load(f)
  reward = Reward(reward_dir)
  t = stage("reward model", t)

  splits = sources.load_splits("rotten_tomatoes", os.path.expanduser(_DATA_DIR.value))
  train_prompts = prompts_of(splits["train"], _TRAIN_PROMPTS.value, _PROMPT_WORDS.value,
                             _SEED.value)
  eval_prompts = prompts_of(splits["test"], _EVAL_PROMPTS.value, _PROMPT_WORDS.value,
                            _SEED.value)
  tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir(BASE))
  base = Lm(tokenizer, pretrained=BASE)
  pairs_path = os.path.join(results_dir, "pairs.jsonl")
  pair_stats = None
  if not os.path.exists(pairs_path):
    pair_stats = make_pairs(pairs_path, base, reward, train_prompts)
    with open(os.path.join(_WORKDIR.value, "pair_stats.json"), "w") as f:
      json.dump(pair_stats, f)
  elif os.path.exists(os.path.join(_WORKDIR.value, "pair_stats.json")):
    with open(os.path.join(_WORKDIR.value, "pair_stats.json")) as f:
      pair_stats = json.load(f)
  with open(pairs_path) as f:
    num_pairs = sum(1 for _ in f)
  t = stage("pairs", t)

  sft_path = os.path.join(_WORKDIR.value, "sft_fresh_reviews.jsonl")
  fresh = registry.presets()["rotten_tomatoes"].class_names.index(FRESH)
  num_sft = write_sft_data(sft_path, splits["train"], fresh)
  methods = [("sft", "SFT (fresh reviews)", lm_args("configs/smollm2_chat.py", "") + [
      "--config.data.name=json", f"--config.data.files.train={sft_path}",
      "--config.samples.count=0"])]
  losses = [("dpo", beta) for beta in _BETAS.value]
  losses += [("simpo", f"{_SIMPO_BETA.value:g}")] if _SIMPO_BETA.value else []
  for number, lr in enumerate(float(lr) for lr in _PREFERENCE_LRS.value):
    for loss, beta in losses:
      suffix = f"_lr{lr:g}" if number else ""
      label = f"{'DPO' if loss == 'dpo' else 'SimPO'} beta={beta}" + (
          f", lr {lr:g}" if lr else "")
      methods.append((f"{loss}_{beta}{suffix}", label, lm_args(
          "configs/smollm2_preference.py",
          f"loss={loss},beta={beta}" + (f",lr={lr:g}" if lr else ""))
                      + [f"--config.data.files.train={pairs_path}"]))
  results = [dict(evaluate("start", lambda: base, base, reward, eval_prompts),
                  label="start")]
  t = stage("evaluation", t)
  trained = []
  for name, label, args in methods:
    workdir, command = train(name, args)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      final = json.load(f)
    trained.append((name, label, workdir, command, final))
    t = stage("training", t)
    policy = functools.partial(Lm, tokenizer, workdir=workdir)
    results.append(dict(evaluate(name, policy, base, reward, eval_prompts), label=label,
                        train_seconds=final["train_seconds"], best_step=final["best_step"],
                        test=final["test"]))
    t = stage("evaluation", t)

  plot(os.path.join(results_dir, "reward_vs_kl.png"), results)
  usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                               resource.RUSAGE_CHILDREN)]
  times = add_times(os.path.join(_WORKDIR.value, "times.json"), {
      **stage_seconds, "wall": time.perf_counter() - started,
      "cpu": sum(u.ru_utime + u.ru_stime for u in usage)})
  write_report(os.path.join(results_dir, "results.md"), results, trained, reward_command,
               reward_final, pair_stats, num_pairs, num_sft, times, train_prompts,
               eval_prompts)
  with open(os.path.join(results_dir, "results.md")) as f:
    print(f.read())


def add_times(path: str, seconds: dict[str, float]) -> dict[str, float]:
  """The seconds of this invocation added to those of the earlier ones in `path`
  (the reward run trained outside this script counts its `train_seconds` only)."""
  total = {}
  if os.path.exists(path):
    with open(path) as f:
      total = json.load(f)
  for key, value in seconds.items():
    total[key] = total.get(key, 0.0) + value
  total["invocations"] = total.get("invocations", 0) + 1
  with open(path, "w") as f:
    json.dump(total, f, indent=2)
  return total


def _one_line(text: str) -> str:
  """`text` with each run of whitespace (newlines too) made one space."""
  return re.sub(r"\s+", " ", text)


def write_report(path: str, results: list[dict[str, Any]], trained: list[tuple],
                 reward_command: str, reward_final: dict[str, Any], pair_stats: dict | None,
                 num_pairs: int, num_sft: int, times: dict[str, float],
                 train_prompts: list[str],
                 eval_prompts: list[str]) -> None:
  """results.md: the table, the sizes, the commands and the times."""
  rows = [("| method | mean reward, greedy | mean reward, sampled | KL (± s.e.) "
           "| sampled tokens | best step | train s | preference accuracy (test pairs) |"),
          "|---|---|---|---|---|---|---|---|"]
  for r in results:
    accuracy = r.get("test", {}).get("rewards/accuracies")
    seconds = f"{r['train_seconds']:.0f}" if "train_seconds" in r else ""
    best = f"{r['best_step']}" if "best_step" in r else ""
    rows.append(f"| {r['label']} | {r['reward_greedy']:.3f} | {r['reward_sampled']:.3f} "
                f"| {r['kl']:.2f} ± {r['kl_sem']:.2f} | {r['sampled_tokens']:.1f} "
                f"| {best} | {seconds} | {'' if accuracy is None else f'{accuracy:.2f}'} |")
  pairs_line = (f"mean reward of the chosen completions {pair_stats['chosen']:.3f}, of the "
                f"rejected {pair_stats['rejected']:.3f}; {pair_stats['identical']} pairs "
                f"with identical completions; {pair_stats['dropped_empty']} prompts dropped "
                "for an empty completion" if pair_stats else "(reused file)")
  argv = " ".join(a for a in sys.argv[1:])
  commands = "\n".join(f"{command}" for _, _, _, command, _ in trained)
  examples = []
  for r in results:
    examples.append(f"- **{r['label']}**: " + " / ".join(
        f"*{p}*{_one_line(c)}" for p, c in zip(eval_prompts[:2], r["greedy_examples"][:2])))
  text = f"""# DPO's controlled sentiment generation on Rotten Tomatoes (CPU-sized)

Rafailov et al. 2023, Figure 2 left, with ftjax's parts: SmolLM2-135M-Instruct continues
the first {_PROMPT_WORDS.value} words of a review (plain text, no chat template) by up to
{_NEW_TOKENS.value} tokens; the reward is P(fresh) of prompt + completion under MiniLM-L6
fine-tuned on Rotten Tomatoes (`{_REWARD_CONFIG.value}`: test accuracy
{reward_final['test']['accuracy']:.3f}, {reward_final['train_seconds']:.0f} s of training).
KL: the mean over sampled completions of sum_t [log pi - log pi_ref], pi_ref the starting
model. Rewards and KL on {len(eval_prompts)} test-split prompts; greedy and sampled
(temperature 1) completions of each.

`nice -n 10 python experiments/dpo_sentiment.py {argv}`

{chr(10).join(rows)}

![reward vs KL](reward_vs_kl.png)

## Sizes

- {len(train_prompts)} training prompts (train split) -> {num_pairs} pairs in
  `pairs.jsonl` (two samples at temperature 1 from the starting model, the higher reward
  chosen): {pairs_line}.
- SFT: the {num_sft} fresh reviews of the train split as plain-text passages (every
  token trained, packed into rows of {_MAX_LENGTH.value} tokens).
- Every run: {_PEFT.value}, {_STEPS.value} steps of batch {_BATCH_SIZE.value},
  {_MAX_LENGTH.value} tokens per sequence, SFT at the config's learning rate, the
  preference runs at {', '.join(_PREFERENCE_LRS.value)} (0: the config's). Validation
  at the end and at each epoch's end; the weights of the lowest validation loss (best
  step) are the ones evaluated here. The preference runs' validation and test pairs
  are cut from pairs.jsonl (5% each); the preference accuracy is on those test pairs.
- Time: {times['wall'] / 60:.1f} min wall ({', '.join(
  f'{k} {v / 60:.1f}' for k, v in times.items() if k not in ('wall', 'cpu', 'invocations'))}
  min), {times['cpu'] / 60:.1f} min CPU time of the script and its runs, over
  {times['invocations']:.0f} invocation(s) that each skipped what was done; {os.cpu_count()}
  CPU cores shared with other work.

## Commands

```
{reward_command}
{commands}
```

## Greedy completions of the first two test prompts

{chr(10).join(examples)}
"""
  with open(path, "w") as f:
    f.write(text)


if __name__ == "__main__":
  app.run(main)

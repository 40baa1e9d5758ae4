"""Preference tuning and reward models end to end: pair files, the data check, the cached
reference, DPO / SimPO runs through the launcher, resume, and reward-model export."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import reward_model, smollm2_preference
import tiny_decoders
from conftest import ONE_DEVICE, REPO, with_overrides
from ftjax import metrics, models, reference, runs, step, tasks, trainer
from ftjax.data import check, file_preference, inputs, preference
from ftjax.errors import DataError
from launch import export as export_launcher

PROMPTS = [f"Review {i}: the film was" for i in range(40)]


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.write("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def _string_pairs(count=40):
  return [{"prompt": PROMPTS[i], "chosen": " warm, funny and moving.",
           "rejected": " dull" + " and slow" * (i % 3) + "."} for i in range(count)]


def _config(module, arg, data_dir, train_file, **overrides):
  config = module.get_config(arg)
  return with_overrides(config, **{"data.data_dir": data_dir, "data.files.train": train_file,
                                   **overrides})


# --- Reading pairs ---------------------------------------------------------------------------

_CONVERSATION = [{"role": "user", "content": "Say something."}]


@pytest.mark.parametrize("kind, columns, row, expected", [
    ("explicit", ("prompt", "chosen", "rejected"),
     {"prompt": "Q:", "chosen": " yes", "rejected": " no"}, ("Q:", " yes", " no")),
    ("implicit", ("chosen", "rejected"), {"chosen": "The sky is blue.",
                                          "rejected": "The sky is green."},
     ("The sky is", " blue.", " green.")),
    ("explicit", ("prompt", "chosen", "rejected"),
     {"prompt": _CONVERSATION, "chosen": [{"role": "assistant", "content": "Hi."}],
      "rejected": [{"role": "assistant", "content": "No."}]},
     (_CONVERSATION, [{"role": "assistant", "content": "Hi."}],
      [{"role": "assistant", "content": "No."}])),
    ("implicit", ("chosen", "rejected"),
     {"chosen": _CONVERSATION + [{"role": "assistant", "content": "Hi."}],
      "rejected": _CONVERSATION + [{"role": "assistant", "content": "No."}]},
     (_CONVERSATION, [{"role": "assistant", "content": "Hi."}],
      [{"role": "assistant", "content": "No."}])),
    ("openai", file_preference.OPENAI_COLUMNS,
     {"input": {"messages": _CONVERSATION},
      "preferred_output": [{"role": "assistant", "content": "Hi."}],
      "non_preferred_output": [{"role": "assistant", "content": "No."}]},
     (_CONVERSATION, [{"role": "assistant", "content": "Hi."}],
      [{"role": "assistant", "content": "No."}])),
])
def test_each_format_reads_to_its_prompt_chosen_and_rejected(kind, columns, row, expected):
  pair = file_preference.pair_of(kind, columns, "pairs.jsonl: line 1", 1, row)
  assert (pair["prompt"], pair["chosen"], pair["rejected"]) == expected


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q:", "chosen": " yes"}, "no value in column(s) ['rejected']"),
    ({"prompt": "Q:", "chosen": " yes", "rejected": [{"role": "assistant", "content": "no"}]},
     "all three as strings or all three as lists of messages"),
    ({"prompt": _CONVERSATION, "chosen": [{"role": "user", "content": "Hi."}],
      "rejected": [{"role": "assistant", "content": "No."}]},
     "column 'chosen': message 0: role 'user'; expected 'assistant'"),
    ({"prompt": _CONVERSATION + [{"role": "assistant", "content": "Hm."}],
      "chosen": [{"role": "assistant", "content": "Hi."}],
      "rejected": [{"role": "assistant", "content": "No."}]},
     "the prompt ends with a 'assistant' message"),
    ({"prompt": "Q:", "chosen": "  ", "rejected": " no"}, "column 'chosen': the completion is empty"),
])
def test_a_malformed_pair_is_refused_naming_the_row_and_column(row, message):
  with pytest.raises(DataError) as error:
    file_preference.pair_of("explicit", ("prompt", "chosen", "rejected"),
                            "pairs.jsonl: line 7", 7, row)
  assert "pairs.jsonl: line 7" in str(error.value) and message in str(error.value)


def test_every_malformed_row_of_a_file_is_listed(tmp_path, data_dir):
  rows = _string_pairs(10)
  del rows[3]["rejected"]
  rows[6]["chosen"] = ""
  path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
  config = _config(smollm2_preference, "debug", data_dir, path)
  with pytest.raises(DataError) as error:
    inputs.build(config)
  text = str(error.value)
  assert "2 malformed rows" in text and "line 4: no value in column(s) ['rejected']" in text
  assert "line 7: column 'chosen': the completion is empty" in text


def test_rows_of_no_known_format_are_refused_naming_the_formats(tmp_path, data_dir):
  path = _write_jsonl(tmp_path / "pairs.jsonl", [{"question": "Q", "good": "a", "bad": "b"}])
  with pytest.raises(DataError, match="preference data needs prompt, chosen and rejected"):
    inputs.build(_config(smollm2_preference, "debug", data_dir, path))


# --- Tokenized pairs and the data check -----------------------------------------------------

@pytest.fixture(scope="module")
def pair_inputs(tmp_path_factory, data_dir):
  rows = _string_pairs()
  rows[5]["rejected"] = rows[5]["chosen"]  # no preference
  rows[9]["chosen"] = " long" * 80  # longer than a sequence
  path = _write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)
  config = _config(smollm2_preference, "debug", data_dir, path,
                   **{"data.split": (0.8, 0.1, 0.1)})
  return config, inputs.build(config)


def test_a_pair_row_holds_prompt_and_completion_with_only_the_completion_trained(pair_inputs):
  config, built = pair_inputs
  tokenizer = built.tokenizer
  rows = built.splits["train"]
  example = preference.decode_pair(built.raw["train"][0])
  prompt = tokenizer(example["prompt"])["input_ids"]
  for side, row in zip(("chosen", "rejected"), range(2)):
    whole = tokenizer(example["prompt"] + example[side] + tokenizer.eos_token)["input_ids"]
    ids, mask = rows[0]["input_ids"][row], rows[0]["loss_mask"][row]
    np.testing.assert_array_equal(ids[:len(whole)], whole)
    assert whole[-1] == tokenizer.eos_token_id
    # The targets of completion tokens count, those of prompt tokens do not.
    np.testing.assert_array_equal(np.flatnonzero(mask),
                                  np.arange(len(prompt) - 1, len(whole) - 1))
    np.testing.assert_array_equal(rows[0]["targets"][row][:len(whole) - 1], whole[1:])
  assert rows[0]["input_ids"].shape == (2, config.data.max_length)


def test_the_data_check_reports_identical_and_overlong_pairs(pair_inputs):
  config, built = pair_inputs
  report = check.check(config, built)
  stats = [built.splits[split].stats for split in ("train", "validation", "test")]
  assert sum(s.identical for s in stats) == 1 and sum(s.truncated for s in stats) == 1
  assert sum(s.pairs for s in stats) == 40
  warnings = " ".join(report.warnings)
  assert "identical chosen and rejected" in warnings
  assert f"longer than config.data.max_length={config.data.max_length}" in warnings


# --- Runs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  return _write_jsonl(tmp_path_factory.mktemp("dpo_data") / "pairs.jsonl", _string_pairs())


def _launch(config, workdir, data_dir, train_file):
  """launch/train.py with configs/`config` on `train_file` to the end; returns `workdir`."""
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config=configs/{config}",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       f"--config.data.files.train={train_file}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_dpo_debug_run_through_the_launcher_starts_at_log2_and_learns(pairs_file, data_dir,
                                                                     tmp_path):
  workdir = _launch("smollm2_preference.py:debug,lr=5e-3,steps=8", str(tmp_path / "dpo"),
                    data_dir, pairs_file)
  records = metrics.read_metrics(workdir)
  validation = [r for r in records if r["split"] == "validation"]
  # The reference is the starting model: every implicit reward starts at 0, the loss at log 2.
  assert validation[0]["step"] == 0 and validation[0]["loss"] == pytest.approx(math.log(2))
  assert validation[0]["rewards/margins"] == 0.0
  assert validation[-1]["loss"] < math.log(2) - 0.05, validation
  # 8 steps at seed 0: loss 0.693 -> 0.56, margin 0 -> 0.31.
  assert validation[-1]["rewards/margins"] > 0.15 and validation[-1]["rewards/accuracies"] == 1.0
  train = [r for r in records if r["split"] == "train"]
  assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(train[0])
  assert os.path.exists(os.path.join(workdir, reference.FILE))
  # Greedy completions of validation prompts at each evaluation.
  samples = [r["samples"] for r in records if r["split"] == "samples"]
  assert len(samples) == len(validation) and samples[0][0]["prompt"] in PROMPTS


@pytest.fixture(scope="module")
def dpo_run(pairs_file, data_dir, tmp_path_factory):
  """A LoRA DPO debug run to the end: (config, workdir, final metrics)."""
  config = _config(smollm2_preference, "debug,steps=6,lr=1e-3", data_dir, pairs_file,
                   **{"checkpoint.use_async": False})
  workdir = str(tmp_path_factory.mktemp("dpo_whole"))
  return config, workdir, trainer.run(config, workdir, devices=ONE_DEVICE)


def test_the_lora_reference_is_the_base_model_with_adapters_off(dpo_run):
  config, workdir, _ = dpo_run
  with np.load(os.path.join(workdir, reference.FILE)) as saved:
    cached = saved["logps/validation"]
  # The base model alone (no adapters built at all), on the validation pairs.
  base_config = with_overrides(config, **{"peft.method": "full"})
  model, params = models.create(base_config.model, seed=base_config.seed)
  built = inputs.build(base_config)
  batch = dict(built.splits["validation"].arrays)
  batch["mask"] = np.ones(len(batch["pair_index"]), bool)
  reference_step = jax.jit(functools.partial(step.reference_step, model=model,
                                             task=tasks.get(base_config)))
  logps, _, _ = reference_step(params, None, {}, batch)
  np.testing.assert_allclose(cached, np.asarray(logps), rtol=1e-5, atol=1e-4)
  assert cached.shape == (len(built.splits["validation"]), 2) and np.all(cached < 0)


def test_a_resumed_dpo_run_equals_an_uninterrupted_one_without_recomputing(dpo_run, tmp_path):
  config, _, whole = dpo_run

  class Interrupt(Exception):
    pass

  def stop_at_3(step_number):
    if step_number == 3:
      raise Interrupt

  resumed_dir = str(tmp_path / "resumed")
  with pytest.raises(Interrupt):
    trainer.run(config, resumed_dir, on_step=stop_at_3, devices=ONE_DEVICE)
  cache = os.path.join(resumed_dir, reference.FILE)
  written = os.stat(cache).st_mtime_ns
  computed = []
  original = reference.attach

  def counting_attach(splits, compute, model, workdir, write):
    def counted(rows):
      computed.append(len(rows))
      return compute(rows)
    return original(splits, counted, model, workdir, write)

  reference.attach = counting_attach
  try:
    resumed = trainer.run(config, resumed_dir, devices=ONE_DEVICE)
  finally:
    reference.attach = original
  assert computed == [] and os.stat(cache).st_mtime_ns == written  # read back, not redone
  for key in ("validation", "test", "best_step"):
    assert resumed[key] == whole[key], key


def test_a_reference_free_simpo_run_keeps_no_reference(pairs_file, data_dir, tmp_path):
  config = _config(smollm2_preference, "debug,loss=simpo,beta=2,lr=5e-3,steps=6", data_dir,
                   pairs_file)
  workdir = str(tmp_path / "simpo")
  final = trainer.run(config, workdir, devices=ONE_DEVICE)
  assert not os.path.exists(os.path.join(workdir, reference.FILE))
  validation = [r for r in metrics.read_metrics(workdir) if r["split"] == "validation"]
  assert validation[-1]["loss"] < validation[0]["loss"] - 0.05, validation
  assert final["test"]["rewards/margins"] > validation[0]["rewards/margins"]


def test_reward_model_debug_runs_through_the_launcher(pairs_file, data_dir, tmp_path):
  workdir = _launch("reward_model.py:debug,lr=5e-3,steps=8", str(tmp_path / "reward"),
                    data_dir, pairs_file)
  validation = [r for r in metrics.read_metrics(workdir) if r["split"] == "validation"]
  assert validation[0]["loss"] == pytest.approx(math.log(2))  # the new head starts at zero
  # Seed 0: loss 0.693 -> 0.56, margin 0 -> 0.28 in 8 steps.
  assert validation[-1]["loss"] < validation[0]["loss"] - 0.05, validation
  assert validation[-1]["accuracy"] == 1.0 and validation[-1]["rewards/margins"] > 0


def test_a_reward_model_exports_as_a_one_label_sequence_classifier(pairs_file, data_dir,
                                                                  tmp_path):
  # A decoder reward model (last-token pooling, as transformers' classifiers pool) from a
  # causal LM saved by transformers: its scalar head starts new and exports as `score`.
  tiny_decoders.save_random(tmp_path / "llama", "Llama", vocab_size=49152, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, pad_token_id=2)
  config = _config(reward_model, "debug,model=smollm2,lr=5e-3,steps=4", data_dir, pairs_file,
                   **{"model.pretrained": str(tmp_path / "llama")})
  workdir = str(tmp_path / "run")
  trainer.run(config, workdir, devices=ONE_DEVICE)
  out = str(tmp_path / "export")
  export_launcher.export_run(workdir, out, "merged")
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(exported).__name__ == "LlamaForSequenceClassification"
  assert exported.config.num_labels == 1
  # The exported model scores a pair's two sides as the trained run does.
  run_config, model, weights = runs.best_weights(workdir)
  built = inputs.build(run_config)
  raw = built.splits["validation"]
  batch = built.preprocess({key: np.asarray([raw[0][key]], dtype=object)
                            for key in ("id", "prompt", "chosen", "rejected")})
  rows = tasks.pair_rows(batch)
  ours = np.asarray(model.apply(weights, rows, train=False))
  with torch.no_grad():
    theirs = exported(input_ids=torch.tensor(rows["input_ids"], dtype=torch.long),
                      attention_mask=torch.tensor(rows["attention_mask"])).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  assert abs(ours[0, 0] - ours[1, 0]) > 1e-3  # the two completions score differently


def test_a_reward_model_reads_conversations_through_the_chat_template(tmp_path, data_dir):
  rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
           "chosen": [{"role": "assistant", "content": "A kind answer."}],
           "rejected": [{"role": "assistant", "content": "Go away."}]} for i in range(20)]
  path = _write_jsonl(tmp_path / "conversations.jsonl", rows)
  config = _config(reward_model, "debug,model=smollm2,max_length=64", data_dir, path)
  built = inputs.build(config)
  raw = built.splits["train"][0]
  batch = built.preprocess({key: np.asarray([raw[key]], dtype=object)
                            for key in ("id", "prompt", "chosen", "rejected")})
  pair = preference.decode_pair(raw)
  for side, row in zip(("chosen", "rejected"), range(2)):
    text = built.render(pair["prompt"] + pair[side])
    assert text.startswith("<|im_start|>system") and pair[side][0]["content"] in text
    ids = batch["input_ids"][0, row]
    count = int(batch["attention_mask"][0, row].sum())
    np.testing.assert_array_equal(ids[:count], built.tokenizer.encode([text])["input_ids"][0][:count])
  assert not check.check(config, built).warnings


def test_the_reference_file_is_read_back_only_for_the_same_tokens_and_model(tmp_path):
  def rows(first_token):
    arrays = {key: np.zeros((3, 2, 8), np.bool_ if key == "loss_mask" else np.int32)
              for key in ("input_ids", "targets", "loss_mask", "positions", "segment_ids")}
    arrays["input_ids"][0, 0, 0] = first_token
    arrays["pair_index"] = np.arange(3, dtype=np.int32)
    arrays["ref_logps"] = np.zeros((3, 2), np.float32)
    return preference.PairRows(arrays, preference.PairStats(8))

  calls = []

  def compute(pairs):
    calls.append(len(pairs))
    return np.full((len(pairs), 2), -float(len(calls)), np.float32)

  def attach(first_token, model):
    split = rows(first_token)
    done = reference.attach({"train": split}, compute, model, str(tmp_path), write=True)
    return done["train"], split.arrays["ref_logps"][0, 0]

  assert attach(5, "model a") == ("computed", -1.0)
  assert attach(5, "model a") == ("read", -1.0)
  assert attach(6, "model a") == ("computed", -2.0)  # other tokens
  assert attach(6, "model b") == ("computed", -3.0)  # another model
  assert calls == [3, 3, 3]

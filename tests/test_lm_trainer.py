"""Language-model fine-tuning end to end: chat and text debug configs, samples, generation."""

import json
import os

import pytest

from configs import smollm2_chat, smollm2_shakespeare
from conftest import ONE_DEVICE
from ftjax import metrics, trainer


def _debug(module, data_dir, arg="debug"):
  config = module.get_config(arg)
  config.unlock()
  config.data.data_dir = data_dir
  config.lock()
  return config


def _held_out_losses_fall(workdir):
  """Asserts the validation loss fell at every evaluation, the first (step 0) being the
  starting model's. The debug runs (a small random model trained 4 steps) lowered it by
  0.0014 to 0.0024 in all, each evaluation by at least 0.0006 (seeds 0 to 2, both
  configs); with nothing learned (a learning rate of 1e-12) the losses stay equal."""
  losses = [r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "validation"]
  assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
  assert losses[0] - losses[-1] > 5e-4, losses


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("chat"))
  return workdir, trainer.run(_debug(smollm2_chat, data_dir), workdir, devices=ONE_DEVICE)


def test_chat_run_reports_held_out_loss_before_and_after(chat_run):
  workdir, final = chat_run
  records = metrics.read_metrics(workdir)
  validation = [r for r in records if r["split"] == "validation"]
  assert [r["step"] for r in validation] == [0, 2, 4]  # step 0: the starting model
  _held_out_losses_fall(workdir)
  for split in ("validation", "test"):
    assert final[split]["perplexity"] == pytest.approx(2.718281828 ** final[split]["loss"])
    assert final[split]["tokens"] > 0
  assert final["best_step"] == 4


def test_chat_run_writes_sampled_completions_at_each_evaluation(chat_run):
  workdir, _ = chat_run
  samples = [r for r in metrics.read_metrics(workdir) if r["split"] == "samples"]
  assert [r["step"] for r in samples] == [0, 2, 4]
  sample = samples[0]["samples"][0]
  assert sample["prompt"].endswith("<|im_start|>assistant\n")
  assert isinstance(sample["completion"], str)
  assert os.path.isdir(os.path.join(workdir, "tensorboard"))


def test_text_run_trains_on_packed_passages(tmp_path, data_dir):
  config = _debug(smollm2_shakespeare, data_dir)
  with config.unlocked():  # the model picked from the architecture's model_type
    config.model.name, config.model.arch.model_type = "auto", "llama"
  final = trainer.run(config, str(tmp_path), devices=ONE_DEVICE)
  assert final["test"]["tokens"] > 1000
  _held_out_losses_fall(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["data"]["name"] == "shakespeare" and config["task"] == "causal_lm"
  assert config["model"]["name"] == "llama_lm"


def test_chat_data_with_a_classification_task_is_refused(tmp_path, data_dir):
  config = _debug(smollm2_chat, data_dir)
  config.unlock()
  config.task = "classification"
  config.model.num_classes = 2
  config.lock()
  with pytest.raises(Exception, match="config.data.name='chat' is chat data, scored by task "
                     "'causal_lm', but config.task='classification'"):
    trainer.run(config, str(tmp_path), devices=ONE_DEVICE)


@pytest.mark.slow
def test_lora_chat_run_on_the_packaged_gemma3(tmp_path, data_dir):
  """LoRA on real Gemma 3 270M weights (GGUF), its base tokenizer given Gemma's chat
  template: the validation loss falls at each evaluation (measured 5.268, 5.193, 5.087).
  About 4 minutes on 2 cores."""
  config = smollm2_chat.get_config("steps=4,max_length=64,batch_size=4")
  with config.unlocked():
    config.model.pretrained = "gemma3-270m"
    config.data.data_dir = data_dir
    config.data.chat_template = "gemma"
    config.data.max_train_examples, config.data.max_eval_examples = 32, 8
    config.eval_batch_size, config.eval_every = 4, 2
    config.samples.count, config.samples.max_new_tokens = 1, 8
  final = trainer.run(config, str(tmp_path), devices=ONE_DEVICE)
  losses = [r["loss"] for r in metrics.read_metrics(str(tmp_path)) if r["split"] == "validation"]
  assert len(losses) == 3 and losses[2] < losses[1] < losses[0] - 0.02, losses
  assert final["best_step"] == 4
  samples = [r for r in metrics.read_metrics(str(tmp_path)) if r["split"] == "samples"]
  assert samples[0]["samples"][0]["prompt"].endswith("<start_of_turn>model\n")

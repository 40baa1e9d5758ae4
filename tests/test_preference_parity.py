"""ftjax's preference losses against TRL's trainers on a tiny random Llama.

The same string pairs go through TRL's own tokenization and collator and through
`ftjax.data.preference.tokenize_pairs`; the token ids, the mean loss, TRL's reward
metrics and the gradient of every weight must agree: DPO and IPO against
`DPOTrainer`, SimPO against `CPOTrainer(loss_type="simpo", cpo_alpha=0)`, ORPO
against `ORPOTrainer`, conservative DPO against its formula on `DPOTrainer`'s own
log-ratios.

DPO and IPO run TRL's two-model path (a policy and a separate reference model,
the policy the reference's weights plus noise, so the loss is not log 2), while
ftjax reads reference log-probabilities computed once with the reference weights
(`Task.reference`), as a run does: agreement shows that the cached reference
equals the two-model path.
"""

import json

import jax
import numpy as np
import pytest

import tiny_decoders
from ftjax import config as config_lib
from ftjax import models, pair_losses, param_groups, tasks
from ftjax.data import preference
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.hub import assets
from ftjax.hub import llama as llama_hub

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

_LLAMA = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_MAX_LENGTH = 64
# SmolLM2's chat format written out: a string prompt that starts with the tokenizer's
# BOS (<|im_start|>), so CPOTrainer and ORPOTrainer, which prepend a BOS to a prompt
# lacking one, tokenize the pairs as DPOTrainer and ftjax do.
_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
_PAIRS = [
    {"prompt": _PROMPT.format("What is the capital of France?"), "chosen": "Paris.",
     "rejected": "The capital of France is Lyon, a city on the Rhone."},
    {"prompt": _PROMPT.format("Name a prime number larger than ten."),
     "chosen": "Eleven: its only divisors are one and itself.", "rejected": "Twelve."},
    {"prompt": _PROMPT.format("Say hello."), "chosen": "Hello!", "rejected": "Goodbye, then."},
    {"prompt": _PROMPT.format("Write a haiku about rain on a tin roof at night."),
     "chosen": "Tin drums in the dark,\nsoft rain counts the sleepless hours,\nmorning comes "
               "quiet.", "rejected": "Rain is wet."},
]
_LOSS_RTOL = 1e-5
_GRAD_TOL = 1e-4  # of the largest gradient entry of a tensor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The tokenizer, the reference and policy checkpoint folders, the ftjax model with
  both weights, and the pairs tokenized by ftjax with the reference log-probabilities."""
  tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir("smollm2-135m-instruct"))
  reference_dir, policy_dir = (str(tmp_path_factory.mktemp(name))
                               for name in ("reference", "policy"))
  policy = tiny_decoders.save_random(reference_dir, "Llama", **_LLAMA)
  with torch.no_grad():
    torch.manual_seed(1)
    for param in policy.parameters():
      param.add_(0.05 * torch.randn_like(param))
  policy.save_pretrained(policy_dir)
  model, reference_params = models.create(
      tiny_decoders.model_config(pretrained=reference_dir), seed=0)
  _, policy_params = models.create(tiny_decoders.model_config(pretrained=policy_dir), seed=0)
  source = [{"id": str(i), **{key: json.dumps(text) for key, text in pair.items()}}
            for i, pair in enumerate(_PAIRS)]
  rows = preference.tokenize_pairs(source, preference.PairTokenizer(tokenizer, None),
                                   max_length=_MAX_LENGTH, pad_id=tokenizer.pad_token_id)
  assert rows.stats.truncated == rows.stats.prompt_mismatch == 0
  task = tasks.get(_config(loss="dpo"))
  batch = _batch(rows)
  features = model.apply(reference_params, task.model_batch(batch), train=False,
                         features=task.features)
  rows.set_reference(np.asarray(task.reference(features, batch)))
  return dict(tokenizer=tokenizer, reference_dir=reference_dir, policy_dir=policy_dir,
              model=model, params=policy_params, rows=rows, batch=_batch(rows))


def _config(**preference_settings):
  config = config_lib.defaults()
  config.task = "preference"
  config.loss_chunk = 96  # chunks of logits along the sequence, as in a run
  config.preference.update(preference_settings)
  return config


def _batch(rows):
  batch = {key: jax.numpy.asarray(value) for key, value in rows.arrays.items()}
  batch["mask"] = jax.numpy.ones(len(rows), bool)
  return batch


def _ftjax(setup, **preference_settings):
  """ftjax's mean loss, metrics (each sum / weight) and gradients on the pairs."""
  task = tasks.get(_config(**preference_settings))
  model, batch = setup["model"], setup["batch"]

  def mean_loss(params):
    features = model.apply(params, task.model_batch(batch), train=False,
                           features=task.features)
    sums = task.train_sums(features, batch)
    return sums["loss"] / sums["weight"], {key: value / sums["weight"]
                                           for key, value in sums.items()}

  (loss, metrics), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(
      setup["params"])
  return float(loss), {key: float(value) for key, value in metrics.items()}, grads


def _torch_model(directory):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  return model.train()  # TRL logs under "train"; the model has no dropout


def _dataset():
  return datasets.Dataset.from_list(_PAIRS)


def _common_args():
  return dict(max_length=_MAX_LENGTH, bf16=False, report_to="none", use_cpu=True,
              per_device_train_batch_size=len(_PAIRS))


def _collated(trainer):
  """The trainer's collator on its own tokenized pairs, in order."""
  return trainer.data_collator([trainer.train_dataset[i] for i in range(len(_PAIRS))])


def _assert_same_tokens(rows, sides):
  """`sides`: (input ids, attention mask, completion mask) [B, T] of TRL's chosen and
  rejected sequences; each must be ftjax's sequence, its completion ftjax's loss mask
  (shifted by one: ftjax marks the targets)."""
  for side, (ids, attention, completion) in enumerate(sides):
    for i in range(len(_PAIRS)):
      n = int(attention[i].sum())
      assert int(rows.arrays["segment_ids"][i, side].sum()) == n, (side, i)
      np.testing.assert_array_equal(rows.arrays["input_ids"][i, side, :n], ids[i, :n].numpy())
      expected = np.zeros(_MAX_LENGTH, bool)
      expected[:n - 1] = completion[i, 1:n].numpy().astype(bool)
      np.testing.assert_array_equal(rows.arrays["loss_mask"][i, side], expected)
      assert 0 < expected.sum() < n - 1, (side, i)  # a prompt and a completion


def _assert_close_loss(ours, theirs, record_property=None):
  difference = abs(ours - theirs) / abs(theirs)
  assert difference <= _LOSS_RTOL, (ours, theirs)
  if record_property:
    record_property("loss_difference", difference)


def _assert_same_metrics(ours, theirs, names):
  for name in names:
    assert abs(ours[name] - theirs[name]) <= 1e-5 * max(1.0, abs(theirs[name])), (
        name, ours[name], theirs[name])


def _assert_same_grads(grads, torch_model):
  """Every weight's gradient, the torch [out, in] linear weights as ftjax's [in, out]
  kernels; returns the largest difference relative to each tensor's largest entry."""
  flat = param_groups.flatten(grads)
  worst = 0.0
  for name, param in torch_model.named_parameters():
    path, transform = llama_hub.hf_name_to_path(name)
    expected = transform(param.grad.numpy())
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, name
    difference = float(np.max(np.abs(np.asarray(flat.pop(path)) - expected))) / scale
    assert difference <= _GRAD_TOL, (name, difference)
    worst = max(worst, difference)
  assert not flat, sorted(flat)  # every ftjax parameter was compared
  return worst


_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")


def _dpo_trainer(setup, tmp_path, **args):
  return trl.DPOTrainer(
      model=_torch_model(setup["policy_dir"]),
      ref_model=_torch_model(setup["reference_dir"]),
      args=trl.DPOConfig(output_dir=str(tmp_path), **_common_args(), **args),
      train_dataset=_dataset(), processing_class=setup["tokenizer"])


def _dpo_sides(inputs):
  chunks = [inputs[key].chunk(2) for key in ("input_ids", "attention_mask", "completion_mask")]
  return list(zip(*chunks))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_dpo_trainer(setup, tmp_path, loss_type, record_property):
  beta = 0.1
  trainer = _dpo_trainer(setup, tmp_path, loss_type=loss_type, beta=beta)
  inputs = _collated(trainer)
  _assert_same_tokens(setup["rows"], _dpo_sides(inputs))
  # ftjax's cached reference is what TRL's reference model gives in each step, and the
  # policy's log-probabilities differ from it.
  reference, policy = (torch.stack(trainer.compute_ref_log_probs(model, inputs), 1)
                       for model in (trainer.ref_model, trainer.model))
  np.testing.assert_allclose(setup["rows"].arrays["ref_logps"], reference.numpy(), rtol=1e-6)
  assert torch.all((policy - reference).abs() > 0.1), policy - reference
  loss = trainer.compute_loss(trainer.model, inputs)
  loss.backward()
  theirs = {key: values[-1] for key, values in trainer._metrics["train"].items()}
  ours, metrics, grads = _ftjax(setup, loss="dpo" if loss_type == "sigmoid" else "ipo",
                                beta=beta)
  _assert_close_loss(ours, loss.item(), record_property)
  _assert_same_metrics(metrics, theirs, _REWARDS)
  record_property("grad_difference", _assert_same_grads(grads, trainer.model))


def test_conservative_dpo_matches_its_formula_on_dpo_trainer_log_ratios(setup, tmp_path,
                                                                        record_property):
  """TRL 1.16's DPOTrainer leaves label smoothing out of its "sigmoid" loss (only its
  robust, aot and exo losses read it): conservative DPO, -(1 - e) log sigmoid(beta d)
  - e log sigmoid(-beta d), is written here in torch on the trainer's own log-ratios d
  (its policy forward as `_compute_loss` runs it, its `compute_ref_log_probs`), which
  give the trainer's unsmoothed loss."""
  beta, smoothing = 0.1, 0.2
  trainer = _dpo_trainer(setup, tmp_path, loss_type="sigmoid", beta=beta,
                         label_smoothing=smoothing)
  inputs = _collated(trainer)
  with torch.no_grad():
    unsmoothed = trainer.compute_loss(trainer.model, inputs).item()
  theirs = {key: values[-1] for key, values in trainer._metrics["train"].items()}
  labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
  logps = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=labels, use_cache=False, fused_lm_head=True).log_probs.sum(1)
  chosen, rejected = logps.chunk(2)
  ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
  logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
  logsigmoid = torch.nn.functional.logsigmoid
  _assert_close_loss(-logsigmoid(logits).mean().item(), unsmoothed)
  loss = (-(1 - smoothing) * logsigmoid(logits) - smoothing * logsigmoid(-logits)).mean()
  loss.backward()
  ours, metrics, grads = _ftjax(setup, loss="dpo", beta=beta, label_smoothing=smoothing)
  assert abs(loss.item() - unsmoothed) > 1e-3  # the smoothing counts
  _assert_close_loss(ours, loss.item(), record_property)
  _assert_same_metrics(metrics, theirs, _REWARDS)
  record_property("grad_difference", _assert_same_grads(grads, trainer.model))


def _reference_free(setup, tmp_path, trainer_class, config_class, **args):
  """A CPO or ORPO trainer of the policy, its loss on its collated batch (backward run)
  and its metrics."""
  trainer = trainer_class(
      model=_torch_model(setup["policy_dir"]),
      args=config_class(output_dir=str(tmp_path), **_common_args(), **args),
      train_dataset=_dataset(), processing_class=setup["tokenizer"])
  inputs = _collated(trainer)
  sides = [tuple(inputs[f"{side}_{key}"] for key in ("input_ids", "attention_mask"))
           + (inputs[f"{side}_labels"] != -100,) for side in ("chosen", "rejected")]
  _assert_same_tokens(setup["rows"], sides)
  loss, metrics = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
  loss.backward()
  return trainer, loss.item(), metrics


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_matches_cpo_trainer(setup, tmp_path, smoothing, record_property):
  from trl.experimental import cpo  # pylint: disable=import-outside-toplevel
  beta, gamma = 2.0, 0.5
  trainer, loss, theirs = _reference_free(setup, tmp_path, cpo.CPOTrainer, cpo.CPOConfig,
                                          loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                          cpo_alpha=0.0, label_smoothing=smoothing)
  ours, metrics, grads = _ftjax(setup, loss="simpo", beta=beta, simpo_gamma=gamma,
                                label_smoothing=smoothing)
  _assert_close_loss(ours, loss, record_property)
  _assert_same_metrics(metrics, theirs, _REWARDS)
  record_property("grad_difference", _assert_same_grads(grads, trainer.model))


def test_orpo_matches_orpo_trainer(setup, tmp_path, record_property):
  from trl.experimental import orpo  # pylint: disable=import-outside-toplevel
  beta = 0.1
  trainer, loss, theirs = _reference_free(setup, tmp_path, orpo.ORPOTrainer,
                                          orpo.ORPOConfig, beta=beta)
  ours, metrics, grads = _ftjax(setup, loss="orpo", beta=beta)
  _assert_close_loss(ours, loss, record_property)
  _assert_same_metrics(metrics, theirs, _REWARDS + ("nll_loss",))
  # The odds-ratio term alone (the loss is mostly the likelihood term).
  odds_term = ours - metrics["nll_loss"]
  assert abs(odds_term + beta * theirs["log_odds_ratio"]) <= 1e-4 * odds_term, (
      odds_term, theirs["log_odds_ratio"])
  record_property("grad_difference", _assert_same_grads(grads, trainer.model))


def test_orpo_odds_ratio_matches_orpo_trainer_where_completions_are_likely(setup, tmp_path):
  """The random model gives about -11 per token, where log(1 - p) is nearly 0: the odds
  ratio and its gradient are compared again at the mean log-probabilities of a confident
  model, on both sides of log1mexp's branch at -log 2, against the trainer's own
  `odds_ratio_loss`."""
  from trl.experimental import orpo  # pylint: disable=import-outside-toplevel
  beta = 0.1
  trainer = orpo.ORPOTrainer(
      model=_torch_model(setup["policy_dir"]),
      args=orpo.ORPOConfig(output_dir=str(tmp_path), **_common_args(), beta=beta),
      train_dataset=_dataset(), processing_class=setup["tokenizer"])
  means = np.array([[-0.05, -0.3], [-0.6, -0.75], [-0.8, -0.1], [-2.0, -4.0], [-1e-3, -0.5]],
                   np.float32)
  counts = np.array([[3, 9], [5, 5], [2, 4], [7, 1], [6, 2]], np.float32)
  chosen, rejected = (torch.tensor(means[:, side], requires_grad=True) for side in (0, 1))
  losses = trainer.odds_ratio_loss(chosen, rejected)[0]
  (-losses).sum().backward()  # TRL's ORPO loss subtracts beta * log sigmoid(log odds)

  def ftjax_losses(means):
    logps = pair_losses.PairLogps(means[:, 0] * counts[:, 0], means[:, 1] * counts[:, 1],
                                  counts[:, 0], counts[:, 1])
    return pair_losses.pair_loss(pair_losses.Settings(loss="orpo", beta=beta), logps,
                                 None).loss

  ours = ftjax_losses(jax.numpy.asarray(means))
  grads = jax.grad(lambda m: ftjax_losses(m).sum())(jax.numpy.asarray(means))
  np.testing.assert_allclose(ours, -losses.detach().numpy(), rtol=1e-6)
  np.testing.assert_allclose(grads, np.stack([chosen.grad, rejected.grad], 1), rtol=1e-5)

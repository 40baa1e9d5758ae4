"""Fine-tuning image classifiers: batch-norm modes, head swap, sync statistics across
devices, resuming, and a ViT checkpoint fine-tuned at a new resolution."""

import json
import math
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import mobilenet_fashion
from conftest import ONE_DEVICE, with_overrides
from ftjax import build, data, metrics, models, param_groups, sharding, tasks, trainer
from ftjax.data import inputs as inputs_lib
from ftjax.hub import torch_pickle, vision


@pytest.fixture
def vision_config(data_dir):
  return with_overrides(mobilenet_fashion.get_config("debug"),
                        **{"data.data_dir": data_dir})


def _train(config, steps=2, devices=1, fit_steps=0):
  """Trains `steps` steps of `config` on the first `devices` devices (data parallel), then
  `fit_steps` more on the last batch again and again; returns (model, initial stats, and
  the stats and params after the first `steps`, as host arrays, and the losses of the
  `fit_steps`)."""
  config = with_overrides(config, **{"mesh.data": devices, "mesh.fsdp": 1, "mesh.tensor": 1})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  rules = sharding.Rules.from_config(config.axis_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  built = build.build(config, mesh, rules, total_steps=10)
  train, _ = build.jit_steps(built, tasks.get(config, mesh, rules), config, rules,
                             batch_sharding)
  inputs = inputs_lib.build(config)
  iterator = data.train_iterator(inputs.splits["train"], inputs.preprocess,
                                 batch_size=config.batch_size, seed=config.seed,
                                 num_epochs=None, shard_index=0, shard_count=1,
                                 augment=inputs.augment)
  state = built.state
  initial = jax.device_get(state.stats)
  for _ in range(steps):
    batch = jax.device_put(next(iterator), batch_sharding)
    state, _ = train(state, built.frozen, batch)
  stats, params = jax.device_get((state.stats, state.params))
  losses = []
  for _ in range(fit_steps):
    state, step_metrics = train(state, built.frozen, batch)
    losses.append(float(step_metrics["loss"]))
  return built.model, initial, stats, params, losses


def _changed_layers(before, after):
  flat_before, flat_after = param_groups.flatten(before), param_groups.flatten(after)
  return {path.rsplit("/", 1)[0] for path in flat_before
          if not np.array_equal(flat_before[path], flat_after[path])}


def test_frozen_batch_norm_keeps_the_running_statistics(vision_config):
  config = with_overrides(vision_config, **{"model.batch_norm": "frozen"})
  model, before, after, _, _ = _train(config)
  assert not model.updating and not _changed_layers(before, after)


@pytest.fixture(scope="module")
def one_device_run(data_dir):
  """The default (updating) debug config trained on one device, shared by three tests, then
  fitted to one batch."""
  config = with_overrides(mobilenet_fashion.get_config("debug"), **{"data.data_dir": data_dir})
  return _train(config, fit_steps=6)


def test_updating_batch_norm_moves_every_trained_layers_statistics(one_device_run):
  model, before, after, _, _ = one_device_run
  layers = {path.rsplit("/", 1)[0] for path in param_groups.flatten(before)}
  assert len(layers) == 52  # stem, 3 per block (2 in the first), top
  assert model.updating == layers and _changed_layers(before, after) == layers


def test_frozen_layers_never_update_their_statistics(vision_config):
  probe = with_overrides(vision_config, **{"freeze": "all_but_head"})
  mesh = sharding.make_mesh(probe.mesh, jax.devices()[:1])
  built = build.build(probe, mesh, sharding.Rules.from_config(probe.axis_rules),
                      total_steps=10, abstract=True)
  assert not built.model.updating  # a linear probe keeps every pretrained statistic
  bottom = with_overrides(vision_config, **{"freeze_blocks": 3})
  model, before, after, _, _ = _train(bottom)
  frozen = {layer for layer in param_groups.flatten(before)
            if layer.startswith(("stem/", "blocks/0/", "blocks/1/", "blocks/2/"))}
  changed = _changed_layers(before, after)
  assert changed and not {path.rsplit("/", 1)[0] for path in frozen} & changed
  assert changed == set(model.updating)


def test_statistics_are_synchronised_across_data_parallel_devices(vision_config,
                                                                  one_device_run):
  _, _, one_stats, one_params, _ = one_device_run
  _, _, many_stats, many_params, _ = _train(vision_config, devices=8)
  for one, many in ((one_stats, many_stats), (one_params, many_params)):
    flat, ref = param_groups.flatten(many), param_groups.flatten(one)
    for path, value in flat.items():
      np.testing.assert_allclose(value, ref[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_the_debug_config_fits_a_repeated_batch(one_device_run):
  """The training loss of one batch, trained on again and again after the first two
  steps, falls at every step: by 0.89 to 0.97 in 6 steps (from about 2.2; seeds 0 to 2).
  With nothing learned (a learning rate of 1e-12) it stays ln 10, the zero head's. (The
  6 steps of a debug run, each on a new batch, move the validation loss and accuracy too
  little to tell from chance.)"""
  losses = one_device_run[-1]
  assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.4, losses


def test_head_swap_keeps_every_pretrained_tensor_but_the_head(vision_config):
  _, params = models.create(vision_config.model, seed=0)
  flat = param_groups.flatten(params)
  assert flat["head/kernel"].shape == (1280, 10) and not np.any(flat["head/kernel"])
  checkpoint = torch_pickle.load(vision.weights_file("mobilenet_v2"))
  np.testing.assert_array_equal(flat["stem/bn/mean"], checkpoint["features.0.1.running_mean"])
  np.testing.assert_array_equal(flat["top/kernel"],
                                checkpoint["features.18.0.weight"][:, :, 0, 0].T)


def _final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


def test_resumed_run_with_mixing_equals_an_uninterrupted_one(vision_config, tmp_path):
  config = with_overrides(vision_config, **{"data.augment.mixup_alpha": 0.4,
                                            "data.augment.cutmix_alpha": 1.0,
                                            "checkpoint.use_async": False})
  whole = trainer.run(config, str(tmp_path / "whole"), devices=ONE_DEVICE)

  class Interrupt(Exception):
    pass

  def stop_at_4(step):
    if step == 4:
      raise Interrupt

  with pytest.raises(Interrupt):
    trainer.run(config, str(tmp_path / "resumed"), on_step=stop_at_4, devices=ONE_DEVICE)
  resumed = trainer.run(config, str(tmp_path / "resumed"), devices=ONE_DEVICE)
  for key in ("validation", "test", "best_step"):
    assert resumed[key] == whole[key], key
  assert _final(tmp_path / "resumed")["test"] == _final(tmp_path / "whole")["test"]


def test_vit_checkpoint_fine_tunes_at_a_new_resolution(vision_config, tmp_path):
  torch.manual_seed(0)  # the checkpoint's random weights
  reference = transformers.ViTForImageClassification(transformers.ViTConfig(
      image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, num_labels=1000))
  reference.save_pretrained(tmp_path / "vit")
  # One image per class, so that every step trains on the same 10 images (randomly cropped).
  config = with_overrides(vision_config, **{
      "model.name": "vit", "model.pretrained": str(tmp_path / "vit"), "model.image_size": 48,
      "data.name": "mnist_digits", "data.image_size": 48, "data.mean": (0.5,) * 3,
      "data.std": (0.5,) * 3, "data.augment.flip": False, "data.shots": 1, "batch_size": 10,
      "eval_at_epoch_end": False, "log_every": 1})
  model, params = models.create(config.model, seed=0)
  position = param_groups.flatten(params)["embeddings/position"]
  assert position.shape == (1, 1 + 6 * 6, 32)  # a 4x4 grid of patches became 6x6
  assert model.layout.num_blocks(param_groups.flatten(params)) == 2
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert final["test"]["count"] == 64
  # The training loss falls from ln 10 (the new head starts at zero; the first step's
  # learning rate is 0) at every step after: by 0.0032 to 0.0046 in 6 steps (checkpoint
  # and run seeds 0 to 2); with nothing learned (a learning rate of 1e-12) it stays ln 10.
  losses = [r["loss"] for r in metrics.read_metrics(str(tmp_path / "run"))
            if r["split"] == "train"]
  assert len(losses) == 6 and losses[0] == pytest.approx(math.log(10), abs=1e-4)
  assert all(later < earlier for earlier, later in zip(losses[1:], losses[2:])), losses
  assert losses[-1] < losses[0] - 1.5e-3, losses

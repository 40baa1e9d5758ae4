r"""Runs several training processes on this machine, e.g. to debug multi-host code on a CPU.

  python launch/local.py --num_processes=2 --devices_per_process=4 \
      --config=configs/minilm_sentiment.py:debug --workdir=/tmp/ftjax/local \
      --config.total_steps=4

starts `--num_processes` copies of launch/train.py that join through a
coordinator on 127.0.0.1 (a free port unless --port is given). Each process sees
`--devices_per_process` CPU devices (JAX_PLATFORMS=cpu and XLA's host device
count); 0 keeps the environment's platform and devices. `--config.key=value`
overrides and anything after `--` go to every train.py. Output lines are
prefixed with "[process i]". When a process fails, the others are stopped and
this launcher exits non-zero, naming it. `--dry_run` prints each process's
command with its environment and runs nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from absl import app, flags

from ftjax import cli, distributed
from ftjax.errors import ConfigError

_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "How many processes to start.")
_DEVICES = flags.DEFINE_integer(
    "devices_per_process", 4, "CPU devices of each process (JAX_PLATFORMS=cpu and XLA's "
    "host device count); 0 leaves the platform and devices to the environment.")
_CONFIG = flags.DEFINE_string("config", None, "Config file (with an optional :arg), as for "
                              "launch/train.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir, shared by the processes.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address the coordinator listens on.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port; 0 picks a free one.")
_PYTHON = flags.DEFINE_string("python", sys.executable, "The Python that runs train.py.")
_GRACE = flags.DEFINE_float("grace_seconds", 10.0, "After a failure, how long the other "
                            "processes get to stop after SIGTERM before SIGKILL.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and run nothing.")
flags.mark_flags_as_required(["config", "workdir"])

_PASSTHROUGH: list[str] = []


def commands(num_processes: int, devices: int, config: str, workdir: str, address: str,
             passthrough: Sequence[str], python: str = sys.executable
             ) -> list[tuple[dict[str, str], list[str]]]:
  """(extra environment, argv) of each process.

  Raises:
    ConfigError: for a bad process or device count or address.
  """
  if num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: must be >= 1")
  if devices < 0:
    raise ConfigError(f"--devices_per_process={devices}: must be >= 0")
  distributed.check_address(address, "--host/--port")
  env = distributed.cpu_process_env(devices)
  return [(env, [python, _TRAIN, f"--config={config}", f"--workdir={workdir}",
                 *cli.train_flags(address, num_processes, i), *passthrough])
          for i in range(num_processes)]


def format_command(env: dict[str, str], argv: Sequence[str]) -> str:
  """One shell line: the environment assignments, then the command."""
  return " ".join([f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
                  + [shlex.join(argv)])


def _pump(stream: IO[bytes], prefix: bytes, lock: threading.Lock) -> None:
  """Copies a process's output to stdout, each line prefixed."""
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      sys.stdout.buffer.flush()
  stream.close()


def _describe(code: int) -> str:
  if code < 0:
    return f"was killed by {distributed.signal_name(-code)}"
  return f"exited with code {code}"


def _stop(processes: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM to every running process, SIGKILL to those still running after `grace` s."""
  for p in processes:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace
  for p in processes:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run(specs: list[tuple[dict[str, str], list[str]]], grace: float) -> int:
  """Starts the processes, streams their output and waits.

  Returns:
    0 when every process succeeded, else 1 (after stopping the others).
  """
  lock = threading.Lock()
  processes, pumps = [], []
  try:
    for i, (env, argv) in enumerate(specs):
      process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
      processes.append(process)
      pump = threading.Thread(target=_pump, args=(process.stdout, f"[process {i}] ".encode(),
                                                  lock), daemon=True)
      pump.start()
      pumps.append(pump)
    failed = None
    while failed is None and any(p.poll() is None for p in processes):
      failed = next((i for i, p in enumerate(processes) if p.poll() not in (None, 0)), None)
      time.sleep(0.2)
    if failed is None:
      failed = next((i for i, p in enumerate(processes) if p.returncode != 0), None)
  except KeyboardInterrupt:
    _stop(processes, grace)
    print("error: interrupted; stopped every process", file=sys.stderr, flush=True)
    return 130
  if failed is not None:
    running = [i for i, p in enumerate(processes) if p.poll() is None]
    _stop(processes, grace)
    for pump in pumps:
      pump.join(timeout=5)
    stopped = f"; stopped process(es) {running}" if running else ""
    print(f"error: process {failed} of {len(processes)} "
          f"{_describe(processes[failed].returncode)}{stopped}", file=sys.stderr, flush=True)
    return 1
  for pump in pumps:
    pump.join(timeout=5)
  print(f"all {len(processes)} processes finished", flush=True)
  return 0


def _main() -> None:
  port = _PORT.value or distributed.free_port(_HOST.value)
  specs = commands(_NUM_PROCESSES.value, _DEVICES.value, _CONFIG.value, _WORKDIR.value,
                   f"{_HOST.value}:{port}", _PASSTHROUGH, _PYTHON.value)
  if _DRY_RUN.value:
    for env, argv in specs:
      print(format_command(env, argv))
    return
  code = run(specs, _GRACE.value)
  if code:
    sys.exit(code)


if __name__ == "__main__":
  app.run(cli.main(_main), flags_parser=cli.passthrough_flags_parser(_PASSTHROUGH))

"""Multi-process start-up: which process this is and how the processes find each other.

`initialize` runs before anything touches a device. Each of the three values
(coordinator address, number of processes, this process's id) comes from its
argument (the launcher's flag), else from its environment variable:

  FTJAX_COORDINATOR_ADDRESS   host:port of process 0's coordination service
  FTJAX_NUM_PROCESSES         how many processes take part
  FTJAX_PROCESS_ID            this process's id, 0 .. FTJAX_NUM_PROCESSES - 1
  FTJAX_LOCAL_DEVICE_IDS      optional: comma-separated local devices this process uses
  FTJAX_CLUSTER               auto (default) | none | slurm | tpu | ompi

When none of the three is given, the cluster setting decides. `auto` lets
`jax.distributed.initialize` detect its parameters only where a multi-process
environment is recognised: a SLURM step of more than one task, an Open MPI job
of more than one rank, a Cloud TPU VM (or a multi-host GKE TPU slice). Anything
else is a plain single-process run that never waits for a coordinator. `none`
is always a single process; `slurm`, `tpu` and `ompi` ask jax to detect that
environment without checking for it first.

Failure handling: every process sends heartbeats to the coordination service of
process 0. When a process dies, the service reports it to the others, which
jax terminates ("... detected fatal errors. This most likely indicates that
another task died ...", naming the unhealthy task) within `heartbeat_timeout`
seconds; if process 0 dies, the others lose the service and terminate at once.
On CPU a collective that loses its peer may abort the process first (gloo's
"Received data size doesn't match expected size"). Either way the process ends
in a native abort without a Python error, so `supervise` runs the training in a
child process and names what happened when it ends by a signal.
`exit_on_failure` makes a process that raises leave at once, without the
shutdown barrier that would keep the others waiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import importlib.util
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import traceback
from typing import Iterator, Mapping, Sequence

import jax
from absl import logging

from ftjax.errors import ConfigError, FtjaxError

ENV_COORDINATOR_ADDRESS = "FTJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FTJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "FTJAX_LOCAL_DEVICE_IDS"
ENV_CLUSTER = "FTJAX_CLUSTER"
# Set by `supervise` for the child it starts: the supervisor's process id.
ENV_SUPERVISOR_PID = "FTJAX_SUPERVISOR_PID"

CLUSTERS = ("auto", "none", "slurm", "tpu", "ompi")
# What `cluster` hands to jax.distributed.initialize as cluster_detection_method.
_JAX_DETECTION = {"slurm": "slurm", "tpu": None, "ompi": "ompi"}
DEFAULT_HEARTBEAT_TIMEOUT = 30
DEFAULT_INITIALIZATION_TIMEOUT = 300
_CPU_COLLECTIVES = "jax_cpu_collectives_implementation"
# XLA flag giving a CPU process that many devices.
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class StartupError(FtjaxError, RuntimeError):
  """The processes of a run could not be joined."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """How this process takes part in a run.

  Attributes:
    mode: "single" (no coordination), "explicit" (the values below) or "cluster"
      (jax detects them from the environment named by `source`).
    source: where the values came from, for the log.
    coordinator_address: host:port of process 0's coordination service.
    num_processes: how many processes take part.
    process_id: this process's id.
    local_device_ids: the local devices this process uses (None: all of them).
    detection: jax's cluster_detection_method for mode "cluster".
  """

  mode: str
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  detection: str | None = None

  @property
  def is_multiprocess(self) -> bool:
    return self.mode != "single"

  @property
  def label(self) -> str:
    """"process i of n", or the cluster's name while jax has not detected them yet."""
    if self.process_id is not None and self.num_processes is not None:
      return f"process {self.process_id} of {self.num_processes}"
    return f"this {self.source} process"


def _int(value: str | int, name: str) -> int:
  if isinstance(value, int):
    return value
  try:
    return int(value.strip())
  except ValueError:
    raise ConfigError(f"{name}={value!r}: not an integer") from None


def _device_ids(value: str | Sequence[int | str], name: str) -> tuple[int, ...]:
  items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
  ids = tuple(_int(v, name) for v in items)
  if not ids:
    raise ConfigError(f"{name}={value!r}: no device ids")
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ConfigError(f"{name}={value!r}: device ids must be distinct and non-negative")
  return ids


def check_address(address: str, name: str = "coordinator_address") -> str:
  """Checks that `address` is host:port (an IPv6 host in brackets) with a valid port.

  Returns:
    The address without surrounding spaces.

  Raises:
    ConfigError: naming `name` and what is wrong.
  """
  address = address.strip()
  match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):(\d+)", address)
  if match is None:
    raise ConfigError(f"{name}={address!r}: expected host:port, e.g. 10.0.0.1:1234")
  port = int(match.group(2))
  if not 0 < port < 65536:
    raise ConfigError(f"{name}={address!r}: port {port} is not in 1..65535")
  return address


def _task_count(environ: Mapping[str, str], *names: str) -> int:
  for name in names:
    if name in environ:
      try:
        return int(environ[name])
      except ValueError:
        return 0
  return 0


def _slurm_step(environ: Mapping[str, str]) -> bool:
  """A task of an srun step with more than one task (what jax's SLURM detection reads)."""
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  return (all(name in environ for name in needed)
          and _task_count(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") > 1)


def _open_mpi(environ: Mapping[str, str]) -> bool:
  return ("OMPI_MCA_orte_hnp_uri" in environ
          and _task_count(environ, "OMPI_COMM_WORLD_SIZE") > 1)


def _gke_tpu_slice(environ: Mapping[str, str]) -> bool:
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def on_cloud_tpu_vm() -> bool:
  """Whether this machine has TPU chips and the TPU runtime (libtpu) installed."""
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            local_device_ids: Sequence[int] | str | None = None, cluster: str | None = None,
            environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> Setup:
  """Decides how this process takes part in the run, without starting anything.

  Args:
    coordinator_address: host:port of process 0 (flag); None: FTJAX_COORDINATOR_ADDRESS.
    num_processes: the number of processes (flag); None: FTJAX_NUM_PROCESSES.
    process_id: this process's id (flag); None: FTJAX_PROCESS_ID.
    local_device_ids: local devices of this process (flag); None: FTJAX_LOCAL_DEVICE_IDS.
    cluster: one of CLUSTERS (flag); None: FTJAX_CLUSTER, else "auto".
    environ: the environment to read (default `os.environ`).
    tpu_vm: whether this is a Cloud TPU VM (default: `on_cloud_tpu_vm()`, checked
      only when needed).

  Returns:
    The resolved `Setup`.

  Raises:
    ConfigError: for a partial or invalid set of values, naming each value and its source.
  """
  environ = os.environ if environ is None else environ
  sources = []

  def pick(flag_value: object, flag: str, env: str) -> tuple[object, str | None]:
    """A value from its flag, else from its environment variable; and the name used."""
    if flag_value is not None and flag_value != "" and flag_value != []:
      sources.append(f"--{flag}")
      return flag_value, f"--{flag}"
    if environ.get(env, "").strip():
      sources.append(env)
      return environ[env], env
    return None, None

  address, address_name = pick(coordinator_address, "coordinator_address",
                               ENV_COORDINATOR_ADDRESS)
  count, count_name = pick(num_processes, "num_processes", ENV_NUM_PROCESSES)
  index, index_name = pick(process_id, "process_id", ENV_PROCESS_ID)
  devices, devices_name = pick(local_device_ids, "local_device_ids", ENV_LOCAL_DEVICE_IDS)
  devices = None if devices is None else _device_ids(devices, devices_name)
  cluster_name = cluster or environ.get(ENV_CLUSTER, "").strip() or "auto"
  if cluster_name not in CLUSTERS:
    where = "--cluster" if cluster else ENV_CLUSTER
    raise ConfigError(f"{where}={cluster_name!r}: choose from {', '.join(CLUSTERS)}")

  if address is not None or count is not None or index is not None:
    count = None if count is None else _int(count, count_name)
    index = None if index is None else _int(index, index_name)
    if count is not None and count < 1:
      raise ConfigError(f"{count_name}={count}: the number of processes must be >= 1")
    if count == 1 and address is None and index in (None, 0):
      return Setup("single", "one process (" + ", ".join(sources) + ")",
                   num_processes=1, process_id=0, local_device_ids=devices)
    missing = [f"--{flag} (or {env})" for value, flag, env in (
        (address, "coordinator_address", ENV_COORDINATOR_ADDRESS),
        (count, "num_processes", ENV_NUM_PROCESSES),
        (index, "process_id", ENV_PROCESS_ID)) if value is None]
    if missing:
      raise ConfigError(f"a multi-process run needs {', '.join(missing)} as well as "
                        f"{', '.join(sources)}")
    if not 0 <= index < count:
      raise ConfigError(f"{index_name}={index}: must be in 0..{count - 1} "
                        f"({count_name}={count})")
    return Setup("explicit", ", ".join(sources), check_address(address, address_name),
                 count, index, devices)

  if cluster_name == "none":
    return Setup("single", "single process (cluster detection off)", local_device_ids=devices)
  if cluster_name != "auto":
    return Setup("cluster", f"{cluster_name} (as asked)", local_device_ids=devices,
                 detection=_JAX_DETECTION[cluster_name])
  if _slurm_step(environ):
    return Setup("cluster", "SLURM", local_device_ids=devices, detection="slurm")
  if _open_mpi(environ):
    return Setup("cluster", "Open MPI", local_device_ids=devices, detection="ompi")
  if _gke_tpu_slice(environ) or (on_cloud_tpu_vm() if tpu_vm is None else tpu_vm):
    return Setup("cluster", "Cloud TPU", local_device_ids=devices)
  return Setup("single", "single process (no cluster detected)", local_device_ids=devices)


def _use_cpu_collectives() -> None:
  """Gives multi-process CPU runs gloo collectives over TCP, unless one is chosen already.

  Without a CPU collectives implementation, computations that span processes
  cannot run on CPU devices; accelerators bring their own.
  """
  try:
    current = getattr(jax.config, _CPU_COLLECTIVES)
  except AttributeError:  # this jax chooses CPU collectives itself
    return
  if current is None:
    jax.config.update(_CPU_COLLECTIVES, "gloo")


def _jax_initialize(**kwargs: object) -> None:
  """jax.distributed.initialize with the keyword arguments this jax version accepts."""
  accepted = inspect.signature(jax.distributed.initialize).parameters
  for name in sorted(set(kwargs) - set(accepted)):
    logging.warning("this jax's distributed.initialize takes no %s; %s=%s is not applied",
                    name, name, kwargs[name])
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | str | None = None, cluster: str | None = None,
               heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
               initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT) -> Setup:
  """Joins this process to the run's other processes (nothing to do for a single one).

  Must run before anything touches a device. The arguments are those of
  `resolve` (flags; None falls back to the environment) plus the timeouts.

  Args:
    coordinator_address: host:port of process 0's coordination service.
    num_processes: how many processes take part.
    process_id: this process's id.
    local_device_ids: the local devices this process uses (default: all).
    cluster: one of CLUSTERS.
    heartbeat_timeout: seconds without heartbeats after which a process counts as
      dead and every other process is terminated.
    initialization_timeout: seconds to wait for every process to join.

  Returns:
    The resolved `Setup`.

  Raises:
    ConfigError: for invalid or partial values.
    StartupError: if the processes cannot be joined.
  """
  setup = resolve(coordinator_address, num_processes, process_id, local_device_ids, cluster)
  if heartbeat_timeout < 1 or initialization_timeout < 1:
    raise ConfigError(f"heartbeat_timeout={heartbeat_timeout} and initialization_timeout="
                      f"{initialization_timeout} must be >= 1 second")
  if setup.mode == "single":
    if setup.local_device_ids is not None:
      logging.warning("local_device_ids %s ignored: a single-process run uses every local "
                      "device", setup.local_device_ids)
    return setup
  if supervised():
    _follow_supervisor()
  if jax.distributed.is_initialized():
    raise StartupError("jax.distributed is already initialized in this process")
  _use_cpu_collectives()
  where = (f"process {setup.process_id} of {setup.num_processes} at "
           f"{setup.coordinator_address}" if setup.mode == "explicit"
           else f"the {setup.source} cluster")
  try:
    _jax_initialize(
        coordinator_address=setup.coordinator_address, num_processes=setup.num_processes,
        process_id=setup.process_id,
        local_device_ids=None if setup.local_device_ids is None else list(setup.local_device_ids),
        # With explicit values, jax must not fill local_device_ids from SLURM / MPI
        # variables (it would give a per-node process one GPU).
        cluster_detection_method=setup.detection if setup.mode == "cluster" else "deactivate",
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout)
  except (RuntimeError, ValueError, TypeError) as e:
    if setup.mode == "cluster" and setup.source == "Cloud TPU" and isinstance(e, ValueError):
      # jax found no multi-host TPU metadata: a single-host TPU VM runs as one process.
      logging.warning("no TPU pod detected (%s); running as a single process", e)
      return Setup("single", "single process (Cloud TPU VM without pod metadata)")
    detail = " ".join(str(e).split())
    raise StartupError(f"cannot join {where} (from {setup.source}) within "
                       f"{initialization_timeout} s: {detail}") from e
  log_topology(setup, heartbeat_timeout)
  return setup


def supervised() -> bool:
  """Whether this process is the child of a `supervise` call."""
  return ENV_SUPERVISOR_PID in os.environ


def _follow_supervisor() -> None:
  """Lets a supervised child die with its supervisor (Linux), so no orphan keeps running.

  A child whose supervisor is SIGKILLed would otherwise keep sending heartbeats
  and block the other processes in their collectives.
  """
  supervisor = int(os.environ.pop(ENV_SUPERVISOR_PID))
  if sys.platform.startswith("linux"):
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
  if os.getppid() != supervisor:  # the supervisor ended before the line above
    os._exit(1)


def signal_name(number: int) -> str:
  """"SIGKILL" for 9; "signal N" for a number that names no signal."""
  try:
    return signal.Signals(number).name
  except ValueError:
    return f"signal {number}"


def supervise(setup: Setup, command: Sequence[str] | None = None) -> int:
  """Runs this program again as a child process and explains a death by a signal.

  When another process of the run dies, jax (or a CPU collective) aborts this
  one from native code: the log ends in a native message, sometimes a
  misleading one. The supervisor waits for the child, forwards SIGTERM, SIGHUP,
  SIGUSR1 and SIGUSR2 to it (SIGINT from a terminal reaches both), and when the
  child ends by a signal it prints one line saying so.

  Args:
    setup: the resolved setup, for the message.
    command: the child's argv (default: this process's own command line).

  Returns:
    The exit code for this process: the child's, or 128 + the signal number.
  """
  command = list(sys.orig_argv if command is None else command)
  child = subprocess.Popen(command, env={**os.environ, ENV_SUPERVISOR_PID: str(os.getpid())})
  forwarded = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
  for number in forwarded:
    signal.signal(number, lambda n, _: child.send_signal(n))
  signal.signal(signal.SIGINT, lambda n, _: None)  # the child handles the terminal's
  code = child.wait()
  if code >= 0:
    return code
  name = signal_name(-code)
  if -code == signal.SIGABRT:
    cause = ("most likely another process of the run stopped first and the coordination "
             "service or a cross-process collective lost it; see the lines above and the "
             "other processes' logs")
  elif -code == signal.SIGKILL:
    cause = ("killed from outside: the out-of-memory killer, a scheduler (time limit, "
             "preemption) or by hand")
  else:
    cause = "a signal from outside"
  print(f"error: {setup.label} was stopped by {name}: {cause}", file=sys.stderr, flush=True)
  return 128 - code


def log_topology(setup: Setup, heartbeat_timeout: int | None = None) -> str:
  """Logs and prints which process this is and its local and global devices."""
  devices = jax.local_devices()
  kinds = sorted({d.platform for d in devices})
  line = (f"process {jax.process_index()} of {jax.process_count()} ({setup.source}): "
          f"{len(devices)} local / {jax.device_count()} global {'/'.join(kinds)} device(s)")
  if heartbeat_timeout is not None and jax.process_count() > 1:
    line += f"; if a process stops, the others stop within {heartbeat_timeout} s"
  logging.info("%s", line)
  print(line, flush=True)
  return line


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
  """In a multi-process run, ends this process at once when the wrapped work raises.

  A process that exits normally waits at jax's shutdown barrier for the others,
  which themselves wait inside a collective for it: both would hang until the
  shutdown timeout. Leaving with `os._exit` instead stops this process's
  heartbeats, so the coordination service ends the others too. A single-process
  run re-raises as usual.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if (isinstance(e, SystemExit) and not e.code) or not jax.distributed.is_initialized():
      raise
    if jax.process_count() == 1:
      raise
    if not isinstance(e, FtjaxError):
      traceback.print_exc()
    if isinstance(e, FtjaxError):
      what = str(e)
    else:
      what = (f"{type(e).__name__}: {' '.join(str(e).split())[:500]} (when another process "
              "of the run stopped first, this follows from it)")
    print(f"error: process {jax.process_index()} of {jax.process_count()} failed: {what}; "
          "exiting without waiting for the other processes", file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.flush()
    os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that is free on `host` now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def cpu_process_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a local CPU process with `devices` devices, on top of `base`
  (default: os.environ), for multi-process runs on one machine.

  Returns:
    Only the variables that are set or changed: JAX_PLATFORMS and XLA_FLAGS (with
    any earlier host device count replaced), or nothing when `devices` is 0.
  """
  if devices == 0:
    return {}
  base = os.environ if base is None else base
  xla_flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", base.get("XLA_FLAGS", "")).split()
  xla_flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(xla_flags)}

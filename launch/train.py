r"""Fine-tunes a model: `python launch/train.py --config=configs/x.py:arg --workdir=DIR`.

Any config value can be overridden with `--config.key=value`
(e.g. `--config.optimizer.lr=1e-4`); an unknown key is an error. Running again
with the same `--workdir` resumes from the latest checkpoint.

Several processes (hosts, or processes of one host) train one model together when
each is started with the same config and workdir plus `--coordinator_address`,
`--num_processes` and its own `--process_id` (or the FTJAX_* environment
variables of `ftjax.distributed`); under SLURM (srun) and on Cloud TPU pods these
are detected. launch/local.py, launch/slurm.py and launch/tpu_pod.py start them.

Compiled steps are kept in a persistent compilation cache (`--compile_cache`, default
$JAX_COMPILATION_CACHE_DIR or ~/.cache/ftjax/xla; `off` turns it off), so running the
same config again reads them back instead of compiling (`ftjax.compile_cache`).

On SIGTERM (a preemption notice) the run finishes its step, writes a checkpoint
and exits with code 75 (`ftjax.preemption`); NaN or infinite losses stop it with
an error naming the step, or are skipped (`config.on_nonfinite`).
"""

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from ftjax import cli, compile_cache, distributed, preemption, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional "
                                          ":arg after the path.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the "
                               "resolved config are written.")
flags.mark_flags_as_required(["config", "workdir"])

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0's coordination "
    f"service (default: ${distributed.ENV_COORDINATOR_ADDRESS}).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: how many processes take part (default: "
    f"${distributed.ENV_NUM_PROCESSES}).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's id, 0 .. num_processes - 1 "
    f"(default: ${distributed.ENV_PROCESS_ID}).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "The local devices (e.g. GPUs) this process uses, "
    f"comma-separated (default: ${distributed.ENV_LOCAL_DEVICE_IDS}, else all).")
_CLUSTER = flags.DEFINE_enum(
    "cluster", None, list(distributed.CLUSTERS), "Without the values above: auto detects a "
    "SLURM step, Open MPI job or Cloud TPU pod (default, or $FTJAX_CLUSTER); none runs one "
    "process; slurm / tpu / ompi make jax detect that environment.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT, "Multi-process runs: seconds "
    "without heartbeats after which a process counts as dead and the others are stopped.")
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", distributed.DEFAULT_INITIALIZATION_TIMEOUT,
    "Multi-process runs: seconds to wait for every process to join.")
_SUPERVISE = flags.DEFINE_bool(
    "supervise", True, "Multi-process runs: train in a child process and say how it ended "
    "when it dies by a signal (as when jax aborts it after another process died).")


_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None, "Folder of the persistent compilation cache, where compiled steps "
    "are kept for later runs of the same programs (default: $JAX_COMPILATION_CACHE_DIR, "
    f"else {compile_cache.DEFAULT_DIR}); 'off' (or empty) compiles everything anew.")


def _train() -> None:
  # Before anything touches a device: which process this is and who the others are.
  where = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
           _LOCAL_DEVICE_IDS.value, _CLUSTER.value)
  setup = distributed.resolve(*where)
  if setup.is_multiprocess and _SUPERVISE.value and not distributed.supervised():
    sys.exit(distributed.supervise(setup))
  distributed.initialize(*where, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
                         initialization_timeout=_INITIALIZATION_TIMEOUT.value)
  cache_dir = compile_cache.directory_of(_COMPILE_CACHE.value)
  usage = None
  if cache_dir:
    usage = compile_cache.enable(cache_dir)
  else:
    compile_cache.disable()
  preempted = None
  with distributed.exit_on_failure():
    try:
      trainer.run(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as e:  # every process stopped at the same step
      preempted = e
  if usage is not None and jax.process_index() == 0:
    print(usage.summary(), flush=True)
  if preempted is not None:
    print(f"{preempted}: exiting with code {preemption.EXIT_CODE}", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  app.run(cli.main(_train), flags_parser=cli.parse_flags)

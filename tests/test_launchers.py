"""Launchers and process set-up: dry-run commands, scripts, flag and environment resolution."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys

import jax
import pytest

from ftjax import cli, distributed
from ftjax.distributed import Setup
from ftjax.errors import ConfigError

from conftest import REPO

PYTHON = sys.executable
TRAIN = os.path.join(REPO, "launch", "train.py")
CONFIG = "configs/minilm_sentiment.py:debug"


def _launch(script: str, *args: str, env: dict[str, str] | None = None,
            cwd: str = REPO) -> subprocess.CompletedProcess:
  return subprocess.run([PYTHON, os.path.join(REPO, "launch", script), *args], cwd=cwd,
                        env={**os.environ, **(env or {})}, capture_output=True, text=True,
                        timeout=120, check=False)


def _fake_program(folder, name: str, body: str) -> None:
  """An executable shell script `name` in `folder` (put first on PATH)."""
  path = folder / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


# --- ftjax.distributed: where the values come from -------------------------------------------


def test_flags_give_an_explicit_setup():
  setup = distributed.resolve("10.0.0.1:1234", 4, 3, ["0", "1"], environ={})
  assert setup == Setup("explicit", "--coordinator_address, --num_processes, --process_id, "
                        "--local_device_ids", "10.0.0.1:1234", 4, 3, (0, 1))
  assert setup.is_multiprocess and setup.label == "process 3 of 4"


def test_environment_fills_what_flags_leave_out():
  environ = {"FTJAX_COORDINATOR_ADDRESS": "host-a:9999", "FTJAX_NUM_PROCESSES": "2",
             "FTJAX_PROCESS_ID": "0", "FTJAX_LOCAL_DEVICE_IDS": "2,3"}
  setup = distributed.resolve(environ=environ)
  assert (setup.mode, setup.coordinator_address, setup.num_processes, setup.process_id,
          setup.local_device_ids) == ("explicit", "host-a:9999", 2, 0, (2, 3))
  assert setup.source == ("FTJAX_COORDINATOR_ADDRESS, FTJAX_NUM_PROCESSES, FTJAX_PROCESS_ID, "
                          "FTJAX_LOCAL_DEVICE_IDS")
  # A flag wins over its variable; the others still come from the environment.
  setup = distributed.resolve(process_id=1, environ=environ)
  assert (setup.process_id, setup.num_processes) == (1, 2)
  assert "--process_id" in setup.source and "FTJAX_NUM_PROCESSES" in setup.source


def test_ipv6_address_is_accepted():
  assert distributed.resolve("[::1]:1234", 2, 1, environ={}).coordinator_address == "[::1]:1234"


@pytest.mark.parametrize("args, environ, message", [
    (("h:1", 2, None), {}, "needs --process_id (or FTJAX_PROCESS_ID) as well as "
                           "--coordinator_address, --num_processes"),
    ((None, None, 1), {}, "needs --coordinator_address (or FTJAX_COORDINATOR_ADDRESS), "
                          "--num_processes (or FTJAX_NUM_PROCESSES)"),
    (("h:1", 2, 2), {}, "--process_id=2: must be in 0..1 (--num_processes=2)"),
    (("h:1", 2, -1), {}, "--process_id=-1: must be in 0..1"),
    (("h:1", 0, 0), {}, "--num_processes=0: the number of processes must be >= 1"),
    (("localhost", 2, 0), {}, "--coordinator_address='localhost': expected host:port"),
    (("h:70000", 2, 0), {}, "--coordinator_address='h:70000': port 70000 is not in 1..65535"),
    (("http://h:1", 2, 0), {}, "expected host:port"),
    ((None, None, None), {"FTJAX_COORDINATOR_ADDRESS": "h:1", "FTJAX_NUM_PROCESSES": "two",
                          "FTJAX_PROCESS_ID": "0"}, "FTJAX_NUM_PROCESSES='two': not an integer"),
    ((None, None, None), {"FTJAX_PROCESS_ID": "5", "FTJAX_NUM_PROCESSES": "2",
                          "FTJAX_COORDINATOR_ADDRESS": "h:1"},
     "FTJAX_PROCESS_ID=5: must be in 0..1 (FTJAX_NUM_PROCESSES=2)"),
])
def test_bad_or_partial_values_are_config_errors(args, environ, message):
  with pytest.raises(ConfigError, match=None) as error:
    distributed.resolve(*args, environ=environ)
  assert message in str(error.value)


@pytest.mark.parametrize("ids, message", [
    ("0,0", "distinct and non-negative"), ("-1", "distinct and non-negative"),
    ("0,x", "not an integer"), (",", "no device ids")])
def test_bad_local_device_ids(ids, message):
  with pytest.raises(ConfigError, match=message):
    distributed.resolve("h:1", 2, 0, ids, environ={})


_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}


@pytest.mark.parametrize("environ, cluster, tpu_vm, expected", [
    ({}, None, False, ("single", None)),
    ({"FTJAX_NUM_PROCESSES": "1"}, None, False, ("single", None)),
    (_SLURM, None, False, ("cluster", "slurm")),
    # One task, or the batch script itself (no srun step): a single process.
    ({**_SLURM, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, None, False,
     ("single", None)),
    ({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None, False,
     ("single", None)),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, None,
     False, ("cluster", "ompi")),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, None, False, ("cluster", None)),
    ({"TPU_WORKER_HOSTNAMES": "w-0"}, None, False, ("single", None)),
    ({}, None, True, ("cluster", None)),
    (_SLURM, "none", False, ("single", None)),
    ({**_SLURM, "FTJAX_CLUSTER": "none"}, None, False, ("single", None)),
    ({}, "slurm", False, ("cluster", "slurm")),
    ({}, "tpu", False, ("cluster", None)),
    ({"FTJAX_CLUSTER": "ompi"}, None, False, ("cluster", "ompi")),
])
def test_cluster_detection_only_where_a_cluster_is(environ, cluster, tpu_vm, expected):
  setup = distributed.resolve(cluster=cluster, environ=environ, tpu_vm=tpu_vm)
  assert (setup.mode, setup.detection) == expected


def test_explicit_values_win_over_a_detected_cluster():
  setup = distributed.resolve("n1:1234", 4, 1, environ=_SLURM, tpu_vm=True)
  assert (setup.mode, setup.coordinator_address) == ("explicit", "n1:1234")


def test_unknown_cluster_is_a_config_error():
  with pytest.raises(ConfigError, match=r"--cluster='k8s': choose from auto, none, slurm"):
    distributed.resolve(cluster="k8s", environ={})
  with pytest.raises(ConfigError, match=r"FTJAX_CLUSTER='mpi': choose from"):
    distributed.resolve(environ={"FTJAX_CLUSTER": "mpi"})


def test_single_process_initialize_starts_nothing(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("FTJAX_", "SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
  assert distributed.initialize().mode == "single"
  assert not jax.distributed.is_initialized()
  with pytest.raises(ConfigError, match="heartbeat_timeout=0"):
    distributed.initialize(heartbeat_timeout=0)


def test_train_flags_and_passthrough():
  assert cli.train_flags("h:1", 2, 1, [0, 3]) == [
      "--coordinator_address=h:1", "--num_processes=2", "--process_id=1",
      "--local_device_ids=0,3"]
  assert cli.split_passthrough(
      ["prog", "--nodes=2", "--config.lr=1", "--", "-v=1", "--config.x=2"]) == (
          ["prog", "--nodes=2"], ["--config.lr=1", "-v=1", "--config.x=2"])


def test_train_rejects_bad_distributed_flags(tmp_path):
  result = subprocess.run(
      [PYTHON, TRAIN, f"--config={CONFIG}", f"--workdir={tmp_path}", "--num_processes=2",
       "--process_id=2", "--coordinator_address=127.0.0.1:1"], cwd=REPO, capture_output=True,
      text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --process_id=2: must be in 0..1 (--num_processes=2)")


# --- launch/local.py ---------------------------------------------------------------------------


def test_local_dry_run_prints_each_process_with_its_environment():
  result = _launch("local.py", "--num_processes=2", "--devices_per_process=4", "--port=29500",
                   f"--config={CONFIG}", "--workdir=/tmp/run", "--dry_run",
                   "--config.total_steps=4", "--",
                   "--heartbeat_timeout=20", env={"XLA_FLAGS": "--xla_dump_to=/tmp/d "
                                                  "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr
  env = ("JAX_PLATFORMS=cpu XLA_FLAGS='--xla_dump_to=/tmp/d "
         "--xla_force_host_platform_device_count=4'")
  assert result.stdout.splitlines() == [
      f"{env} {PYTHON} {TRAIN} --config={CONFIG} --workdir=/tmp/run "
      f"--coordinator_address=127.0.0.1:29500 --num_processes=2 --process_id={i} "
      "--config.total_steps=4 --heartbeat_timeout=20" for i in range(2)]


def test_local_dry_run_picks_a_free_port():
  result = _launch("local.py", "--num_processes=3", "--devices_per_process=0",
                   f"--config={CONFIG}", "--workdir=/tmp/run", "--dry_run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3 and not any("XLA_FLAGS" in line for line in lines)
  ports = {shlex.split(line)[4] for line in lines}
  assert len(ports) == 1 and ports.pop().startswith("--coordinator_address=127.0.0.1:")


@pytest.mark.parametrize("args, message", [
    (["--num_processes=0"], "error: --num_processes=0: must be >= 1"),
    (["--devices_per_process=-1"], "error: --devices_per_process=-1: must be >= 0"),
    (["--port=70000"], "error: --host/--port='127.0.0.1:70000': port 70000 is not in"),
])
def test_local_bad_flags(args, message):
  result = _launch("local.py", f"--config={CONFIG}", "--workdir=/tmp/run", "--dry_run", *args)
  assert result.returncode == 1 and message in result.stderr


def test_local_names_the_failed_process(tmp_path):
  """Every process fails at once (an unknown config key): the launcher says which."""
  result = _launch("local.py", "--num_processes=2", f"--config={CONFIG}",
                   f"--workdir={tmp_path}", "--config.no_such_key=1")
  assert result.returncode == 1
  assert "[process 0] FATAL Flags parsing error: unknown config key" in result.stdout
  assert result.stderr.strip().splitlines()[-1].startswith("error: process ")
  assert " of 2 exited with code 1" in result.stderr


# --- launch/slurm.py ---------------------------------------------------------------------------


def _srun_line(mode_flags: str) -> str:
  train = (f"exec .venv/bin/python launch/train.py --config={CONFIG} --workdir=/shared/run "
           '--coordinator_address="$COORDINATOR" --num_processes="$SLURM_NTASKS" '
           f'--process_id="$SLURM_PROCID"{mode_flags} --config.total_steps=10')
  return f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(train)}"


@pytest.mark.parametrize("mode, tasks, mode_flags", [
    ("per_node", 1, ""), ("per_gpu", 4, ' --local_device_ids="$SLURM_LOCALID"')])
def test_slurm_dry_run_prints_the_script_and_sbatch(mode, tasks, mode_flags):
  result = _launch("slurm.py", "--nodes=2", "--gpus_per_node=4", f"--mode={mode}",
                   "--partition=gpu", "--time=01:00:00", "--account=proj", "--port=12345",
                   "--repo_dir=/shared/ftjax", f"--config={CONFIG}", "--workdir=/shared/run",
                   "--config.total_steps=10", "--dry_run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[:9] == [
      "#!/bin/bash", "#SBATCH --job-name=ftjax", "#SBATCH --nodes=2",
      f"#SBATCH --ntasks-per-node={tasks}", "#SBATCH --gpus-per-node=4",
      "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --account=proj",
      "#SBATCH --output=slurm-%x-%j.out"]
  assert "cd /shared/ftjax" in lines
  assert 'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in lines
  assert "PORT=12345" in lines and 'export COORDINATOR="$COORDINATOR_HOST:$PORT"' in lines
  assert lines[-2] == _srun_line(mode_flags)
  assert lines[-1] == "sbatch ftjax.sbatch"


def test_slurm_script_runs_each_task_with_its_process_id(tmp_path):
  """The script under fake scontrol / srun: each task gets the coordinator and its id."""
  script = tmp_path / "job.sbatch"
  result = _launch("slurm.py", "--nodes=2", "--gpus_per_node=2", "--mode=per_gpu",
                   f"--repo_dir={tmp_path}", "--python=echo", f"--config={CONFIG}",
                   "--workdir=/shared/my run", f"--script={script}", "--config.seed=3")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [f"wrote {script}", f"submit with: sbatch {script}"]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_program(bin_dir, "scontrol", 'echo gpu-node-07; echo gpu-node-08\n')
  # 2 nodes x 2 tasks: SLURM_PROCID 0..3, SLURM_LOCALID 0..1 on each node.
  _fake_program(bin_dir, "srun", 'for i in 0 1 2 3; do SLURM_PROCID=$i SLURM_LOCALID=$((i % 2))'
                ' "${@:2}"; done\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4097",
         "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NTASKS": "4"}
  ran = subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=60, check=False)
  assert ran.returncode == 0, ran.stderr
  assert ran.stdout.splitlines() == ["coordinator gpu-node-07:61441, 4 processes"] + [
      f"launch/train.py --config={CONFIG} --workdir=/shared/my run "
      f"--coordinator_address=gpu-node-07:61441 --num_processes=4 --process_id={i} "
      f"--local_device_ids={i % 2} --config.seed=3" for i in range(4)]


def test_slurm_submit_runs_sbatch(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_program(bin_dir, "sbatch", 'echo "Submitted batch job 77 ($1)"\n')
  result = _launch("slurm.py", f"--config={CONFIG}", "--workdir=/shared/run", "--submit",
                   env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ["wrote ftjax.sbatch",
                                        "Submitted batch job 77 (ftjax.sbatch)"]
  assert (tmp_path / "ftjax.sbatch").read_text().startswith("#!/bin/bash\n")


@pytest.mark.parametrize("args, message", [
    (["--nodes=0"], "error: --nodes=0: must be >= 1"),
    (["--gpus_per_node=0"], "error: --gpus_per_node=0: must be >= 1"),
    (["--port=99999"], "error: --port=99999: must be in 1..65535"),
    (["--sbatch=mem=0"], "error: --sbatch='mem=0': expected an sbatch option"),
    (["--mode=per_core"], "FATAL Flags parsing error: flag --mode=per_core: value should be"),
])
def test_slurm_bad_flags(args, message):
  result = _launch("slurm.py", f"--config={CONFIG}", "--workdir=/x", "--dry_run", *args)
  assert result.returncode == 1 and message in result.stderr, result.stderr


# --- launch/tpu_pod.py -------------------------------------------------------------------------

_TPU = ["--tpu_name=ftjax-pod", "--zone=us-central2-b", "--project=my-proj",
        "--accelerator_type=v4-32", "--runtime_version=tpu-ubuntu2204-base",
        f"--config={CONFIG}", "--workdir=/mnt/runs/pod", "--config.optimizer.lr=1e-4"]


def _tpu_commands(remote: str, zone: str = "--zone=us-central2-b --project=my-proj") -> list:
  install = ("sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv make && "
             "make .venv/.runtime PYTHON=python3 && .venv/bin/pip install -q -e '.[tpu]'")
  unpack = (f"mkdir -p ~/{remote} && tar -xzf /tmp/ftjax-code.tar.gz -C ~/{remote} && "
            f"cd ~/{remote} && {install}")
  train = (f"cd ~/{remote} && .venv/bin/python launch/train.py --config={CONFIG} "
           "--workdir=/mnt/runs/pod --cluster=tpu --config.optimizer.lr=1e-4")
  gcloud = "gcloud compute tpus tpu-vm"
  return [
      f"{gcloud} create ftjax-pod --accelerator-type=v4-32 --version=tpu-ubuntu2204-base "
      f"{zone}",
      "tar -czf /tmp/ftjax-ftjax-pod.tar.gz --exclude=.git --exclude=.venv "
      f"--exclude=__pycache__ '--exclude=*.egg-info' --exclude=.pytest_cache -C {REPO} .",
      f"{gcloud} scp /tmp/ftjax-ftjax-pod.tar.gz ftjax-pod:/tmp/ftjax-code.tar.gz "
      f"--worker=all {zone}",
      f"{gcloud} ssh ftjax-pod --worker=all {shlex.quote('--command=' + unpack)} {zone}",
      f"{gcloud} ssh ftjax-pod --worker=all {shlex.quote('--command=' + train)} {zone}",
      f"{gcloud} delete ftjax-pod --quiet {zone}",
  ]


def test_tpu_pod_dry_run_prints_create_copy_install_train_delete():
  result = _launch("tpu_pod.py", *_TPU, "--dry_run")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == _tpu_commands("ftjax")


def test_tpu_pod_reuse_and_keep_skip_create_and_delete():
  result = _launch("tpu_pod.py", *_TPU, "--reuse", "--keep", "--remote_dir=work/ft",
                   "--dry_run")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == _tpu_commands("work/ft")[1:-1]


def test_tpu_pod_deletes_the_tpu_after_a_failed_run(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.txt"
  _fake_program(bin_dir, "gcloud", f'echo "gcloud $4 $5" >> {calls}\n'
                'if [[ "$*" == *launch/train.py* ]]; then echo "worker 3 failed" >&2; exit 7; fi\n')
  _fake_program(bin_dir, "tar", f'echo "tar" >> {calls}\n')
  result = _launch("tpu_pod.py", *_TPU, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert result.returncode == 1
  assert calls.read_text().splitlines() == [
      "gcloud create ftjax-pod", "tar", "gcloud scp /tmp/ftjax-ftjax-pod.tar.gz",
      "gcloud ssh ftjax-pod", "gcloud ssh ftjax-pod", "gcloud delete ftjax-pod"]
  assert "worker 3 failed" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: gcloud compute tpus tpu-vm ssh ftjax-pod ... exited with code 7")


@pytest.mark.parametrize("args, message", [
    (["--tpu_name=Bad_Name"], "error: --tpu_name='Bad_Name': use 1-61 lowercase letters"),
    (["--remote_dir=/abs"], "error: --remote_dir='/abs': a path relative to the home"),
])
def test_tpu_pod_bad_flags(args, message):
  result = _launch("tpu_pod.py", *_TPU, "--dry_run", *args)
  assert result.returncode == 1 and message in result.stderr, result.stderr


def test_tpu_pod_requires_a_zone():
  result = _launch("tpu_pod.py", "--tpu_name=a", f"--config={CONFIG}", "--workdir=/w",
                   "--dry_run")
  assert result.returncode == 1 and "--zone must have a value other than None" in result.stderr

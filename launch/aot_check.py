r"""Compiles a run's train and eval steps for a mesh that is not there and reports memory.

    python launch/aot_check.py --config=configs/smollm2_chat.py:peft=full --topology=cpu:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --memory_per_device=16GiB

Nothing is trained and no array is created: the model, optimizer state and
batch exist as shapes with shardings (`ftjax.build.build(..., abstract=True)`),
and the steps are lowered and compiled ahead of time for the target devices.
The report gives, per device, the parameters and optimizer state the mesh
(`config.mesh`, e.g. `--config.mesh.fsdp=8`) leaves on each device, the
compiler's memory analysis of each step, the peak estimate and compile times.

--topology names the target devices:
  cpu:N     N fake CPU devices: the steps are partitioned over the mesh as for N
            accelerators, and the memory figures are the CPU compiler's.
  v5e:2x2   a TPU slice (also v4:2x2x1, v5p:2x2x1, v6e:4x4, ...), compiled by the
            TPU compiler without TPU hardware; this needs libtpu (`jax[tpu]`).

With --memory_per_device (e.g. 16GiB, 80GB, 512MiB) the check fails with exit
code 3 when a step's peak estimate exceeds it, naming the biggest contributors.
Bad flags, configs or topologies end with "error: ..." and exit code 1.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ftjax import build, cli, distributed, models, regularizers, run_setup, sharding
from ftjax.config import validate
from ftjax.data import packing, registry
from ftjax.errors import ConfigError
from ftjax.models import target

EXIT_DOES_NOT_FIT = 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional "
                                          ":arg after the path.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "The target devices: cpu:N (N fake CPU "
                                "devices) or a TPU topology such as v5e:2x2 (needs libtpu).")
_MEMORY = flags.DEFINE_string("memory_per_device", None, "Fail when a step's peak estimate "
                              "exceeds this, e.g. 16GiB, 80GB, 512MiB.")
_CHIPS_PER_HOST = flags.DEFINE_list("chips_per_host_bounds", None, "TPU only: chips per "
                                    "host, e.g. 2,2,1, for slices of several hosts.")
flags.mark_flags_as_required(["config", "topology"])

_CPU = re.compile(r"cpu:(\d+)")
_TPU = re.compile(r"v\d+[a-z]*:\d+(x\d+){1,2}")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
  """Bytes in a size such as "16GiB", "80GB", "512MiB", "1.5 GiB" or "1000000".

  Raises:
    ConfigError: for anything else.
  """
  match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
  unit = match and match.group(2).lower()
  if not match or unit not in _UNITS or float(match.group(1)) <= 0:
    raise ConfigError(f"--memory_per_device={text!r}: expected a positive size with a unit "
                      "of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of "
                      "1024), e.g. 16GiB")
  return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
  """A byte count in binary units: "512 B", "3.25 MiB", "14.9 GiB"."""
  if abs(n) < 1024:
    return f"{int(n)} B"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
  raise AssertionError("unreachable")


def _cpu_devices(count: int) -> list[jax.Device]:
  """`count` fake CPU devices; the backend must not have started with another count."""
  os.environ.update(distributed.cpu_process_env(count))
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backend has started already: fine if it has the devices
    pass
  devices = jax.devices("cpu")
  if len(devices) != count:
    raise ConfigError(f"--topology=cpu:{count}: JAX's CPU backend has already started with "
                      f"{len(devices)} devices; run the check in a fresh process")
  return devices


def _tpu_devices(name: str, chips_per_host: Sequence[str] | None) -> list[jax.Device]:
  """Compile-only devices of the TPU topology `name` (no TPU needed, libtpu is)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  kwargs = {}
  if chips_per_host:
    try:
      kwargs["chips_per_host_bounds"] = tuple(int(c) for c in chips_per_host)
    except ValueError:
      raise ConfigError(f"--chips_per_host_bounds={','.join(chips_per_host)}: expected "
                        "integers such as 2,2,1") from None
  # The host's own accelerators (if any) are not used: everything runs on the CPU
  # except the TPU compiler, and the topology is described without querying a VM.
  jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                             **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split()) or type(e).__name__
    raise ConfigError(f"--topology={name}: JAX cannot describe this TPU topology ({detail}). "
                      "TPU topologies need the TPU compiler (libtpu: pip install 'jax[tpu]'); "
                      "without it, check the mesh on fake CPU devices with --topology=cpu:N") from e


def target_devices(topology: str, chips_per_host: Sequence[str] | None = None
                   ) -> list[jax.Device]:
  """The devices named by --topology (see the module docstring).

  Raises:
    ConfigError: for an unknown form, or a TPU topology JAX cannot describe.
  """
  topology = topology.strip()
  cpu = _CPU.fullmatch(topology)
  if cpu:
    if int(cpu.group(1)) < 1:
      raise ConfigError(f"--topology={topology}: needs at least one device")
    if chips_per_host:
      raise ConfigError("--chips_per_host_bounds applies to TPU topologies only")
    return _cpu_devices(int(cpu.group(1)))
  if _TPU.fullmatch(topology):
    return _tpu_devices(topology, chips_per_host)
  raise ConfigError(f"--topology={topology!r}: expected cpu:N (N fake CPU devices, e.g. "
                    "cpu:8) or a TPU topology name such as v5e:2x2, v4:2x2x1 or v6e:4x4")


def _compile(jitted: Any, *args: Any) -> tuple[Any, str, str]:
  """(compiled, "lowering + compile seconds", the kernels it calls); a compiler out of
  memory is a ConfigError.

  The kernels are the targets of the program's custom calls, e.g. "tpu_custom_call"
  for Pallas / Mosaic kernels on TPU, "none" where XLA compiles everything itself.
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  # Targets print bare (@tpu_custom_call) or quoted (@"__cudnn$fmhaSoftmax").
  kernels = ", ".join(sorted({quoted or bare for quoted, bare in re.findall(
      r'custom_call @(?:"([^"]+)"|([\w.$-]+))', lowered.as_text())}))
  compile_at = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ConfigError("the compiler ran out of device memory: "
                      + " ".join(str(e).split())[:600]) from e
  seconds = f"{lowered_at - start:.1f} + {time.perf_counter() - compile_at:.1f}"
  return compiled, seconds, kernels or "none"


class StepMemory:
  """A compiled step's per-device memory: the compiler's analysis and what it adds up to.

  Attributes:
    analysis: {field: bytes} of `compiled.memory_analysis()` (empty if unavailable).
    xla_peak: the analysis' `peak_memory_in_bytes` where the compiler gives it.
    resident: bytes held on the device while the step runs that are not its arguments.
    parts: (what, bytes) of the estimate, for naming the biggest contributors.
    seconds: "lowering + compile seconds".
    kernels: the custom calls (kernels) the step makes, "none" for none.
  """

  def __init__(self, compiled: Any, seconds: str, kernels: str, resident: int,
               known_args: Sequence[tuple[str, int]], temporaries: str):
    """Reads the compiler's analysis.

    Args:
      compiled: the compiled step.
      seconds: see `seconds`.
      kernels: see `kernels`.
      resident: see `resident`.
      known_args: (what, bytes) of the step's arguments (parameters, batch, ...).
      temporaries: what the step's temporaries hold, for the contributors' names.
    """
    stats = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    self.analysis = {} if stats is None else {
        f: int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in fields}
    peak = getattr(stats, "peak_memory_in_bytes", None) if stats is not None else None
    self.xla_peak = int(peak) if peak else None
    self.resident = resident
    self.seconds = seconds
    self.kernels = kernels
    a = self.analysis
    other_args = a.get("argument", 0) - sum(n for _, n in known_args)
    self.parts = list(known_args) + [
        ("other arguments", max(other_args, 0)),
        (f"temporaries ({temporaries})", a.get("temp", 0)),
        ("outputs not written in place of donated inputs",
         max(a.get("output", 0) - a.get("alias", 0), 0)),
        ("generated code", a.get("generated_code", 0)),
        ("held outside the step (optimizer state, anchor)", resident)]

  @property
  def step_total(self) -> int:
    """arguments + outputs - aliased + temporaries + generated code."""
    a = self.analysis
    return (a.get("argument", 0) + a.get("output", 0) - a.get("alias", 0) + a.get("temp", 0)
            + a.get("generated_code", 0))

  @property
  def peak(self) -> int:
    """The peak estimate: the step's own total and what stays resident meanwhile."""
    return self.step_total + self.resident

  def biggest(self, count: int = 3) -> list[tuple[str, int]]:
    """The `count` largest parts of the peak estimate, largest first."""
    return sorted((p for p in self.parts if p[1] > 0), key=lambda p: -p[1])[:count]


def _percent(part: int, whole: int) -> str:
  share = 100 * part / whole
  return f"{share:.0f}%" if share >= 10 else f"{share:.1f}%"


def _table(rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                   for row in rows)


def _state_table(local: dict[str, int], whole: dict[str, int]) -> str:
  rows = [["state", "per device", "whole model"]]
  rows += [[k, format_bytes(local[k]), format_bytes(whole[k])] for k in local]
  rows.append(["state total", format_bytes(sum(local.values())),
               format_bytes(sum(whole.values()))])
  return _table(rows)


def _steps_table(steps: dict[str, StepMemory], platform: str) -> str:
  names = list(steps)
  rows = [["compiled step, per device (memory_analysis)"] + names]
  labels = (("argument", "arguments"), ("output", "outputs"),
            ("alias", "aliased (donated inputs reused)"),
            ("temp", "temporaries (activations, ...)"), ("generated_code", "generated code"))
  for field, label in labels:
    rows.append([label] + [format_bytes(steps[n].analysis[field]) if steps[n].analysis
                           else "n/a" for n in names])
  rows.append(["step total (args + out - alias + temp + code)"]
              + [format_bytes(steps[n].step_total) for n in names])
  rows.append(["held outside the step (optimizer state, anchor)"]
              + [format_bytes(steps[n].resident) for n in names])
  rows.append(["peak estimate"] + [format_bytes(steps[n].peak) for n in names])
  if platform != "cpu":  # the CPU compiler's counts only arguments and outputs
    rows.append(["XLA peak_memory_in_bytes"] + [
        format_bytes(steps[n].xla_peak) if steps[n].xla_peak else "n/a" for n in names])
  rows.append(["kernels (custom calls)"] + [steps[n].kernels for n in names])
  rows.append(["lower + compile seconds"] + [steps[n].seconds for n in names])
  table = _table(rows)
  if platform == "cpu":
    table += ("\n(cpu: the CPU compiler's figures, whose fusion and buffer reuse differ from "
              "an accelerator's; parameter and optimizer bytes are exact)")
  return table


def _verdict(steps: dict[str, StepMemory], limit: int, limit_text: str, mesh_text: str,
             platform: str) -> tuple[str, bool]:
  """(the line saying whether the steps fit `limit` bytes per device, whether they do)."""
  name = max(steps, key=lambda n: steps[n].peak)
  worst = steps[name]
  if not worst.analysis:
    raise ConfigError(f"--memory_per_device: the {platform} compiler gives no memory analysis "
                      "of the compiled steps, so the limit cannot be checked")
  share = _percent(worst.peak, limit)
  if worst.peak <= limit:
    return (f"fits: the {name}'s peak estimate {format_bytes(worst.peak)} is {share} of "
            f"{format_bytes(limit)} per device"), True
  contributors = ", ".join(f"{what} {format_bytes(n)}" for what, n in worst.biggest())
  return (f"does not fit: the {name}'s peak estimate is {format_bytes(worst.peak)} per device, "
          f"{share} of --memory_per_device={limit_text} ({format_bytes(limit)}) on mesh "
          f"{mesh_text}; biggest contributors: {contributors}"), False


def _compiled_steps(config: ml_collections.ConfigDict, placement: run_setup.Placement,
                    kind: str, multi_task: bool, task_classes: Any, total_steps: int
                    ) -> tuple[dict[str, int], dict[str, int], dict[str, "StepMemory"]]:
  """Builds the run's state as shapes and compiles its steps.

  Returns:
    (the state's bytes per device, the state's bytes in all, {step name: its memory}).
  """
  spec = registry.batch_spec(kind, config.data, multi_task=multi_task)
  packed = run_setup.packs(config, kind)
  setup = run_setup.set_up(config, placement, packing.batch_spec(spec) if packed else spec,
                           task_classes, total_steps, abstract=True)
  built = setup.built
  state = built.state
  # Token arrays of max_length, the longest bucket of config.data.buckets (packed: a row
  # per example): the worst case of the shapes a run compiles.
  train_batch = setup.batch(config.batch_size)
  eval_batch = setup.batch(config.eval_batch_size)
  # The Fisher and reference steps read one example per row, packed run or not.
  examples_batch = build.abstract_batch(spec, config.eval_batch_size,
                                        placement.batch_sharding)
  train = _compile(setup.train, state, built.frozen, train_batch)
  evaluation = _compile(setup.evaluate, state.params, state.stats, built.frozen, eval_batch)

  trees = {"trainable parameters": state.params, "frozen parameters": built.frozen,
           "optimizer state": state.opt_state}
  if state.stats:  # BatchNorm running statistics
    trees["batch statistics"] = state.stats
  if state.anchor:  # L2-SP / EWC: the starting weights (and EWC's Fisher weights)
    trees["regularizer anchor"] = state.anchor
  local = {k: sharding.local_bytes(tree) for k, tree in trees.items()}
  whole = {k: sharding.tree_bytes(tree) for k, tree in trees.items()}
  # What the evaluation and Fisher steps do not take but the device keeps meanwhile.
  held = sharding.local_bytes((state.opt_state, state.step, state.rng, state.anchor))
  eval_args = [(k, v) for k, v in local.items()
               if k not in ("optimizer state", "regularizer anchor")]
  eval_args.append(("batch", sharding.local_bytes(eval_batch)))  # also the Fisher step's
  steps = {
      "train step": StepMemory(
          *train, 0, list(local.items()) + [("batch", sharding.local_bytes(train_batch))],
          "activations, gradients, collective buffers"),
      "eval step": StepMemory(*evaluation, held, eval_args, "activations, collective buffers")}
  if regularizers.kind(config) == "ewc":  # run once at the start, on evaluation batches
    fisher = _compile(setup.fisher_step(), state.params, state.stats, built.frozen,
                      examples_batch)
    steps["EWC Fisher step"] = StepMemory(
        *fisher, held, eval_args, "per-example gradients, activations")

  if setup.task.reference is not None:  # DPO / IPO: once, before training, on eval batches
    reference = _compile(setup.reference_step(), state.params, state.stats, built.frozen,
                         examples_batch)
    steps["reference step"] = StepMemory(*reference, held, eval_args, "activations")

  return local, whole, steps


def check(config: ml_collections.ConfigDict, topology: str, memory_per_device: str | None,
          chips_per_host: Sequence[str] | None = None) -> tuple[str, str | None]:
  """Compiles `config`'s steps for `topology` and measures their per-device memory.

  Args:
    config: a run config.
    topology: the --topology value.
    memory_per_device: the per-device limit (e.g. "16GiB"), or None for no limit.
    chips_per_host: TPU only: chips per host of a multi-host slice.

  Returns:
    (report, failure): the report to print, and the message saying why the steps
    do not fit `memory_per_device` (None when they fit or there is no limit).
  """
  validate(config)
  config = models.resolved(config)
  if config.task == "classification" and config.model.num_classes == 0:
    raise ConfigError("config.model.num_classes=0 takes the class count from the data, which "
                      "this check does not read: set --config.model.num_classes")
  limit = parse_bytes(memory_per_device) if memory_per_device is not None else None
  devices = target_devices(topology, chips_per_host)
  placement = run_setup.place(config, devices)
  mesh, rules = placement.mesh, placement.rules
  mesh_text = sharding.describe_mesh(mesh)
  parallel = sharding.batch_parallelism(mesh, rules)
  sets = registry.check(config)
  task_classes = registry.preset_class_counts(config)
  if len(sets) > 1 and not task_classes:
    raise ConfigError(f"config.data.name={config.data.name!r}: a multi-task run of files takes "
                      "its tasks' classes from the data, which this check does not read")
  # The schedule's length changes no shape; the data set (and so the number of
  # steps of an epoch-based run) is not read.
  total_steps = max(config.total_steps, config.optimizer.warmup_steps, 1)
  kind = sets[0].kind
  platform = devices[0].platform
  # Models choose and lower their kernels (attention, depthwise convolutions) for the
  # target devices, not this machine's backend.
  with target.compiling_for(platform):
    local, whole, steps = _compiled_steps(config, placement, kind, len(sets) > 1,
                                          task_classes, total_steps)
  device_kind = getattr(devices[0], "device_kind", platform)
  batch_axes = ",".join(a for a in rules.batch_axes(mesh) if mesh.shape[a] > 1) or "none"
  rows = (f"{config.data.image_size}x{config.data.image_size} images" if kind == "image"
          else f"{config.data.max_length} tokens (the longest bucket)")
  lines = [f"mesh: {mesh_text} over {len(devices)} {device_kind} devices "
           f"(--topology={topology})",
           f"batch: train {config.batch_size}, eval {config.eval_batch_size} rows of "
           f"{rows}, split {parallel} ways over mesh axes "
           f"{batch_axes}; grad_accum_steps={config.grad_accum_steps}, "
           f"compute_dtype={config.compute_dtype}",
           "", _state_table(local, whole), "", _steps_table(steps, platform)]
  if limit is None:
    return "\n".join(lines), None
  verdict, fits = _verdict(steps, limit, memory_per_device, mesh_text, platform)
  if fits:
    return "\n".join(lines + ["", verdict]), None
  return "\n".join(lines), verdict


def _main() -> None:
  report, failure = check(_CONFIG.value, _TOPOLOGY.value, _MEMORY.value,
                          _CHIPS_PER_HOST.value)
  print(report, flush=True)
  if failure:
    print(f"error: {failure}", file=sys.stderr, flush=True)
    sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
  app.run(cli.main(_main), flags_parser=cli.parse_flags)

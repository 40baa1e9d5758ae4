"""From a config and devices to a built run: mesh, axis rules, task, state and jitted steps.

The trainer, `launch/aot_check.py` (with `abstract=True`: shapes instead of
arrays, for devices that are not there) and the benchmarks all set a run up
here, so each compiles the same program:

    placement = run_setup.place(config, devices)      # mesh, rules, batch split
    setup = run_setup.set_up(config, placement, batch_spec, task_classes, total_steps)
    setup.train.lower(setup.built.state, setup.built.frozen, setup.batch(size))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from ftjax import build, models, sharding, tasks
from ftjax.data import buckets, packing


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: the mesh, the axis rules and the batches' sharding."""

  mesh: Mesh
  rules: sharding.Rules
  batch_sharding: NamedSharding

  def data_shard(self, batch_size: int) -> tuple[int, int]:
    """(index, count): which part of each global batch this process reads."""
    return sharding.process_batch_slice(self.batch_sharding, batch_size)


def packs(config: ml_collections.ConfigDict, kind: str) -> bool:
  """Whether a run with a resolved model name packs its batches of `kind` data
  (`config.data.packing`, `ftjax.data.packing`); raises ConfigError for 'on' where it
  cannot."""
  return packing.enabled(config.data.packing, kind, config.model.name,
                         config.model.name in models.READS_PACKED)


def place(config: ml_collections.ConfigDict,
          devices: Sequence[jax.Device] | None = None) -> Placement:
  """The mesh of `config.mesh` over `devices` (default: every device of every process).

  Raises:
    ConfigError: a mesh that does not fit the devices, or batch sizes that do not
      split evenly over the batch axes.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.Rules.from_config(config.axis_rules)
  build.check_batch_sizes(config, mesh, rules)
  return Placement(mesh, rules, sharding.batch_sharding(mesh, rules))


@dataclasses.dataclass(frozen=True)
class Setup:
  """A run ready to compile: its task, model and state, and the jitted steps.

  `train(state, frozen, batch) -> (state, metrics)` donates the state;
  `evaluate(params, stats, frozen, batch) -> sums`.
  """

  config: ml_collections.ConfigDict
  placement: Placement
  batch_spec: dict[str, tuple[tuple[int, ...], Any]]
  task: tasks.Task
  built: build.Built
  train: Any
  evaluate: Any

  def batch(self, size: int, length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `size` rows of the run's data, as sharded shapes; `length`:
    its token arrays cut to that bucket (`ftjax.data.buckets`; None: max_length)."""
    return build.abstract_batch(buckets.at_length(self.batch_spec, length), size,
                                self.placement.batch_sharding)

  def batch_of_shape(self, size: int, shape: tuple[int, int] | None
                     ) -> dict[str, jax.ShapeDtypeStruct]:
    """`batch(size)` with its token arrays of `shape` (rows, length), as a step's batch
    has them (`ftjax.data.buckets.batch_shape`); None: `batch(size)`."""
    return self.batch(size) if shape is None else self.batch(*shape)

  def reference_step(self) -> Any:
    """The jitted reference step of a pair task (`build.jit_reference_step`)."""
    return build.jit_reference_step(self.built, self.task, self.config, self.placement.rules,
                                    self.placement.batch_sharding)

  def fisher_step(self) -> Any:
    """EWC's jitted Fisher step (`build.jit_fisher_step`)."""
    return build.jit_fisher_step(self.built, self.task, self.config, self.placement.rules,
                                 self.placement.batch_sharding)


def set_up(config: ml_collections.ConfigDict, placement: Placement,
           batch_spec: dict[str, tuple[tuple[int, ...], Any]],
           task_classes: Sequence[tuple[str, int]], total_steps: int, *,
           abstract: bool = False, base: tuple[Any, Any] | None = None) -> Setup:
  """Builds the task, the model and its sharded state, and jits the steps.

  Args:
    config: a validated run config (with the data's class count).
    placement: from `place`.
    batch_spec: what a batch holds (`ftjax.data.registry.batch_spec`).
    task_classes: (name, classes) of each task of a multi-task run; ().
    total_steps: optimizer steps of the run (the schedule's length).
    abstract: shapes with shardings instead of arrays (`build.build`).
    base: an already created base model and its parameters (`build.build`).
  """
  task = tasks.get(config, placement.mesh, placement.rules, task_classes)
  built = build.build(config, placement.mesh, placement.rules, total_steps, abstract=abstract,
                      base=base)
  train, evaluate = build.jit_steps(built, task, config, placement.rules,
                                    placement.batch_sharding)
  return Setup(config, placement, dict(batch_spec), task, built, train, evaluate)

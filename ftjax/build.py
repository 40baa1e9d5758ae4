"""From a run config and a device mesh to the model, optimizer and sharded training state.

The shardings of every parameter and optimizer-state leaf are derived from
shapes alone (`jax.eval_shape` and the axis rules), then each array is created
directly in its shards: pretrained tensors go from host memory to their shards,
fresh parameters and optimizer moments are computed by `jax.jit` with those
`out_shardings`, so no device ever holds a full copy of a sharded model.

`build(..., abstract=True)` stops before creating any array: the result holds
`jax.ShapeDtypeStruct`s with shardings, enough to compile the train step for a
mesh whose devices are not there (`launch/aot_check.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import models, optim, regularizers, runs, schema, sharding, tasks
from ftjax import state as state_lib
from ftjax import step as step_lib
from ftjax.errors import ConfigError
from ftjax.models import batch_norm
from ftjax.peft import methods as peft_methods


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check(config: ml_collections.ConfigDict) -> None:
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"config.grad_accum_steps={config.grad_accum_steps}")
  if config.total_steps == 0 and config.num_epochs == 0:
    raise ConfigError("config.num_epochs=0: must be a positive integer when "
                      "config.total_steps is 0")
  if 0 < config.total_steps < config.optimizer.warmup_steps:
    raise ConfigError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps}: "
                      f"more than config.total_steps={config.total_steps}")


SCHEMA = schema.Section("", "The run's length, batches, precision and starting weights.", {
    "seed": schema.Key(0, "seeds initialisation, shuffling, dropout and sampling"),
    "batch_size": schema.Key(32, "examples (rows) per optimizer step, over all devices",
                             rule=schema.positive),
    "eval_batch_size": schema.Key(128, "examples per evaluation batch", rule=schema.positive),
    "grad_accum_steps": schema.Key(1, "micro-batches each step's batch is cut into",
                                   rule=schema.positive),
    "num_epochs": schema.Key(1, "passes over the training data (when total_steps is 0)",
                             rule=schema.at_least(0)),
    "total_steps": schema.Key(0, "> 0: optimizer steps of the run, instead of num_epochs",
                              rule=schema.at_least(0)),
    "compute_dtype": schema.Key("float32", "activations' dtype (weights stay float32)",
                                choices=tuple(DTYPES)),
    "init_from": schema.Key("", "the workdir of a finished run whose best weights this run "
                            "starts from (continual fine-tuning)"),
}, check=_check)


@dataclasses.dataclass
class Built:
  """What a run trains, and where each piece of it lives."""

  model: models.Model
  base: Any  # the unadapted model's parameter shapes, for the parameter summary
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state: state_lib.TrainState  # trainable parameters, optimizer state, step, rng, stats
  frozen: Any  # the frozen parameters
  state_shardings: state_lib.TrainState
  frozen_shardings: Any


def _with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _stored_frozen(config: ml_collections.ConfigDict, frozen: Any) -> Any:
  """The frozen parameters as `config.peft.base_dtype` stores them: float32, or cast once
  to the compute dtype, which the step would cast them to anyway (integer leaves, QLoRA's
  codes, stay as they are). Arrays keep their shardings; shapes get the new dtype."""
  dtype = DTYPES[config.compute_dtype]
  if config.peft.base_dtype == "float32" or dtype == jnp.float32:
    return frozen

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return jax.tree.map(cast, frozen)


def _adapted_shapes(config: ml_collections.ConfigDict) -> tuple[models.Model, Any, Any]:
  """(model, base parameter shapes, adapted parameter shapes) without creating arrays."""
  built = {}

  def create():
    built["model"], base, params = peft_methods.create(config)
    return base, params

  try:
    base, params = jax.eval_shape(create)
  except jax.errors.TracerArrayConversionError as e:
    raise ConfigError(f"config.peft.method={config.peft.method!r}: its parameters are "
                      "computed on the host (quantization) and cannot be derived from shapes "
                      "alone") from e
  return built["model"], base, params


def build(config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules,
          total_steps: int, *, abstract: bool = False,
          base: tuple[models.Model, Any] | None = None) -> Built:
  """The model, optimizer and training state of `config` on `mesh`.

  Args:
    config: a run config.
    mesh: the device mesh (`sharding.make_mesh`).
    rules: the logical-to-mesh axis rules.
    total_steps: optimizer steps of the run (the schedule's length).
    abstract: return shapes with shardings instead of arrays.
    base: the model of `config.model` and its pretrained parameters, already created
      (several runs of one base model, e.g. the benchmarks' methods); by default
      created here.

  Returns:
    A `Built` whose `state` and `frozen` are sharded arrays (or their shapes).
  """

  def shardings_of(model: models.Model, tree: Any) -> Any:
    return sharding.param_shardings(tree, model.axes, rules, mesh)

  if abstract:
    model, base_params, params = _adapted_shapes(config)
  elif base is None:
    model, base_params, params = peft_methods.create(config, shardings_of)
  else:
    base_model, base_params = base
    model, params = peft_methods.adapt(config, base_model, base_params, config.seed)
  if config.init_from and not abstract:
    params = runs.initial_weights(config.init_from, params)
  params, stats = model.split_stats(params)
  trainable, frozen = peft_methods.split(config, model, params)
  frozen = _stored_frozen(config, frozen)
  model = dataclasses.replace(model, updating=batch_norm.updating_layers(
      config.model.batch_norm, stats, trainable))
  depths = model.layout.depths(trainable, params)
  tx, schedule = optim.make_optimizer(config.optimizer, trainable, total_steps, depths)
  replicated = NamedSharding(mesh, P())
  trainable_shardings = shardings_of(model, trainable)
  anchor = regularizers.anchor_layout(config)
  anchor_fields = {"": (), "center": ("center",), "weighted": ("center", "weight")}[anchor]
  state_shardings = state_lib.TrainState(
      step=replicated, params=trainable_shardings,
      opt_state=sharding.optimizer_shardings(tx, trainable, trainable_shardings, mesh),
      rng=replicated, stats=shardings_of(model, stats),
      anchor={field: trainable_shardings for field in anchor_fields})
  frozen_shardings = shardings_of(model, frozen)
  create = lambda params, stats: state_lib.create(params, tx, config.seed, stats, anchor)
  if abstract:
    state = _with_shardings(jax.eval_shape(create, trainable, stats), state_shardings)
    frozen = _with_shardings(frozen, frozen_shardings)
  else:
    if base is not None:  # the caller's arrays, which creating the state would donate
      trainable, stats = jax.tree.map(jnp.array, (trainable, stats))
    frozen = jax.device_put(frozen, frozen_shardings)
    state = jax.jit(create, out_shardings=state_shardings, donate_argnums=(0, 1))(
        jax.device_put(trainable, trainable_shardings),
        jax.device_put(stats, state_shardings.stats))
  # Shapes only: the float32 arrays of kernels stored otherwise (quantized, or in the
  # compute dtype) would stay alive in them.
  base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
  return Built(model=model, base=base_shapes, tx=tx, schedule=schedule, state=state,
               frozen=frozen, state_shardings=state_shardings,
               frozen_shardings=frozen_shardings)


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh,
                      rules: sharding.Rules) -> None:
  """Raises ConfigError unless the batch sizes split evenly over the batch axes."""
  parallel = sharding.batch_parallelism(mesh, rules)
  split = (f"the batch-parallel size ({parallel} = the product of mesh axes "
           f"{rules.batch_axes(mesh)} of mesh {sharding.describe_mesh(mesh)})")
  if config.batch_size % (parallel * config.grad_accum_steps):
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by {split} "
                      f"times grad_accum_steps ({config.grad_accum_steps})")
  if config.eval_batch_size % parallel:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by "
                      f"{split}")


def abstract_batch(batch_spec: dict[str, tuple[tuple[int, ...], Any]], batch_size: int,
                   batch_sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """A global batch of `batch_size` rows as sharded shapes.

  Args:
    batch_spec: {key: (shape after the batch dim, dtype)} of the run's data
      (`ftjax.data.registry.batch_spec`).
  """
  return {key: jax.ShapeDtypeStruct((batch_size,) + shape, dtype, sharding=batch_sharding)
          for key, (shape, dtype) in batch_spec.items()}


def _with_activation_sharding(fn: functools.partial, mesh: Mesh,
                              rules: sharding.Rules) -> Any:
  """`fn` traced with the models' activation constraints pinned to `mesh`."""

  def traced(*args, **kwargs):
    with sharding.activation_sharding(mesh, rules):
      return fn(*args, **kwargs)

  # Named like the step, for compile logs and profiles.
  traced.__name__ = traced.__qualname__ = fn.func.__name__
  return traced


def jit_steps(built: Built, task: tasks.Task, config: ml_collections.ConfigDict,
              rules: sharding.Rules, batch_sharding: NamedSharding) -> tuple[Any, Any]:
  """The train and eval steps jitted with explicit input and output shardings.

  Returns:
    (train, eval): `train(state, frozen, batch) -> (state, metrics)` donating the
    state, and `eval(params, stats, frozen, batch) -> sums`; lower and compile each once.
  """
  dtype = DTYPES[config.compute_dtype]
  mesh = batch_sharding.mesh
  replicated = NamedSharding(mesh, P())
  penalty_strength = (config.regularizer.strength if regularizers.kind(config) != "none"
                      else 0.0)
  train = _with_activation_sharding(functools.partial(
      step_lib.train_step, model=built.model, task=task, tx=built.tx, schedule=built.schedule,
      grad_accum_steps=config.grad_accum_steps, compute_dtype=dtype,
      penalty_strength=penalty_strength), mesh, rules)
  evaluate = _with_activation_sharding(functools.partial(
      step_lib.eval_step, model=built.model, task=task, compute_dtype=dtype), mesh, rules)
  return (jax.jit(train, in_shardings=(built.state_shardings, built.frozen_shardings,
                                       batch_sharding),
                  out_shardings=(built.state_shardings, replicated), donate_argnums=0),
          jax.jit(evaluate, in_shardings=(built.state_shardings.params,
                                          built.state_shardings.stats, built.frozen_shardings,
                                          batch_sharding),
                  out_shardings=replicated))


def _jit_weights_step(step_fn: Any, out_shardings: Any, built: Built, task: tasks.Task,
                      config: ml_collections.ConfigDict, rules: sharding.Rules,
                      batch_sharding: NamedSharding) -> Any:
  """`step_fn(params, stats, frozen, batch, model=, task=, compute_dtype=)` jitted with
  the state's input shardings and `out_shardings`."""
  step = _with_activation_sharding(functools.partial(
      step_fn, model=built.model, task=task, compute_dtype=DTYPES[config.compute_dtype]),
      batch_sharding.mesh, rules)
  shardings = built.state_shardings
  return jax.jit(step, in_shardings=(shardings.params, shardings.stats,
                                     built.frozen_shardings, batch_sharding),
                 out_shardings=out_shardings)


def jit_reference_step(built: Built, task: tasks.Task, config: ml_collections.ConfigDict,
                       rules: sharding.Rules, batch_sharding: NamedSharding) -> Any:
  """`step.reference_step` jitted: (params, stats, frozen, batch) -> (reference
  log-probabilities [B, 2], pair indices, mask), replicated so every process reads all."""
  return _jit_weights_step(step_lib.reference_step, NamedSharding(batch_sharding.mesh, P()),
                           built, task, config, rules, batch_sharding)


def jit_fisher_step(built: Built, task: tasks.Task, config: ml_collections.ConfigDict,
                    rules: sharding.Rules, batch_sharding: NamedSharding) -> Any:
  """`step.fisher_step` jitted: (params, stats, frozen, batch) -> (squared-gradient sums
  sharded like the parameters, example count)."""
  return _jit_weights_step(
      step_lib.fisher_step,
      (built.state_shardings.params, NamedSharding(batch_sharding.mesh, P())),
      built, task, config, rules, batch_sharding)

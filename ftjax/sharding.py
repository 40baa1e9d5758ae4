"""Device meshes and shardings: named mesh axes, logical parameter axes, rules between them.

A run's mesh has three named axes (`config.mesh`):

* `data`: pure data parallelism; each group of devices holds a full model replica.
* `fsdp`: the batch is split over it too, and parameters (with their optimizer
  state) are sharded over it, gathered layer by layer when used (ZeRO-3 / FSDP).
* `tensor`: weight matrices are split along heads, MLP width and vocabulary
  (Megatron-style tensor parallelism); the batch is replicated over it.

Models also mark their activations at block boundaries with `constrain(x,
("batch", None, None))`: while a step is traced inside `activation_sharding(mesh,
rules)`, that pins the batch dimension to the batch axes, so the compiler keeps
activations split over `fsdp` (gathering weights instead) rather than
gathering the batch; outside it, `constrain` does nothing.

Each model names the logical axes of its parameters (`Model.axes`: regexes over
parameter paths -> names such as `("embed", "mlp")`); `config.axis_rules` maps
logical names to mesh axes. Adapter factors and quantized weights follow the
axes of the kernel they belong to. Everything is derived once from shapes
(`jax.eval_shape`), before any array is created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import param_groups, schema
from ftjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Every logical axis name a model may use, and `batch` for the inputs' leading dimension.
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "mlp", "classes", "norm")
# FSDP over `fsdp`, tensor parallelism over `tensor`; norms and class heads replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("classes", None),
    ("norm", None),
)

Axes = tuple[str | None, ...]


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) from `config.mesh`, with one -1 taking the rest.

  Raises:
    ConfigError: for sizes whose product is not the number of devices (`SCHEMA`
      checks each size).
  """
  sizes = [config[axis] for axis in MESH_AXES]
  rest = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  known = math.prod(size for size in sizes if size != -1)
  described = " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
  if rest:
    if num_devices % known:
      raise ConfigError(f"config.mesh ({described}): the other axes ({known} devices) do not "
                        f"divide the {num_devices} devices")
    sizes[MESH_AXES.index(rest[0])] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"config.mesh ({described}) has {known} devices, but the run has "
                      f"{num_devices}")
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default: all).

  Devices are ordered by `jax.make_mesh`, which keeps the innermost axis
  (`tensor`) within a host and the outermost (`data`) across hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


@dataclasses.dataclass(frozen=True)
class Rules:
  """Logical axis name -> mesh axes (a name, a tuple of names, or None: replicated)."""

  mapping: dict[str, tuple[str, ...]]

  @classmethod
  def from_config(cls, rules: Sequence[Sequence[Any]]) -> "Rules":
    """Checks `config.axis_rules`, a list of (logical name, mesh axis | tuple | None).

    Raises:
      ConfigError: naming the rule with an unknown logical or mesh axis, or a
        logical axis given twice.
    """
    mapping = {}
    for rule in rules:
      if len(rule) != 2:
        raise ConfigError(f"config.axis_rules: {tuple(rule)!r} is not a (logical axis, mesh "
                          "axes) pair")
      logical, target = rule
      if logical not in LOGICAL_AXES:
        raise ConfigError(f"config.axis_rules: unknown logical axis {logical!r}; known: "
                          f"{list(LOGICAL_AXES)}")
      if logical in mapping:
        raise ConfigError(f"config.axis_rules: logical axis {logical!r} has two rules")
      targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
      unknown = [t for t in targets if t not in MESH_AXES]
      if unknown:
        raise ConfigError(f"config.axis_rules: ({logical!r}, {target!r}) names unknown mesh "
                          f"axes {unknown}; mesh axes are {list(MESH_AXES)}")
      mapping[logical] = targets
    return cls(mapping)

  def spec(self, axes: Axes, shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of an array of `shape` whose dimensions have logical `axes`.

    A dimension stays replicated when its mesh axes have size 1, are already used
    by an earlier dimension, or do not divide it (e.g. 2 classes over 4 devices).
    """
    used: set[str] = set()
    parts = []
    for name, size in zip(axes, shape):
      targets = tuple(t for t in self.mapping.get(name, ()) if mesh.shape[t] > 1
                      and t not in used) if name else ()
      if not targets or size % math.prod(mesh.shape[t] for t in targets):
        parts.append(None)
        continue
      used.update(targets)
      parts.append(targets[0] if len(targets) == 1 else targets)
    while parts and parts[-1] is None:
      parts.pop()
    return P(*parts)

  def batch_axes(self, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    return tuple(t for t in self.mapping.get("batch", ()) if t in mesh.shape)


# Parameters an adapter or quantization adds next to (or in place of) a kernel,
# and which of the kernel's [in, out] logical axes each dimension follows.
_DERIVED = (
    (r"(.*)/lora_a", "kernel", lambda a: (a[0], None)),
    (r"(.*)/lora_b", "kernel", lambda a: (None, a[1])),
    (r"(.*)/lora_magnitude", "kernel", lambda a: (a[1],)),
    (r"(.*/kernel)/codes", "", lambda a: (a[0], None)),  # int8 [in, out]; nf4 [blocks, bytes]
    (r"(.*/kernel)/scale", "", lambda a: (a[1],)),  # int8 per output column
    (r"(.*/kernel)/absmax", "", lambda a: (a[0],)),  # nf4 per block, blocks follow rows
    (r"(.*/kernel)/absmax_codes", "", lambda a: (None, None)),  # nf4 double quantization
    (r"(.*/kernel)/absmax_(scale|mean)", "", lambda a: (None,)),
)


def logical_axes(params: Any, model_axes: param_groups.Rules) -> Any:
  """Each parameter's logical axes, a tree like `params` of tuples (one name per dim).

  Args:
    params: parameters or their shapes (nested dicts).
    model_axes: the model's `(regex, axes)` rules over parameter paths.

  Raises:
    ConfigError: if a parameter matches no rule or its axes do not fit its rank.
  """

  def kernel_axes(path: str) -> Axes | None:
    found, axes = param_groups.first_match(path, model_axes)
    return tuple(axes) if found else None

  def axes_of(path: str, leaf: Any) -> Axes:
    axes = kernel_axes(path)
    if axes is None:
      for pattern, suffix, derive in _DERIVED:
        match = re.fullmatch(pattern, path)
        base = match and kernel_axes(match.group(1) + ("/" + suffix if suffix else ""))
        if base:
          axes = derive(base)
          break
    if axes is None:
      raise ConfigError(f"parameter {path} has no logical axes: no rule of the model matches "
                        "it")
    axes = tuple(axes)
    if len(axes) != len(leaf.shape):
      raise ConfigError(f"parameter {path}: logical axes {axes} do not fit shape {leaf.shape}")
    return axes

  return param_groups.map_with_path(axes_of, params)


def param_shardings(params: Any, model_axes: param_groups.Rules, rules: Rules,
                    mesh: Mesh) -> Any:
  """NamedShardings for a tree of parameters (arrays or ShapeDtypeStructs)."""
  axes = logical_axes(params, model_axes)
  return jax.tree.map(lambda a, leaf: NamedSharding(mesh, rules.spec(a, leaf.shape, mesh)),
                      axes, params, is_leaf=lambda x: isinstance(x, tuple))


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, shardings: Any,
                        mesh: Mesh) -> Any:
  """Shardings of `tx`'s state: each moment like its parameter, counters replicated."""
  abstract = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract, shardings,
                               transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Inputs are split along their leading (batch) dimension over the batch axes."""
  axes = rules.batch_axes(mesh)
  return NamedSharding(mesh, P(axes if axes else None))


def batch_parallelism(mesh: Mesh, rules: Rules) -> int:
  """Into how many parts a batch is split (the product of the batch axes' sizes)."""
  return math.prod(mesh.shape[a] for a in rules.batch_axes(mesh))


def process_batch_slice(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """Which contiguous part of a global batch this process feeds: (index, count).

  The process's devices hold rows `index * global_batch / count` onwards,
  `global_batch / count` of them; processes whose devices hold the same rows
  (a `tensor` axis spanning hosts) read the same part.

  Raises:
    ConfigError: if this process's rows are not one contiguous block.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    part = index[0]
    rows.update(range(*part.indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start or global_batch % (stop - start) or start % (stop - start):
    raise ConfigError(f"process {jax.process_index()} holds batch rows {sorted(rows)[:8]}... "
                      f"of {global_batch}: not one aligned block; order the mesh so that each "
                      "host's devices are contiguous on the batch axes")
  size = stop - start
  return start // size, global_batch // size


def describe_mesh(mesh: Mesh) -> str:
  """"data=2 x fsdp=2 x tensor=2", for messages."""
  return " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def tree_bytes(tree: Any) -> int:
  """Bytes of all the leaves of a tree of arrays (or ShapeDtypeStructs), unsharded."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def local_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded arrays (or ShapeDtypeStructs with
  shardings): the largest shard of each leaf."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(tuple(leaf.shape))
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


_ACTIVATIONS = threading.local()


def _activation_context() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the `activation_sharding` being traced in; None outside."""
  return getattr(_ACTIVATIONS, "current", None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `constrain` pins activations to `mesh` by `rules`."""
  previous = _activation_context()
  _ACTIVATIONS.current = (mesh, rules)
  try:
    yield
  finally:
    _ACTIVATIONS.current = previous


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """`x` with a sharding constraint from its logical `axes` (one name or None per dim)
  when traced inside `activation_sharding`; `x` unchanged otherwise."""
  current = _activation_context()
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(axes, x.shape,
                                                                            mesh)))


def ways(logical: str) -> int:
  """The devices the logical axis `logical` is split over while a step is traced inside
  `activation_sharding` (at most; a dimension it does not divide stays whole); 1 outside."""
  current = _activation_context()
  if current is None:
    return 1
  mesh, rules = current
  return math.prod(mesh.shape[t] for t in rules.mapping.get(logical, ()) if t in mesh.shape)


def per_device(fn: Callable[..., jax.Array], in_axes: Sequence[Axes]
               ) -> Callable[..., jax.Array]:
  """`fn` run by `jax.shard_map` on each device's shard of its arguments, when traced
  inside `activation_sharding` over several devices; `fn` itself otherwise.

  For kernels the compiler cannot partition (Pallas / Mosaic custom calls): each
  argument is split by its logical `in_axes` under the context's rules (a dimension
  they do not divide stays whole), and `fn` must return an array laid out as its
  first argument, computed from the shards alone.
  """
  def call(*args: jax.Array) -> jax.Array:
    current = _activation_context()
    if current is None or current[0].size == 1:
      return fn(*args)
    mesh, rules = current
    specs = tuple(rules.spec(axes, x.shape, mesh) for axes, x in zip(in_axes, args))
    # Kernels' outputs declare no replication over the mesh (check_vma would refuse them).
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                         check_vma=False)(*args)

  return call


def _check(config: ml_collections.ConfigDict) -> None:
  rest = [axis for axis in MESH_AXES if config.mesh[axis] == -1]
  if len(rest) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {rest}")
  Rules.from_config(config.axis_rules)


_mesh_size = lambda value: "" if value > 0 or value == -1 else "must be > 0 or -1 (the rest)"

SCHEMA = schema.Section("", "The device mesh and how parameters and batches are split "
                        "over it.", {
    "mesh": {
        "data": schema.Key(-1, "devices along the data-parallel axis (-1: the remaining "
                           "devices)", rule=_mesh_size),
        "fsdp": schema.Key(1, "devices the parameters and optimizer state are sharded over",
                           rule=_mesh_size),
        "tensor": schema.Key(1, "devices the heads and hidden units are split over",
                             rule=_mesh_size),
    },
    "axis_rules": schema.Key(DEFAULT_RULES, "(logical axis, mesh axes) of parameters and "
                             "batches"),
}, check=_check)

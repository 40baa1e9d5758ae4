"""Places checkpoint tensors into a parameter tree, reporting what did not fit."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from ftjax import param_groups
from ftjax.errors import WeightsError
from ftjax.hub import safetensors_io

Transform = Callable[[np.ndarray], np.ndarray]
# Renames a checkpoint tensor: returns (ftjax path, transform) or None if unused.
NameMap = Callable[[str], "tuple[str, Transform] | None"]
# (checkpoint-name regex, ftjax path template with \1-style groups, transform)
Rules = Sequence[tuple[str, str, Transform]]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """A linear layer's [out, in] weight as an [in, out] kernel (and back)."""
  return x.T


def conv_kernel(x: np.ndarray) -> np.ndarray:
  """A PyTorch convolution weight [out, in, kh, kw] as a Flax kernel [kh, kw, in, out];
  a tensor of another rank passes unchanged (`load_tensors` reports its shape)."""
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x


def conv_weight(x: np.ndarray) -> np.ndarray:
  """A Flax kernel [kh, kw, in, out] as a PyTorch convolution weight [out, in, kh, kw]."""
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x


def any_conv_kernel(x: np.ndarray) -> np.ndarray:
  """A PyTorch convolution weight as the kernel of the layer ftjax builds for it: a 1x1
  convolution [out, in, 1, 1] is an `nnx.Linear` over the channels ([in, out]), a larger
  one an `nnx.Conv` ([kh, kw, in, out]). A checkpoint whose kernel size differs from the
  model's so gives a tensor of the wrong rank, which `load_tensors` reports."""
  if x.ndim == 4 and x.shape[2:] == (1, 1):
    return x[:, :, 0, 0].T
  return conv_kernel(x)


def any_conv_weight(x: np.ndarray) -> np.ndarray:
  """The PyTorch convolution weight of an `any_conv_kernel` kernel."""
  return x.T[:, :, None, None] if x.ndim == 2 else conv_weight(x)


# What an export applies to write a parameter back under its checkpoint name: the
# inverse of the transform it was loaded with; the others here are their own inverses.
_INVERSES: dict[Transform, Transform] = {conv_kernel: conv_weight,
                                         any_conv_kernel: any_conv_weight}


def inverse(transform: Transform) -> Transform:
  """The transform that undoes `transform` (one of this module's)."""
  return _INVERSES.get(transform, transform)


def batch_norm_rules(prefix: str, path: str) -> list[tuple[str, str, Transform]]:
  """Rules for a PyTorch BatchNorm2d at checkpoint-name regex `prefix` -> the ftjax
  `BatchNorm` at `path` (`num_batches_tracked` has no place: it maps to nothing)."""
  names = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  return [(rf"{prefix}\.{name}", f"{path}/{ours}", identity) for name, ours in names.items()]


def rename(name: str, rules: Rules) -> tuple[str, Transform] | None:
  """The ftjax path and transform of the first rule whose regex fully matches `name`."""
  for pattern, template, transform in rules:
    match = re.fullmatch(pattern, name)
    if match:
      return match.expand(template), transform
  return None


def load_safetensors_into(params: Any, model_dir: str, name_map: NameMap,
                          dont_load: Sequence[str] = ()) -> Any:
  """Returns `params` with the safetensors checkpoint of `model_dir` loaded in."""
  tensors = safetensors_io.load_safetensors(model_dir)
  params, _ = load_tensors(params, tensors, name_map, source=model_dir, dont_load=dont_load)
  return params


@dataclasses.dataclass
class LoadReport:
  """What a checkpoint load did: loaded, kept as initialised, ignored."""

  loaded: list[str]
  missing: list[str]      # parameters the checkpoint lacks, kept as initialised
  unexpected: list[str]   # checkpoint tensors with no parameter

  def summary(self) -> str:
    return (f"loaded {len(self.loaded)} tensors; kept {len(self.missing)} parameters as "
            f"initialised: {self.missing}; ignored {len(self.unexpected)} checkpoint "
            f"tensors: {self.unexpected}")


def load_tensors(params: Any, tensors: dict[str, np.ndarray], name_map: NameMap, *,
                 source: str, dont_load: Sequence[str] = ()) -> tuple[Any, LoadReport]:
  """Returns `params` with every mapped checkpoint tensor in place.

  Args:
    params: the freshly initialised parameter tree (its leaves set shapes and dtypes).
    tensors: flat {checkpoint name: array}.
    name_map: checkpoint name -> (ftjax path, transform), or None for tensors the
      model does not use.
    source: the checkpoint's location, for messages.
    dont_load: regexes of parameters that keep their initial values (e.g. a new head).

  Returns:
    (params, report).

  Raises:
    WeightsError: on a shape mismatch, or a parameter that neither the checkpoint
      nor `dont_load` covers.
  """
  flat = param_groups.flatten(params)
  skipped = set(param_groups.matching(flat, dont_load))
  values, unexpected = {}, []
  for name, array in tensors.items():
    target = name_map(name)
    if target is None or target[0] not in flat:
      unexpected.append(name)
      continue
    path, transform = target
    if path in skipped:
      continue
    value = transform(array)
    expected = tuple(flat[path].shape)
    if tuple(value.shape) != expected:
      raise WeightsError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                         f"parameter {path!r} needs {expected}")
    values[path] = value.astype(flat[path].dtype)
  missing = [p for p in flat if p not in values and p not in skipped]
  if missing:
    raise WeightsError(f"{source}: no checkpoint tensor for parameters {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all); "
                       f"list them in dont_load to train them from scratch")
  report = LoadReport(loaded=sorted(values), missing=sorted(skipped),
                      unexpected=sorted(unexpected))
  logging.info("%s: %s", source, report.summary())
  new = param_groups.map_with_path(lambda p, x: values.get(p, x), params)
  return new, report


def load_every_tensor(params: Any, tensors: dict[str, np.ndarray], name_map: NameMap, *,
                      source: str, dont_load: Sequence[str] = (),
                      unused: str = r"(.*\.)?num_batches_tracked") -> Any:
  """`load_tensors`, also refusing checkpoint tensors that fill no parameter.

  A checkpoint of a deeper network than the model's architecture would otherwise
  load in part, its extra blocks silently dropped.

  Args:
    unused: a regex of checkpoint tensors the model does without (counters).

  Returns:
    The updated parameter tree.

  Raises:
    WeightsError: as `load_tensors`, and for checkpoint tensors that are not `unused`
      and have no parameter, naming them.
  """
  params, report = load_tensors(params, tensors, name_map, source=source, dont_load=dont_load)
  extra = [name for name in report.unexpected if not re.fullmatch(unused, name)]
  if extra:
    raise WeightsError(f"{source}: checkpoint tensors {extra[:10]}"
                       f"{' ...' if len(extra) > 10 else ''} ({len(extra)} in all) have no "
                       "parameter in the model: the checkpoint is not of the model's "
                       "architecture")
  return params

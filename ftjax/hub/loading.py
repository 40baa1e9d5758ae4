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

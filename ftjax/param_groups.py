"""Per-parameter settings as ordered ``(regex, value)`` lists over '/'-joined paths.

One form serves freezing (``None`` = frozen), learning-rate and weight-decay
multipliers and "don't load" lists: the first pattern that fully matches a
parameter's path gives its value, and every parameter must be matched.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax

from ftjax.errors import ConfigError

Rules = Sequence[tuple[str, Any]]


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joins a pytree key path: ('encoder', 'layers', 0, 'kernel') -> 'encoder/layers/0/kernel'."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """Returns ``{path: leaf}`` for every leaf of `tree`, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): leaf for path, leaf in leaves}


def map_with_path(fn, tree: Any) -> Any:
  """`jax.tree.map` where `fn(path_str, leaf)` also receives the '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def first_match(path: str, rules: Rules) -> tuple[bool, Any]:
  """Returns (found, value) of the first rule whose regex fully matches `path`."""
  for pattern, value in rules:
    if re.fullmatch(pattern, path):
      return True, value
  return False, None


def assign(tree: Any, rules: Rules, what: str) -> Any:
  """Maps every leaf of `tree` to the value of its first matching rule.

  Args:
    tree: a parameter pytree.
    rules: ordered (regex, value) pairs.
    what: what the rules configure, for the error message (e.g. 'config.optimizer.wd_mults').

  Returns:
    A pytree of the same structure holding each leaf's value.

  Raises:
    ConfigError: if any parameter matches no rule; lists them and the patterns tried.
  """
  for pattern, _ in rules:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"{what}: invalid regex {pattern!r}: {e}") from None
  uncovered = [p for p in flatten(tree) if not first_match(p, rules)[0]]
  if uncovered:
    shown = ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else "")
    raise ConfigError(f"{what}: {len(uncovered)} parameters match no pattern: {shown}; "
                      f"patterns tried: {[p for p, _ in rules]}")
  return map_with_path(lambda path, _: first_match(path, rules)[1], tree)


def matching(paths: Iterable[str], patterns: Sequence[str]) -> list[str]:
  """Returns the paths that fully match any of `patterns`."""
  return [p for p in paths if any(re.fullmatch(pat, p) for pat in patterns)]


def partition(tree: dict, mask: dict) -> tuple[dict, dict]:
  """Splits a nested-dict tree into (leaves where `mask` is true, the rest).

  Both halves keep the nesting and drop branches left empty, so
  `combine(*partition(tree, mask))` rebuilds `tree`.
  """
  selected, rest = {}, {}
  for key, value in tree.items():
    if isinstance(value, dict):
      a, b = partition(value, mask[key])
      if a:
        selected[key] = a
      if b:
        rest[key] = b
    elif mask[key]:
      selected[key] = value
    else:
      rest[key] = value
  return selected, rest


def combine(a: dict, b: dict) -> dict:
  """Merges two nested-dict trees with disjoint leaves (the inverse of `partition`)."""
  merged = dict(a)
  for key, value in b.items():
    if key not in merged:
      merged[key] = value
    elif isinstance(value, dict) and isinstance(merged[key], dict):
      merged[key] = combine(merged[key], value)
    else:
      raise ValueError(f"leaf {key!r} is in both trees")
  return merged

"""Nested dicts (configs, metrics, run records) as flat {joined keys: leaf} dicts."""

from __future__ import annotations

from typing import Any


def leaves(tree: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
  """Every non-dict value of `tree` under its keys joined by `sep`, after `prefix` if
  given: leaves({"a": {"b": 1}}, "x", "/") == {"x/a/b": 1}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{sep}{key}" if prefix else str(key)
    if isinstance(value, dict):
      flat.update(leaves(value, path, sep))
    else:
      flat[path] = value
  return flat

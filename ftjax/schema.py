"""How a module declares the config keys it reads: `Key`s grouped in a `Section`.

Every config section is declared once, by the module that reads it, as a
`Section`: each key's default, one-line doc, allowed choices and value rule,
plus the section's rules across keys. `ftjax.config` assembles the sections into
the default config that `configs/*.py` start from, checks a whole config
against them, and writes the config reference from them.

This module sits below everything else: it knows nothing of any section.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

from ftjax.errors import ConfigError

# A value rule: the value -> "" when it holds, else what the value must be.
Rule = Callable[[Any], str]


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    default: the value when a config does not set it; its type is the key's type
      (an int is accepted where the default is a float, a list where it is a tuple).
    doc: one line on what the key does.
    choices: the allowed values, when they are few.
    rule: a further rule the value must follow (`positive`, `at_least(0)`, ...).
    free: a dict whose keys are not declared (e.g. a model's architecture fields).
  """

  default: Any
  doc: str
  choices: tuple[Any, ...] = ()
  rule: Rule | None = None
  free: bool = False


Keys = Mapping[str, "Key | Keys"]


@dataclasses.dataclass(frozen=True)
class Section:
  """The keys a module reads under `path` ("" for top-level keys, "data.augment").

  Attributes:
    path: where the keys live in the config.
    doc: what the section configures.
    keys: name -> `Key`, or a nested mapping of them (a sub-section).
    check: rules across keys (and other sections); raises ConfigError.
  """

  path: str
  doc: str
  keys: Keys
  check: Callable[[ml_collections.ConfigDict], None] | None = None


def is_number(value: Any) -> bool:
  """Whether `value` is an int or a float (a bool is neither here)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _noun(value: Any) -> str:
  return "integer" if is_int(value) else "number"


def positive(value: Any) -> str:
  return "" if value > 0 else f"must be a positive {_noun(value)}"


def at_least(low: float) -> Rule:
  rule = lambda value: "" if value >= low else f"must be {_article(value)} >= {low}"
  rule.wording = ("", f" >= {low}")
  return rule


def _article(value: Any) -> str:
  return f"an {_noun(value)}" if is_int(value) else f"a {_noun(value)}"


positive.wording = ("positive ", "")


def in_range(low: float, high: float, *, low_open: bool = False) -> Rule:
  """[low, high], or (low, high] with `low_open`."""
  above = (lambda v: v > low) if low_open else (lambda v: v >= low)
  text = f"must be in {'(' if low_open else '['}{low}, {high}]"
  return lambda value: "" if above(value) and value <= high else text


def type_problem(value: Any, default: Any, rule: Rule | None = None) -> str:
  """What is wrong with the type of `value` for a key whose default is `default` (and
  whose value `rule` words a number, e.g. "a positive integer"); ""."""
  before, after = getattr(rule, "wording", ("", ""))
  if isinstance(default, bool):
    return "" if isinstance(value, bool) else "must be true or false"
  if is_int(default):
    article = "an" if not before else "a"
    return "" if is_int(value) else f"must be {article} {before}integer{after}"
  if isinstance(default, float):
    return "" if is_number(value) else f"must be a {before}number{after}"
  if isinstance(default, str):
    return "" if isinstance(value, str) else "must be a string"
  if isinstance(default, (tuple, list)):
    return "" if isinstance(value, (tuple, list)) else "must be a list or tuple"
  if isinstance(default, Mapping):
    return "" if isinstance(value, (Mapping, ml_collections.ConfigDict)) else "must be a dict"
  return ""


def check_value(path: str, key: Key, value: Any) -> None:
  """Raises ConfigError naming `config.<path>` unless `value` suits `key`."""
  problem = type_problem(value, key.default, key.rule)
  if not problem and key.choices and value not in key.choices:
    problem = f"must be one of {list(key.choices)}"
  if not problem and key.rule is not None:
    problem = key.rule(value)
  if problem:
    raise ConfigError(f"config.{path}={value!r}: {problem}")


def check_choice(value: Any, choices: tuple[Any, ...], key: str) -> None:
  """Raises ConfigError unless `value` is one of `choices` (`key`: its config path)."""
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: must be one of {list(choices)}")

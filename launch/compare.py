r"""Compares runs: `python launch/compare.py DIR [DIR ...] [--metrics=...] [--all_keys]`.

Prints a markdown table with one row per run: its path, the config keys whose
values differ between the runs (every key with --all_keys), the final metrics
and the git commit. A DIR is a run workdir or a folder of them (e.g. a sweep's),
which stands for the runs inside it. An unfinished run shows "running/unfinished"
in its metric columns.
"""

from __future__ import annotations

import sys

from absl import app, flags

from ftjax.errors import FtjaxError
from ftjax.sweeps import results

_METRICS = flags.DEFINE_list(
    "metrics", None, "Final metrics to show, e.g. test/accuracy,validation/macro_f1 "
    f"(default: those of {','.join(results.DEFAULT_COMPARE_METRICS)} that the runs have).")
_ALL_KEYS = flags.DEFINE_bool("all_keys", False, "Show every config key, not only those "
                              "that differ between the runs.")


def _compare(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("give one or more run workdirs or folders of them")
  try:
    print(results.compare_table(argv[1:], _METRICS.value, _ALL_KEYS.value))
  except FtjaxError as e:  # the message says what and where
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(_compare)

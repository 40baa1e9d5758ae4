"""What every absl launcher in launch/ does around its work."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging

from ftjax.errors import FtjaxError


def main(work: Callable[[], None]) -> Callable[[list[str]], None]:
  """An absl `main` that runs `work()` the way every ftjax launcher does.

  Stray positional arguments are a usage error; library INFO logs (e.g.
  checkpointing) are shown only when `-v`/`--verbosity` is given; bad input
  (an `FtjaxError`) ends the program with one line, "error: ...", and exit code 1.
  """

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      work()
    except FtjaxError as e:  # the message says what and where
      sys.exit(f"error: {e}")

  return run

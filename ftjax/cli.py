"""What every absl launcher in launch/ does around its work."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser for launchers with a `--config` file flag: one-line errors for an
  override of a key the config lacks, a config file that cannot be loaded and a config
  file's ConfigError."""
  try:
    rest = flags.FLAGS(argv)
    # ml_collections keeps a config file's loading error until the config is first used.
    getattr(flags.FLAGS["config"].value, "keys", None)
    return rest
  except OSError as e:
    sys.exit(f"FATAL Flags parsing error: --config: {' '.join(str(e.__cause__ or e).split())}")
  except (AttributeError, KeyError) as e:  # raised by the locked ConfigDict
    detail = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
    sys.exit(f"FATAL Flags parsing error: unknown config key in {overrides}: {detail}")
  except flags.Error as e:
    # A ConfigError from the config file's get_config arrives wrapped (twice, with
    # its traceback); the innermost one carries the message.
    message, cause = str(e), e.__context__
    while cause is not None:
      if isinstance(cause, FtjaxError):
        message = str(cause)
      cause = cause.__context__
    sys.exit(f"FATAL Flags parsing error: {message}")


def train_flags(coordinator_address: str, num_processes: int | str, process_id: int | str,
                local_device_ids: str | Sequence[int] | None = None) -> list[str]:
  """The launch/train.py flags that make a process join a run (for launchers).

  Values may be shell expressions (e.g. "$SLURM_PROCID") where a launcher writes
  a script.
  """
  flags = [f"--coordinator_address={coordinator_address}", f"--num_processes={num_processes}",
           f"--process_id={process_id}"]
  if local_device_ids is not None:
    ids = (local_device_ids if isinstance(local_device_ids, str)
           else ",".join(str(i) for i in local_device_ids))
    flags.append(f"--local_device_ids={ids}")
  return flags


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits a launcher's argv into its own arguments and those for launch/train.py.

  `--config.key=value` overrides and everything after a `--` go to train.py.

  Returns:
    (the launcher's argv, the arguments to pass through).
  """
  own, passthrough = [], []
  args = list(argv)
  for i, arg in enumerate(args):
    if arg == "--":
      passthrough.extend(args[i + 1:])
      break
    (passthrough if arg.startswith("--config.") else own).append(arg)
  return own, passthrough


def passthrough_flags_parser(passthrough: list[str]) -> Callable[[list[str]], list[str]]:
  """absl's parser for a launcher of launch/train.py processes: the launcher's own
  flags are parsed, the rest (see `split_passthrough`) is appended to `passthrough`."""

  def parse(argv: list[str]) -> list[str]:
    own, rest = split_passthrough(argv)
    passthrough.extend(rest)
    try:
      return flags.FLAGS(own)
    except flags.Error as e:
      sys.exit(f"FATAL Flags parsing error: {e}")

  return parse

r"""Fine-tunes a model: `python launch/train.py --config=configs/x.py:arg --workdir=DIR`.

Any config value can be overridden with `--config.key=value`
(e.g. `--config.optimizer.lr=1e-4`); an unknown key is an error. Running again
with the same `--workdir` resumes from the latest checkpoint.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ftjax import cli, trainer
from ftjax.errors import FtjaxError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional "
                                          ":arg after the path.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the "
                               "resolved config are written.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a one-line error for an override of a key the config lacks."""
  try:
    return flags.FLAGS(argv)
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


def _train() -> None:
  trainer.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(cli.main(_train), flags_parser=parse_flags)

r"""Fine-tunes a model: `python launch/train.py --config=configs/x.py:arg --workdir=DIR`.

Any config value can be overridden with `--config.key=value`
(e.g. `--config.optimizer.lr=1e-4`); an unknown key is an error. Running again
with the same `--workdir` resumes from the latest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from ftjax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional "
                                          ":arg after the path.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the "
                               "resolved config are written.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  trainer.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

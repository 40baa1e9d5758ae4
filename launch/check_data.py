r"""Checks a run's data before training: `python launch/check_data.py --config=configs/x.py:arg`.

Prepares the data of the config (as `launch/train.py` would) and prints, per
split, the example count, the examples of each class, token lengths under the
model's tokenizer and how many the length limit truncates, exact duplicates and
validation or test examples that also occur in train (language models: what
packing did), then the warnings. A file that cannot be read ends it with one
line naming the file, row and column, and exit code 1. `launch/train.py` runs
the same check first and saves it in the run folder (`data_check.json`).
"""

from absl import app, flags
from ml_collections import config_flags

from ftjax import cli
from ftjax.config import validate
from ftjax.data import check, inputs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional "
                                          ":arg after the path.", lock_config=True)
flags.mark_flags_as_required(["config"])


def _check() -> None:
  config = _CONFIG.value
  validate(config)
  built = inputs.build(config)
  config = inputs.with_class_count(config, built)
  print(check.check(config, built).table(built.class_names))


if __name__ == "__main__":
  app.run(cli.main(_check), flags_parser=cli.parse_flags)

"""Exceptions that name what is wrong and where."""


class FtjaxError(Exception):
  """Base class for errors caused by user input (configs, data, checkpoints)."""


class ConfigError(FtjaxError, ValueError):
  """An unknown, mistyped or inconsistent config key or value."""


class DataError(FtjaxError, ValueError):
  """A malformed data file or row; the message names the file and row."""


class WeightsError(FtjaxError, ValueError):
  """Pretrained weights that are missing, unexpected or of the wrong shape."""


class CheckpointError(FtjaxError, ValueError):
  """A checkpoint that cannot be restored into the current run."""


class TrainingError(FtjaxError):
  """Training cannot go on (e.g. the loss became NaN); the checkpoints are intact."""

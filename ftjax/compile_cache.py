"""The persistent compilation cache: compiled steps kept on disk, read back by later runs.

A run compiles its train and evaluation steps once per bucket length; running the
same config again (a resumed or repeated run, a sweep's trials that differ only in
their seed) compiles the same programs. `enable` points JAX's persistent compilation
cache (`jax_compilation_cache_dir`) at a folder, so those runs read the compiled
programs back instead. JAX keys each entry on the program, its devices, the compile
options and the jax / XLA versions, so a program that differs in anything (another
learning rate baked into the step, another mesh, an upgraded jax) is compiled anew;
reading an entry gives the program the compiler would have produced, so results do not
change. Programs that compile in under a second are not kept (JAX's
`jax_persistent_cache_min_compile_time_secs`). Nothing is evicted: the folder grows
with every new program (each a few MiB for a small model's step) until it is removed,
which is always safe.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.monitoring

DEFAULT_DIR = "~/.cache/ftjax/xla"
# The value that turns the cache off (also an empty one).
OFF = "off"
_HITS = "/jax/compilation_cache/cache_hits"
_WRITES = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


@dataclasses.dataclass
class Usage:
  """What the cache did since `enable`."""

  directory: str
  read: int = 0       # programs read back instead of compiled
  written: int = 0    # programs compiled and written
  saved_s: float = 0.0  # compile seconds the read programs had cost

  def count_event(self, event: str, **_) -> None:
    """A `jax.monitoring` event listener."""
    if event == _HITS:
      self.read += 1
    elif event == _WRITES:
      self.written += 1

  def count_duration(self, event: str, seconds: float, **_) -> None:
    """A `jax.monitoring` duration listener."""
    if event == _SAVED:
      self.saved_s += max(seconds, 0.0)

  def summary(self) -> str:
    """One line for the run's log."""
    return (f"compilation cache {self.directory}: {self.read} compiled program(s) read "
            f"back ({self.saved_s:.1f} s of compiling saved), {self.written} written")


def directory_of(setting: str | None) -> str | None:
  """The cache folder a launcher's setting names: None (unset) is $JAX_COMPILATION_CACHE_DIR
  when that is set, else `DEFAULT_DIR`; "" or "off" turns the cache off (None)."""
  if setting is None:
    setting = os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_DIR)
  setting = setting.strip()
  if setting in ("", OFF):
    return None
  return os.path.abspath(os.path.expanduser(setting))


def disable() -> None:
  """Every program is compiled anew, even with $JAX_COMPILATION_CACHE_DIR set."""
  jax.config.update("jax_enable_compilation_cache", False)


def enable(directory: str) -> Usage:
  """Compiled programs are read from and written to `directory` (created) from now on.

  Returns:
    The cache's usage, counted as JAX reports it.
  """
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  usage = Usage(directory)
  jax.monitoring.register_event_listener(usage.count_event)
  jax.monitoring.register_event_duration_secs_listener(usage.count_duration)
  return usage

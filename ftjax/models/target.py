"""The platform models are built and their steps lowered for.

Some layers pick their computation by platform: the attention kernels
(`ftjax.models.attention`: cuDNN and Pallas on GPU, splash on TPU, interpret mode off
their platform) and depthwise convolutions (`ftjax.models.mobilenet`: shifted slices on
CPU). That is JAX's default backend, except while `compiling_for` names another: the
ahead-of-time check (`launch/aot_check.py`) builds and compiles a run's steps for a TPU
slice from a CPU machine that way.

The platform is read when a model is built and when its steps are traced, and it is not
part of `jax.jit`'s cache key: build and trace a step inside the same `compiling_for`
block, and do not reuse a function traced outside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_TARGET = contextvars.ContextVar("ftjax_target_platform", default=None)


def platform() -> str:
  """"cpu", "gpu" or "tpu": `compiling_for`'s platform, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target: str) -> Iterator[None]:
  """Within it, models are built and their steps traced for `target` devices ("tpu",
  ...) whatever JAX's default backend is."""
  token = _TARGET.set(target)
  try:
    yield
  finally:
    _TARGET.reset(token)

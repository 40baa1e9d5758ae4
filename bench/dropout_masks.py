r"""python bench/dropout_masks.py [--shape 32,12,128,128] [--rate 0.1]

What a dropout mask costs, by how its random bits are drawn: run time of one
jitted inverted dropout of a float32 array of `--shape` (by default MiniLM-L6's
attention probabilities at batch 32, sequence 128: 6.3M elements), and the
compile time of a function with 12 such call sites (on a quarter of the array).

* bernoulli: `jax.random.bernoulli` (a 32-bit draw and a float compare per
  element), as `flax.nnx.Dropout` draws its masks.
* bytes (ftjax): `ftjax.models.dropout`, four elements per 32-bit threefry draw.
* 16-bit: two elements per 32-bit threefry draw, compared as uint16.
* rbg / unsafe_rbg bytes: a byte per element from `jax.random.bits` of a key of
  that implementation (derived from the threefry key).
* philox4x32 bytes: four elements per 32-bit draw of a philox4x32 key (jax >= 0.10).

Times are the median of `--reps` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

# Sets JAX_PLATFORMS and puts the repository on sys.path: imported before JAX.
if __package__:  # python -m bench.dropout_masks
  from . import common  # noqa: F401
else:  # python bench/dropout_masks.py
  import common  # type: ignore[no-redef]  # noqa: F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ftjax.models import dropout as dropout_lib  # noqa: E402


def _packed(bits: int, rate: float, impl: str | None = None):
  """Dropout with `32 // bits` elements per 32-bit draw of a key of `impl` (default: the
  threefry key itself)."""
  dtype = {8: jnp.uint8, 16: jnp.uint16}[bits]
  threshold = round(rate * 2 ** bits)
  keep = 1 - threshold / 2 ** bits

  def drop(key, x):
    if impl:
      words = 4 if "rbg" in impl else 2
      key = jax.random.wrap_key_data(jax.random.bits(key, (words,), jnp.uint32), impl=impl)
    per = 32 // bits
    draws = jax.random.bits(key, (math.ceil(x.size / per),), jnp.uint32)
    small = jax.lax.bitcast_convert_type(draws, dtype).reshape(-1)[:x.size].reshape(x.shape)
    return jnp.where(small >= threshold, x / keep, 0)

  return drop


def variants(rate: float) -> dict:
  def bernoulli(key, x):
    return jnp.where(jax.random.bernoulli(key, 1 - rate, x.shape), x / (1 - rate), 0)

  return {
      "bernoulli": bernoulli,
      "bytes (ftjax)": lambda key, x: dropout_lib.dropout(x, rate, key),
      "16-bit": _packed(16, rate),
      "rbg bytes": _packed(8, rate, "rbg"),
      "unsafe_rbg bytes": _packed(8, rate, "unsafe_rbg"),
      "philox4x32 bytes": _packed(8, rate, "philox4x32"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  parser.add_argument("--shape", default="32,12,128,128")
  parser.add_argument("--rate", type=float, default=0.1)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  shape = tuple(int(d) for d in args.shape.split(","))
  x, key = jnp.ones(shape), jax.random.PRNGKey(0)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, shape {shape}, "
        f"rate {args.rate}")
  print("| masks | run ms | compile s (12 sites) | kept share |\n|---|---|---|---|")
  for name, drop in variants(args.rate).items():
    try:
      many = lambda key, x: sum(drop(jax.random.fold_in(key, i), x[: max(1, shape[0] // 4)])
                                .sum() for i in range(12))
      started = time.perf_counter()
      jax.jit(many).lower(key, x).compile()
      compile_s = time.perf_counter() - started
      run = jax.jit(drop)
      kept = float((run(key, x) > 0).mean())
      times = []
      for _ in range(args.reps):
        started = time.perf_counter()
        run(key, x).block_until_ready()
        times.append(time.perf_counter() - started)
    except Exception as e:  # an implementation this jax or backend lacks
      print(f"| {name} | unavailable: {type(e).__name__} | | |")
      continue
    print(f"| {name} | {1000 * statistics.median(times):.1f} | {compile_s:.2f} | {kept:.4f} |",
          flush=True)


if __name__ == "__main__":
  main()

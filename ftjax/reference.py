"""Reference log-probabilities of preference pairs: computed once, kept in the run folder.

DPO and IPO compare the policy's log-probabilities of a pair's completions with
those of a reference model, the model as training starts: the pretrained
weights (with new LoRA adapters that is the base model, since adapters start
at zero). Before the first step they are computed over every split with the
starting weights the run already holds, so no second copy of the model ever
exists, and written to the run folder (`reference_logps.npz`, with a fingerprint
of each split's tokens and of the model that scored them). A resumed run reads
them back instead of computing them again; a split whose fingerprint no longer
matches (other data, another tokenizer or length, another model or compute
dtype) is computed afresh.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

import numpy as np

from ftjax.data import preference
from ftjax.metrics import log_line

FILE = "reference_logps.npz"


def fingerprint(rows: preference.PairRows, model: str) -> str:
  """A digest of a split's pair rows (the tokens and which of them are completions) and
  of `model`, a description of the reference model (its config section and dtype)."""
  digest = hashlib.sha256(model.encode())
  for key in ("input_ids", "loss_mask"):
    digest.update(np.ascontiguousarray(rows.arrays[key]).tobytes())
  return digest.hexdigest()


def _saved(path: str) -> dict[str, tuple[np.ndarray, str]]:
  """{split: (log-probabilities, fingerprint)} of the run folder's file; {} without one."""
  if not os.path.exists(path):
    return {}
  with np.load(path) as saved:
    splits = [name.removeprefix("logps/") for name in saved.files if name.startswith("logps/")]
    return {split: (saved[f"logps/{split}"], str(saved[f"fingerprint/{split}"]))
            for split in splits}


def attach(splits: dict[str, preference.PairRows],
           compute: Callable[[preference.PairRows], np.ndarray], model: str, workdir: str,
           write: bool) -> dict[str, str]:
  """Fills each split's `ref_logps` from the run folder's file or by `compute`.

  Args:
    splits: the pair rows of each split (training, validation, test, extra sets).
    compute: rows -> [N, 2] reference log-probabilities (the starting weights).
    model: describes the reference model (its config section and compute dtype).
    workdir: the run folder.
    write: whether this process writes the file (process 0).

  Returns:
    {split: "read" or "computed"}.
  """
  path = os.path.join(workdir, FILE)
  saved, done, arrays = _saved(path), {}, {}
  for name, rows in splits.items():
    digest = fingerprint(rows, model)
    if name in saved and saved[name][1] == digest:
      logps, done[name] = saved[name][0], "read"
    else:
      started = time.perf_counter()
      logps, done[name] = compute(rows), "computed"
      log_line(f"reference log-probabilities of {len(rows)} {name} pairs computed in "
               f"{time.perf_counter() - started:.1f} s")
    rows.set_reference(logps)
    arrays[f"logps/{name}"], arrays[f"fingerprint/{name}"] = logps, np.asarray(digest)
  if write and "computed" in done.values():
    with open(path + ".tmp", "wb") as f:  # written whole or not at all
      np.savez(f, **arrays)
    os.replace(path + ".tmp", path)
  if "read" in done.values():
    log_line(f"reference log-probabilities read from {path}")
  return done

"""Orbax checkpoints: the latest states for resuming, and the best parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental.multihost_utils import sync_global_devices

from ftjax import param_groups, schema
from ftjax.errors import CheckpointError

BEST_DIR = "best"  # the best parameters, in the workdir


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of `tree`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _empty_fields(state: Any) -> list[str]:
  """The fields of a dataclass state that hold an empty dict."""
  if not dataclasses.is_dataclass(state):
    return []
  return [f.name for f in dataclasses.fields(state)
          if isinstance(getattr(state, f.name), dict) and not getattr(state, f.name)]


SCHEMA = schema.Section("checkpoint", "How often the training state is saved.", {
    "every": schema.Key(200, "steps between checkpoints (also at the end and on "
                        "preemption)", rule=schema.positive),
    "max_to_keep": schema.Key(2, "checkpoints kept besides the best parameters",
                              rule=schema.positive),
    "use_async": schema.Key(True, "write checkpoints in the background"),
})


class Checkpointer:
  """Two orbax managers in the workdir.

  `checkpoints/` keeps the latest `max_to_keep` full training states plus a JSON
  record of host-side progress (data iterator position, early stopping), which is
  what a resumed run needs to continue exactly. `best/` keeps the trainable
  parameters (and batch statistics) of the best evaluation, restored at the end
  of training.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self._workdir = os.path.abspath(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_to_keep, create=True,
        enable_async_checkpointing=config.use_async)
    self._latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options)
    best_options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=config.use_async)
    self._best = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), BEST_DIR),
                                       options=best_options)

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """Turns a failed write (a full disk, a lost mount) into a CheckpointError.

    orbax reports an asynchronous save that failed at the next save or wait; the
    error names the checkpoint's temporary folder. A checkpoint is renamed into
    place only once it is complete, so the ones written before are kept.
    """
    try:
      yield
    except OSError as e:
      kept = sorted(self._latest.all_steps(read=True))
      raise CheckpointError(f"cannot write a checkpoint in {self._workdir}: {e}; the "
                            f"checkpoints written before (steps {kept}) are intact") from e

  def save(self, step: int, state: Any, progress: dict[str, Any]) -> None:
    """Saves the training state and host-side progress at `step` (asynchronously).

    Raises:
      CheckpointError: when this save, or an earlier asynchronous one, cannot be
        written.
    """
    with self._writing():
      self._latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)

  def latest_step(self) -> int | None:
    """The step of the newest training-state checkpoint; None without one."""
    return self._latest.latest_step()

  def restore_latest(self, state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint into the structure and shardings of `state`.

    A checkpoint that cannot be read (truncated or half-written files) is reported
    and skipped for the one before it; when none can be restored, the error of
    the newest says why (for a checkpoint of another model or config, which
    parameters do not match).

    Returns:
      (state, progress), or None when the workdir has no checkpoint yet.

    Raises:
      CheckpointError: checkpoints exist but none can be restored into `state`.
    """
    steps = sorted(self._latest.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      path = os.path.join(str(self._latest.directory), str(step))
      try:
        restored = self._restore_step(step, state)
      except Exception as e:  # pylint: disable=broad-except
        # orbax and tensorstore raise many types for unreadable files
        errors.append(f"checkpoint {path} cannot be restored into this run's state: "
                      f"{' '.join(str(e).split())[:2000]}")
        logging.warning("%s", errors[-1])
        if jax.process_index() == 0:
          print(f"warning: {errors[-1]}; trying the one before it", flush=True)
        continue
      logging.info("restored checkpoint %s", path)
      if errors:  # newer ones are unreadable, not of another model: this one is
        self._set_aside([s for s in steps if s > step])
      return restored
    raise CheckpointError(errors[0] + (f" (and {len(errors) - 1} older checkpoint(s) could "
                                       "not be restored either)" if len(errors) > 1 else ""))

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints to `<workdir>/unreadable_checkpoints/` (kept for a
    look, out of the way of the steps that will be saved again)."""
    aside = os.path.join(self._workdir, "unreadable_checkpoints")
    sync_global_devices("ftjax_set_aside_restored")
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        os.replace(os.path.join(str(self._latest.directory), str(step)), target)
        print(f"warning: moved unreadable checkpoint of step {step} to {target}", flush=True)
    sync_global_devices("ftjax_set_aside_moved")
    self._latest.reload()

  def _restore_step(self, step: int, state: Any) -> tuple[Any, dict[str, Any]]:
    restore = lambda target: self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), progress=ocp.args.JsonRestore()))
    try:
      restored = restore(state)
      return restored.state, restored.progress
    except ValueError as error:
      # Written before a state field that is empty here existed (e.g. the anchor
      # of regularized runs): restore the other fields.
      return self._restore_without_empty_field(restore, state, error)

  @staticmethod
  def _restore_without_empty_field(restore: Any, state: Any, error: ValueError
                                   ) -> tuple[Any, dict[str, Any]]:
    """Restores `state` less one of its empty fields, the first that the checkpoint
    lacks; raises `error` when there is none."""
    for name in _empty_fields(state):
      others = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if f.name != name}
      try:
        restored = restore(others)
      except ValueError:
        continue
      return state.replace(**restored.state), restored.progress
    raise error

  def save_best(self, step: int, params: Any, stats: Any = None) -> None:
    """Saves the best parameters with the model's batch statistics, as one tree."""
    with self._writing():
      self._best.save(step, args=ocp.args.StandardSave(param_groups.combine(params, stats or {})),
                      force=True)

  def drop_best_after(self, step: int) -> list[int]:
    """Deletes best-parameter checkpoints saved after `step`: when a run resumes from
    `step`, those belong to steps it will train again. Returns the deleted steps."""
    dropped = [s for s in self._best.all_steps() if s > step]
    for s in dropped:
      self._best.delete(s)
    return dropped

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def restore_best(self, params: Any, stats: Any = None) -> tuple[Any, Any]:
    """Restores the best parameters and batch statistics into the structure and
    shardings of `params` and `stats`.

    Returns:
      (params, stats).
    """
    step = self._best.latest_step()
    if step is None:
      raise CheckpointError(f"no best checkpoint in {self._best.directory}")
    path = os.path.join(str(self._best.directory), str(step))
    stats = stats or {}
    try:
      restored = self._best.restore(step, args=ocp.args.StandardRestore(
          _abstract(param_groups.combine(params, stats))))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore the best parameters {path} into this run's "
                            f"trainable parameters: {e}") from e
    stat_paths = set(param_groups.flatten(stats))
    return param_groups.partition(
        restored, param_groups.map_with_path(lambda p, _: p not in stat_paths, restored))

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written.

    Raises:
      CheckpointError: when one of them could not be written.
    """
    with self._writing():
      self._latest.wait_until_finished()
      self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()

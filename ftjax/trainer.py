"""The fine-tuning loop: `run(config, workdir)`, built from small named helpers."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from ftjax import (build, checkpoint, data, generate, param_groups, periodic, preemption,
                   regularizers, run_setup, runs, sharding, tracking)
from ftjax import trackers as trackers_lib
from ftjax.config import validate
from ftjax.data import check as data_check
from ftjax.data import inputs as inputs_lib
from ftjax.data import registry
from ftjax.early_stopping import EarlyStopping
from ftjax.errors import ConfigError
from ftjax.metrics import MetricWriter, Progress, log_line


def _put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into one global array (explicit transfer)."""
  with jax.transfer_guard_host_to_device("allow"):  # several processes: a batched device_put
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _parameter_summary(base: Any, trainable: Any, frozen: Any, opt_state: Any) -> str:
  """Trainable share, parameter memory (vs the unadapted float32 model) and optimizer memory."""
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  return (f"parameters: {count(trainable):,} trainable, {count(base):,} in the base model; "
          f"parameter memory {mib(sharding.tree_bytes((trainable, frozen)))} (float32 base "
          f"{mib(4 * count(base))}); optimizer state {mib(sharding.tree_bytes(opt_state))}")


def _check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; raises ConfigError unless it is a writable folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir}: not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"workdir {workdir}: cannot create it: {e.strerror or e}") from e
  if not os.access(workdir, os.W_OK):
    raise ConfigError(f"workdir {workdir}: not writable")


def _write_config(run: _Run) -> None:
  """The resolved config, the data check and, for classification, the class names in
  label order."""
  if run.process != 0:
    return
  with open(os.path.join(run.workdir, "config.json"), "w") as f:
    f.write(run.config.to_json(indent=2, sort_keys=True))
  if run.inputs.class_names:
    with open(os.path.join(run.workdir, runs.LABELS_FILE), "w") as f:
      json.dump({"names": list(run.inputs.class_names)}, f, indent=2)
  if run.data_check is not None:
    with open(os.path.join(run.workdir, data_check.CHECK_FILE), "w") as f:
      json.dump(run.data_check.to_dict(), f, indent=2)


class _Run:
  """Everything a run builds once: mesh, data, sharded state, compiled steps, writers."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               devices: Sequence[jax.Device] | None = None):
    self.config = config
    self.workdir = workdir
    self.placement = placement = run_setup.place(config, devices)
    self.mesh, self.rules = placement.mesh, placement.rules
    self.batch_sharding = placement.batch_sharding
    self.process = jax.process_index()
    self.data_shard = placement.data_shard(config.batch_size)
    self._build_data()
    # The data may say how many classes there are (config.model.num_classes=0).
    self.config = config = inputs_lib.with_class_count(config, self.inputs)
    self.data_check = self._check_data()
    self.setup = run_setup.set_up(config, placement, self.inputs.batch_spec,
                                  self.inputs.task_classes, self.total_steps)
    self.task, self.built = self.setup.task, self.setup.built
    self.model, self.state, self.frozen = self.built.model, self.built.state, self.built.frozen
    self._log_state()
    self.trackers = trackers_lib.Trackers(config, workdir, enabled=self.process == 0)
    self.writer = MetricWriter(workdir, enabled=self.process == 0,
                               tensorboard="tensorboard" in config.trackers,
                               trackers=self.trackers)
    self.checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint)
    self._compile()
    self.sample_prompts = []
    self.test_at_start: dict[str, float] | None = None  # with init_from / test_at_start
    self.clock: tracking.RunClock | None = None  # once the start is recorded
    if self.task.name == "causal_lm" and config.samples.count > 0:
      self.sample_prompts = inputs_lib.sample_prompts(
          self.inputs, "validation", config.samples.count, config.samples.prompt_tokens)

  def _log_state(self) -> None:
    """The parameter counts and each device's share of the state."""
    built = self.built
    log_line(_parameter_summary(built.base, self.state.params, self.frozen,
                                self.state.opt_state))
    mib = lambda tree: f"{sharding.local_bytes(tree) / 2**20:.1f} MiB"
    log_line(f"mesh {dict(self.mesh.shape)}: per device {mib(self.state.params)} trainable + "
             f"{mib(self.frozen)} frozen parameters, {mib(self.state.opt_state)} optimizer "
             "state")

  def _build_data(self) -> None:
    config = self.config
    self.inputs = inputs_lib.build(config)
    self.splits, self.preprocess = self.inputs.splits, self.inputs.preprocess
    # What evaluations read: the run's splits, and each extra data set's validation split.
    self.eval_sets = {split: (self.splits[split], self.preprocess)
                      for split in ("validation", "test")}
    for name, extra in inputs_lib.build_extra_evals(config, self.inputs).items():
      self.eval_sets[name] = (extra.splits["validation"], extra.preprocess)
    self.host_batch = config.batch_size // self.data_shard[1]
    self.steps_per_epoch = len(self.splits["train"]) // config.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f"train split of {len(self.splits['train'])} examples is smaller than "
                       f"config.batch_size={config.batch_size}")
    self.total_steps = (config.total_steps if config.total_steps > 0
                        else config.num_epochs * self.steps_per_epoch)

  def _check_data(self) -> data_check.Report | None:
    """The data check (process 0, at a run's first start: a resumed run was checked)."""
    if self.process != 0 or os.path.exists(os.path.join(self.workdir, data_check.CHECK_FILE)):
      return None
    report = data_check.check(self.config, self.inputs)
    log_line(report.table(self.inputs.class_names))
    return report

  @property
  def extra_evals(self) -> list[str]:
    """The names of the extra evaluation sets (`config.data.extra_eval`)."""
    return [name for name in self.eval_sets if name not in ("validation", "test")]

  def train_iterator(self):
    return data.train_iterator(
        self.splits["train"], self.preprocess, batch_size=self.host_batch,
        seed=self.config.seed, num_epochs=None, shard_index=self.data_shard[0],
        shard_count=self.data_shard[1], augment=self.inputs.augment)

  def eval_batches(self, split: str | Sequence[Any]) -> Iterator[dict[str, np.ndarray]]:
    """Batches of an evaluation set (by name: a split or an extra data set) or of any
    source of the run's data, each example once, padded."""
    source, preprocess = (self.eval_sets[split] if isinstance(split, str)
                          else (split, self.preprocess))
    return data.eval_batches(
        source, preprocess, batch_size=self.config.eval_batch_size // self.data_shard[1],
        shard_index=self.data_shard[0], shard_count=self.data_shard[1])

  def _compile(self) -> None:
    """Compiles the train and eval steps once, ahead of time, with explicit shardings
    (after checking that the evaluation reports the early-stopping metric)."""
    setup = self.setup
    evaluate = setup.evaluate.lower(self.state.params, self.state.stats, self.frozen,
                                    setup.batch(self.config.eval_batch_size))
    self._check_early_stopping_metric(evaluate.out_info)
    self.train_step = setup.train.lower(self.state, self.frozen,
                                        setup.batch(self.config.batch_size)).compile()
    self.eval_step = evaluate.compile()

  def _check_early_stopping_metric(self, sums: Any) -> None:
    """Raises ConfigError unless the early-stopping metric is one of the metrics that the
    evaluation's `sums` (their shapes) summarize to."""
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), sums)
    names = sorted(self.task.summarize(zeros))
    metric = self.config.early_stopping.metric
    if metric not in names:
      raise ConfigError(f"config.early_stopping.metric={metric!r}: not an evaluation metric; "
                        f"choose from {names}")

  def evaluate(self, weights: tuple[Any, Any], split: str) -> dict[str, float]:
    """The task's metrics over every example of `split`, each counted once.

    Args:
      weights: (trainable parameters, batch statistics).
      split: "validation", "test" or an extra evaluation set's name.
    """
    sums = None
    for batch in self.eval_batches(split):
      out = self.eval_step(*weights, self.frozen, _put_batch(batch, self.batch_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    return self.task.summarize(sums)


def _fisher_weights(run: _Run) -> Any:
  """EWC's weights: the Fisher information of the starting weights on `fisher_task`."""
  regularizer = run.config.regularizer
  sources = run.inputs.task_train or {
      registry.data_set_name(run.config.data.name): run.splits["train"]}
  task = regularizers.fisher_task(run.config)
  examples = data.Head(sources[task], regularizer.fisher_examples)
  fisher_step = run.setup.fisher_step()
  batches = (_put_batch(batch, run.batch_sharding) for batch in run.eval_batches(examples))
  started = time.perf_counter()
  weights = regularizers.fisher_weights(fisher_step, run.state.params, run.state.stats,
                                        run.frozen, batches)
  log_line(f"EWC: Fisher information of {len(examples)} {task} examples "
           f"in {time.perf_counter() - started:.1f} s")
  return weights


def _test_at_start(run: _Run) -> dict[str, float]:
  """Test metrics of the starting weights (kept in every checkpoint's progress record)."""
  metrics = run.evaluate((run.state.params, run.state.stats), "test")
  log_line("test at start: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  return metrics


def _progress_record(run: _Run, iterator, stopper: EarlyStopping) -> dict[str, Any]:
  return {"data_iterator": iterator.get_state(), "early_stopping": stopper.to_dict(),
          "test_at_start": run.test_at_start}


def _resume(run: _Run, iterator, stopper: EarlyStopping) -> EarlyStopping:
  """Continues from the workdir's latest checkpoint, if any."""
  restored = run.checkpointer.restore_latest(run.state)
  if restored is None:  # (again) from the start: drop records of a start killed earlier
    run.writer.truncate_after(-1)
    return stopper
  run.state, progress = restored
  iterator.set_state(progress["data_iterator"])
  run.test_at_start = progress.get("test_at_start")
  step = int(jax.device_get(run.state.step))
  run.writer.truncate_after(step)
  run.checkpointer.drop_best_after(step)
  log_line(f"resumed from step {step} in {run.workdir}")
  return EarlyStopping.from_dict(progress["early_stopping"])


def _write_samples(run: _Run, step: int) -> None:
  """Continues the validation prompts with the current parameters (greedy) and logs them."""
  config, tokenizer = run.config, run.inputs.tokenizer
  with jax.transfer_guard("allow"):  # prompts go to the device; tokens come back
    completions = generate.generate(
        run.model, param_groups.combine(run.state.params, run.frozen), run.sample_prompts,
        max_new_tokens=config.samples.max_new_tokens, stop_tokens=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id or 0, compute_dtype=build.DTYPES[config.compute_dtype])
  samples = [{"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(completion)}
             for prompt, completion in zip(run.sample_prompts, completions)]
  run.writer.write_samples(step, samples)
  log_line(f"sample at step {step}: {samples[0]['completion']!r}")


def _validate(run: _Run, step: int, stopper: EarlyStopping) -> None:
  """Evaluates on validation, saves the best parameters and updates early stopping."""
  weights = (run.state.params, run.state.stats)
  metrics = run.evaluate(weights, "validation")
  run.writer.write(step, "validation", metrics)
  for name in run.extra_evals:  # watched, not what early stopping follows
    extra = run.evaluate(weights, name)
    run.writer.write(step, name, extra)
    log_line(f"{name} step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in extra.items()))
  if stopper.update(step, metrics):
    run.checkpointer.save_best(step, run.state.params, run.state.stats)
  log_line(f"validation step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
           + f" (best {stopper.metric}={stopper.best} at step {stopper.best_step})")
  if run.sample_prompts:
    _write_samples(run, step)


def _train(run: _Run, iterator, stopper: EarlyStopping,
           on_step: Callable[[int], None] | None) -> EarlyStopping:
  config = run.config
  start = int(jax.device_get(run.state.step))
  progress = Progress(run.total_steps, config.batch_size, start)
  if start == 0 and config.eval_at_start:
    _validate(run, 0, stopper)  # the pretrained model: the baseline fine-tuning must beat
  guard = periodic.NonFiniteGuard(config)
  cadence = periodic.Cadence.from_config(config, run.total_steps, run.steps_per_epoch)
  with jax.transfer_guard("disallow"):
    for step in range(start + 1, run.total_steps + 1):
      if stopper.stop:
        break
      batch = _put_batch(next(iterator), run.batch_sharding)
      run.state, metrics = run.train_step(run.state, run.frozen, batch)
      guard.check(step, metrics["nonfinite"], run.checkpointer)
      if cadence.logs(step):
        metrics = jax.device_get(metrics)
        run.writer.write(step, "train", metrics)
        run.clock.update()
        log_line(progress.line(step, metrics))
      if cadence.validates(step):
        _validate(run, step, stopper)
        if stopper.stop:
          log_line(f"early stopping at step {step}: no {stopper.metric} improvement "
                   f"> {stopper.min_delta} in {stopper.patience} evaluations")
      if cadence.checkpoints(step) or stopper.stop:
        run.checkpointer.save(step, run.state, _progress_record(run, iterator, stopper))
      if on_step is not None:
        on_step(step)
      if preemption.requested():
        guard.finish(run.checkpointer)
        _preempted(run, iterator, stopper, step)
    guard.finish(run.checkpointer)
  return stopper


def _preempted(run: _Run, iterator, stopper: EarlyStopping, step: int) -> None:
  """Checkpoints the state after `step` (unless just done) and raises `Preempted`."""
  if run.checkpointer.latest_step() != step:
    run.checkpointer.save(step, run.state, _progress_record(run, iterator, stopper))
  run.checkpointer.wait()
  log_line(f"preempted: checkpoint of step {step} written to {run.workdir}; start the same "
           "command again to resume")
  raise preemption.Preempted(step)


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Callable[[int], None] | None = None,
        devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Fine-tunes, evaluates, stops early, and tests the best parameters.

  A run started again in the same `workdir` resumes from its latest checkpoint
  (state, data position, early-stopping record) and ends with exactly the
  parameters of an uninterrupted run.

  Args:
    config: a run config (see configs/).
    workdir: where the resolved config, checkpoints and metrics go.
    on_step: optional callback after each train step (used by tests).
    devices: the devices of the mesh (`config.mesh`); by default every device of
      every process.

  Returns:
    The final metrics: best validation metrics and test metrics of the best parameters.
  """
  validate(config)
  _check_workdir(workdir)
  started = time.perf_counter()
  run_ = _Run(config, workdir, devices)
  log_line(f"{run_.total_steps} steps ({run_.steps_per_epoch} per epoch), batch "
           f"{config.batch_size}, {run_.mesh.size} device(s), {jax.process_count()} "
           "process(es)")
  try:
    with preemption.handling():
      return _train_and_test(run_, on_step, started)
  finally:  # also on errors: pending checkpoint writes complete, files are closed
    run_.trackers.close()
    run_.writer.close()
    run_.checkpointer.close()


def _forgetting(run_: _Run, at_start: dict[str, float], test: dict[str, float]
                ) -> dict[str, float]:
  """Test accuracy lost on each task (data set) since the start of the run."""
  names = [name for name, _ in run_.inputs.task_classes]
  if not names:
    return {registry.data_set_name(run_.config.data.name):
            at_start["accuracy"] - test["accuracy"]}
  return {name: at_start[f"{name}/accuracy"] - test[f"{name}/accuracy"] for name in names}


def _train_and_test(run_: _Run, on_step: Callable[[int], None] | None,
                    started: float) -> dict[str, Any]:
  config, workdir = run_.config, run_.workdir
  iterator = run_.train_iterator()
  stopper = _resume(run_, iterator, EarlyStopping.from_config(config.early_stopping))
  # Only now that the config has proven to fit the workdir's checkpoints, if any.
  _write_config(run_)
  run_.clock = tracking.record_start(workdir, config.seed, started)
  run_.trackers.start()
  fresh = int(jax.device_get(run_.state.step)) == 0
  if fresh and regularizers.kind(config) == "ewc":  # resumed runs restore theirs
    run_.state = run_.state.replace(anchor={"center": run_.state.anchor["center"],
                                            "weight": _fisher_weights(run_)})
  if (config.test_at_start or config.init_from) and fresh:
    run_.test_at_start = _test_at_start(run_)
  at_start = run_.test_at_start
  stopper = _train(run_, iterator, stopper, on_step)
  run_.checkpointer.wait()
  best = run_.checkpointer.restore_best(run_.state.params, run_.state.stats)
  final = {
      "best_step": stopper.best_step,
      "stopped_early": stopper.stop,
      # The best evaluation's metrics are those of the restored best parameters.
      "validation": stopper.best_metrics or run_.evaluate(best, "validation"),
      "test": run_.evaluate(best, "test"),
      "train_seconds": run_.clock.update(),  # every start's share, killed ones included
  }
  if run_.extra_evals:  # the extra sets' validation metrics of the best parameters
    final["extra_eval"] = {name: run_.evaluate(best, name) for name in run_.extra_evals}
  if at_start is not None:
    final["test_at_start"] = at_start
    final["forgetting"] = _forgetting(run_, at_start, final["test"])
  step = int(jax.device_get(run_.state.step))
  run_.writer.write(step, "test", final["test"])
  if run_.process == 0:  # written whole or not at all: it marks the run finished
    path = os.path.join(workdir, "final_metrics.json")
    with open(path + ".tmp", "w") as f:
      json.dump(final, f, indent=2)
    os.replace(path + ".tmp", path)
  run_.trackers.finish(final, os.path.join(workdir, checkpoint.BEST_DIR))
  metric = config.early_stopping.metric
  log_line(f"best step {final['best_step']}: validation {metric} "
           f"{final['validation'][metric]:.4f}, " + ", ".join(
               f"test {k} {v:.4f}" for k, v in final["test"].items()
               if k not in ("count", "tokens")))
  return final

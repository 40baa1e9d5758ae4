"""The fine-tuning loop: `run(config, workdir)`.

A run is built once (`_Run`: placement, `_RunData`, the model and state from
`ftjax.run_setup`, the compiled steps, the writers); the loop (`_train`) holds
the training state and calls small named pieces: `periodic.Cadence` (when),
`_Validation` (evaluation, best checkpoint, early stopping, `_Samples`),
`_Checkpoints` (state with the run's progress, preemption) and
`periodic.NonFiniteGuard`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from ftjax import (build, checkpoint, data, generate, models, param_groups, periodic,
                   preemption, reference, regularizers, run_setup, runs, sharding, tracking)
from ftjax import trackers as trackers_lib
from ftjax.config import validate
from ftjax.data import buckets, packing
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
  if run.data.inputs.class_names:
    with open(os.path.join(run.workdir, runs.LABELS_FILE), "w") as f:
      json.dump({"names": list(run.data.inputs.class_names)}, f, indent=2)
  if run.data_check is not None:
    with open(os.path.join(run.workdir, data_check.CHECK_FILE), "w") as f:
      json.dump(run.data_check.to_dict(), f, indent=2)


class _RunData:
  """A run's data: this process's share of the training stream and the evaluation sets
  (the validation and test splits, and each extra data set's validation split)."""

  def __init__(self, config: ml_collections.ConfigDict, placement: run_setup.Placement):
    data_shard = placement.data_shard(config.batch_size)
    self.inputs = inputs_lib.build(config)
    self.seed, self.data_shard = config.seed, data_shard
    self.train = self.inputs.splits["train"]
    self.eval_sets = {split: (self.inputs.splits[split], self.inputs.preprocess)
                      for split in ("validation", "test")}
    for name, extra in inputs_lib.build_extra_evals(config, self.inputs).items():
      self.eval_sets[name] = (extra.splits["validation"], extra.preprocess)
    self.host_batch = config.batch_size // data_shard[1]
    self.host_eval_batch = config.eval_batch_size // data_shard[1]
    self.steps_per_epoch = len(self.train) // config.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f"train split of {len(self.train)} examples is smaller than "
                        f"config.batch_size={config.batch_size}")
    self.total_steps = (config.total_steps if config.total_steps > 0
                        else config.num_epochs * self.steps_per_epoch)
    self.packed = run_setup.packs(config, self.inputs.kind)
    # How batches are laid out on the way to the devices: packed (training and
    # evaluation, when the run packs) or one example per row, cut to its bucket.
    bucketing = buckets.Bucketing(buckets.lengths(config.data.buckets, config.data.max_length))
    self.layouts = {"train": bucketing, "eval": bucketing, "examples": bucketing}
    if self.packed:
      local_shards = sharding.batch_parallelism(placement.mesh, placement.rules) // data_shard[1]
      lengths = self._sample_lengths()
      fewest = lambda size: packing.fewest_rows(lengths, size, config.data.max_length)
      self.layouts["train"] = packing.Packing(
          self.host_batch, local_shards * config.grad_accum_steps, fewest(self.host_batch))
      self.layouts["eval"] = packing.Packing(self.host_eval_batch, local_shards,
                                             fewest(self.host_eval_batch))
      log_line(f"packed batches (data.packing={config.data.packing}): texts end to end in "
               f"rows of {config.data.max_length} tokens; rows per training batch "
               f"{', '.join(map(str, self.layouts['train'].row_counts))} (per process)")

  def _sample_lengths(self, count: int = 1024) -> np.ndarray:
    """The token counts of `count` training texts spread evenly over the split (the same
    on every process)."""
    indices = np.linspace(0, len(self.train) - 1, min(count, len(self.train))).astype(int)
    batch = self.inputs.preprocess(data.stack_examples(
        data.read_examples(self.train, [int(i) for i in indices])))
    return packing.text_lengths(batch)

  @property
  def extra_evals(self) -> list[str]:
    """The names of the extra evaluation sets (`config.data.extra_eval`)."""
    return [name for name in self.eval_sets if name not in ("validation", "test")]

  def train_iterator(self):
    """The training batches of this process, shuffled each epoch, with a resumable state."""
    return data.train_iterator(
        self.train, self.inputs.preprocess, batch_size=self.host_batch, seed=self.seed,
        num_epochs=None, shard_index=self.data_shard[0], shard_count=self.data_shard[1],
        augment=self.inputs.augment)

  @property
  def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """What the steps' batches hold (`ftjax.data.registry.batch_spec`), packed or not."""
    spec = self.inputs.batch_spec
    return packing.batch_spec(spec) if self.packed else spec

  def put(self, batch: dict[str, np.ndarray], batch_sharding: NamedSharding,
          layout: str = "eval") -> dict[str, jax.Array]:
    """This process's rows of a global batch on the devices, laid out for the `layout`
    ("train", "eval" or "examples": one example per row) steps."""
    return _put_batch(self.layouts[layout](batch), batch_sharding)

  def eval_batches(self, split: str | Sequence[Any]) -> Iterator[dict[str, np.ndarray]]:
    """Batches of an evaluation set (by name) or of any source of the run's data, each
    example once, padded."""
    source, preprocess = (self.eval_sets[split] if isinstance(split, str)
                          else (split, self.inputs.preprocess))
    return data.eval_batches(source, preprocess, batch_size=self.host_eval_batch,
                             shard_index=self.data_shard[0], shard_count=self.data_shard[1])


class _PerBucket:
  """A jitted step compiled once per shape of its batches' token arrays: each bucket
  length (`ftjax.data.buckets`) or row count of packed batches (`ftjax.data.packing`),
  on its first batch. The largest shape (the worst case) is lowered at once, for the
  outputs' shapes, and compiled at once unless the batches are packed (their largest row
  count, a row per example, hardly ever occurs)."""

  def __init__(self, lower: Callable[[dict[str, jax.ShapeDtypeStruct]], Any],
               abstract_batch: Callable[[tuple[int, int] | None],
                                        dict[str, jax.ShapeDtypeStruct]],
               packed: bool):
    self._lower, self._abstract_batch = lower, abstract_batch
    largest = abstract_batch(None)
    self.lowered = lower(largest)
    self._compiled = {} if packed else {buckets.batch_shape(largest): self.lowered.compile()}

  def __call__(self, *args: Any) -> Any:
    """The step on `args`, whose last is the batch."""
    shape = buckets.batch_shape(args[-1])
    step = self._compiled.get(shape)
    if step is None:
      step = self._compiled[shape] = self._lower(self._abstract_batch(shape)).compile()
    return step(*args)


class _Evaluator:
  """The compiled evaluation over a whole evaluation set: `evaluator(weights, split)`."""

  def __init__(self, run_data: _RunData, setup: run_setup.Setup, eval_batch_size: int):
    self.data, self.task, self.frozen = run_data, setup.task, setup.built.frozen
    self.batch_sharding = setup.placement.batch_sharding
    params, stats = setup.built.state.params, setup.built.state.stats
    self.step = _PerBucket(lambda batch: setup.evaluate.lower(params, stats, self.frozen, batch),
                           functools.partial(setup.batch_of_shape, eval_batch_size),
                           run_data.packed)
    self.metric_names = sorted(self.task.summarize(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.step.lowered.out_info)))

  def __call__(self, weights: tuple[Any, Any], split: str) -> dict[str, float]:
    """The task's metrics over every example of `split`, each counted once.

    Args:
      weights: (trainable parameters, batch statistics).
      split: "validation", "test" or an extra evaluation set's name.
    """
    sums = None
    for batch in self.data.eval_batches(split):
      out = self.step(*weights, self.frozen, self.data.put(batch, self.batch_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return self.task.summarize(jax.device_get(sums))


class _Run:
  """What a run builds once: placement, data, model and state, compiled steps, writers.

  The training state itself lives in the loop (`_train`); nothing here changes after
  construction.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               devices: Sequence[jax.Device] | None = None):
    self.workdir = workdir
    self.process = jax.process_index()
    placement = run_setup.place(config, devices)
    self.mesh, self.batch_sharding = placement.mesh, placement.batch_sharding
    self.data = _RunData(config, placement)
    # The data may say how many classes there are (config.model.num_classes=0).
    self.config = config = inputs_lib.with_class_count(config, self.data.inputs)
    self.data_check = self._check_data()
    self.setup = run_setup.set_up(config, placement, self.data.batch_spec,
                                  self.data.inputs.task_classes, self.data.total_steps)
    self.task, self.built = self.setup.task, self.setup.built
    self._log_state()
    self.trackers = trackers_lib.Trackers(config, workdir, enabled=self.process == 0)
    self.writer = MetricWriter(workdir, enabled=self.process == 0,
                               tensorboard="tensorboard" in config.trackers,
                               trackers=self.trackers)
    self.checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint)
    # Compiled once, ahead of time, with explicit shardings; the early-stopping metric
    # is checked against what the evaluation reports before the train step compiles.
    self.evaluate = _Evaluator(self.data, self.setup, config.eval_batch_size)
    metric = config.early_stopping.metric
    if metric not in self.evaluate.metric_names:
      raise ConfigError(f"config.early_stopping.metric={metric!r}: not an evaluation metric; "
                        f"choose from {self.evaluate.metric_names}")
    self.train_step = _PerBucket(
        lambda batch: self.setup.train.lower(self.built.state, self.built.frozen, batch),
        functools.partial(self.setup.batch_of_shape, config.batch_size), self.data.packed)
    if self.task.reference is not None:
      self._attach_reference(config.eval_batch_size)

  def _attach_reference(self, eval_batch_size: int) -> None:
    """Each split's reference log-probabilities (`ftjax.reference`), from the starting
    weights; before any batch is read. The reference step compiles only when a split is
    not in the run folder's file (a resumed run reads them all)."""
    weights = (self.built.state.params, self.built.state.stats, self.built.frozen)

    @functools.cache
    def step() -> _PerBucket:
      jitted = self.setup.reference_step()
      return _PerBucket(lambda batch: jitted.lower(*weights, batch),
                        functools.partial(self.setup.batch_of_shape, eval_batch_size),
                        packed=False)

    def compute(rows):
      logps = np.zeros((len(rows), 2), np.float32)
      for batch in self.data.eval_batches(rows):
        out, index, mask = jax.device_get(step()(*weights, self.data.put(
            batch, self.batch_sharding, "examples")))
        logps[index[mask]] = out[mask]
      return logps

    splits = {"train": self.data.train, **{name: source for name, (source, _) in
                                           self.data.eval_sets.items()}}
    model = json.dumps({"model": self.config.model.to_dict(),
                        "compute_dtype": self.config.compute_dtype}, sort_keys=True)
    reference.attach(splits, compute, model, self.workdir, write=self.process == 0)

  def _log_state(self) -> None:
    """The parameter counts and each device's share of the state."""
    state, frozen = self.built.state, self.built.frozen
    log_line(_parameter_summary(self.built.base, state.params, frozen, state.opt_state))
    mib = lambda tree: f"{sharding.local_bytes(tree) / 2**20:.1f} MiB"
    log_line(f"mesh {dict(self.mesh.shape)}: per device {mib(state.params)} trainable + "
             f"{mib(frozen)} frozen parameters, {mib(state.opt_state)} optimizer state")

  def _check_data(self) -> data_check.Report | None:
    """The data check (process 0, at a run's first start: a resumed run was checked)."""
    if self.process != 0 or os.path.exists(os.path.join(self.workdir, data_check.CHECK_FILE)):
      return None
    report = data_check.check(self.config, self.data.inputs)
    log_line(report.table(self.data.inputs.class_names))
    return report


def _fisher_weights(run: _Run, state: Any) -> Any:
  """EWC's weights: the Fisher information of the starting weights on `fisher_task`."""
  regularizer = run.config.regularizer
  sources = run.data.inputs.task_train or {
      registry.data_set_name(run.config.data.name): run.data.train}
  task = regularizers.fisher_task(run.config)
  examples = data.Head(sources[task], regularizer.fisher_examples)
  fisher_step = run.setup.fisher_step()
  batches = (run.data.put(batch, run.batch_sharding, "examples")  # one example at a time
             for batch in run.data.eval_batches(examples))
  started = time.perf_counter()
  weights = regularizers.fisher_weights(fisher_step, state.params, state.stats,
                                        run.built.frozen, batches)
  log_line(f"EWC: Fisher information of {len(examples)} {task} examples "
           f"in {time.perf_counter() - started:.1f} s")
  return weights


class _Checkpoints:
  """Saves the state with the run's progress: the data position, the early-stopping
  record and the test metrics at the start (which a resumed run reports)."""

  def __init__(self, run: _Run, iterator, stopper: EarlyStopping,
               test_at_start: dict[str, float] | None):
    self.checkpointer, self.workdir = run.checkpointer, run.workdir
    self.iterator, self.stopper, self.test_at_start = iterator, stopper, test_at_start

  def save(self, step: int, state: Any) -> None:
    self.checkpointer.save(step, state, {
        "data_iterator": self.iterator.get_state(), "early_stopping": self.stopper.to_dict(),
        "test_at_start": self.test_at_start})

  def preempted(self, step: int, state: Any) -> None:
    """Checkpoints the state after `step` (unless just done) and raises `Preempted`."""
    if self.checkpointer.latest_step() != step:
      self.save(step, state)
    self.checkpointer.wait()
    log_line(f"preempted: checkpoint of step {step} written to {self.workdir}; start the "
             "same command again to resume")
    raise preemption.Preempted(step)


def _resume(run: _Run, iterator) -> tuple[Any, EarlyStopping, dict[str, float] | None]:
  """(state, early-stopping record, test metrics at the start) of the workdir's latest
  checkpoint, with the data iterator moved to its position; those of a fresh start
  without one."""
  state = run.built.state
  stopper = EarlyStopping.from_config(run.config.early_stopping)
  restored = run.checkpointer.restore_latest(state)
  if restored is None:  # (again) from the start: drop records of a start killed earlier
    run.writer.truncate_after(-1)
    return state, stopper, None
  state, progress = restored
  iterator.set_state(progress["data_iterator"])
  step = int(jax.device_get(state.step))
  run.writer.truncate_after(step)
  run.checkpointer.drop_best_after(step)
  log_line(f"resumed from step {step} in {run.workdir}")
  return state, EarlyStopping.from_dict(progress["early_stopping"]), progress.get(
      "test_at_start")


class _Samples:
  """Continues validation prompts with the current parameters (greedy) and writes them."""

  def __init__(self, run: _Run):
    config = run.config
    self.model, self.frozen, self.writer = run.built.model, run.built.frozen, run.writer
    self.tokenizer = run.data.inputs.tokenizer
    self.max_new_tokens = config.samples.max_new_tokens
    self.compute_dtype = build.DTYPES[config.compute_dtype]
    self.prompts = inputs_lib.sample_prompts(run.data.inputs, "validation",
                                             config.samples.count, config.samples.prompt_tokens)

  def __call__(self, step: int, params: Any) -> None:
    tokenizer = self.tokenizer
    with jax.transfer_guard("allow"):  # prompts go to the device; tokens come back
      completions = generate.generate(
          self.model, param_groups.combine(params, self.frozen), self.prompts,
          max_new_tokens=self.max_new_tokens, stop_tokens=[tokenizer.eos_token_id],
          pad_id=tokenizer.pad_token_id or 0, compute_dtype=self.compute_dtype)
    samples = [{"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(completion)}
               for prompt, completion in zip(self.prompts, completions)]
    self.writer.write_samples(step, samples)
    log_line(f"sample at step {step}: {samples[0]['completion']!r}")


class _Validation:
  """Evaluates on validation (saving the best parameters, updating early stopping), on
  the extra evaluation sets, and writes samples of a language model."""

  def __init__(self, run: _Run, stopper: EarlyStopping):
    self.evaluate, self.writer, self.checkpointer = run.evaluate, run.writer, run.checkpointer
    self.stopper = stopper
    wants_samples = (run.task.name in ("causal_lm", "preference")
                     and run.config.samples.count > 0)
    self.samples = _Samples(run) if wants_samples else None

  def __call__(self, step: int, state: Any) -> None:
    weights, stopper = (state.params, state.stats), self.stopper
    metrics = self.evaluate(weights, "validation")
    self.writer.write(step, "validation", metrics)
    for name in self.evaluate.data.extra_evals:  # watched, not what early stopping follows
      extra = self.evaluate(weights, name)
      self.writer.write(step, name, extra)
      log_line(f"{name} step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in extra.items()))
    if stopper.update(step, metrics):
      self.checkpointer.save_best(step, state.params, state.stats)
    log_line(f"validation step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
             + f" (best {stopper.metric}={stopper.best} at step {stopper.best_step})")
    if self.samples is not None:
      self.samples(step, state.params)


def _train(run: _Run, state: Any, iterator, stopper: EarlyStopping,
           saver: _Checkpoints, clock: tracking.RunClock,
           on_step: Callable[[int], None] | None) -> Any:
  """The training loop from `state` to the last step or an early stop; the final state."""
  config, total = run.config, run.data.total_steps
  start = int(jax.device_get(state.step))
  progress = Progress(total, config.batch_size, start)
  validation = _Validation(run, stopper)
  if start == 0 and config.eval_at_start:
    validation(0, state)  # the pretrained model: the baseline fine-tuning must beat
  guard = periodic.NonFiniteGuard(config)
  cadence = periodic.Cadence.from_config(config, total, run.data.steps_per_epoch)
  with jax.transfer_guard("disallow"):
    for step in range(start + 1, total + 1):
      if stopper.stop:
        break
      batch = run.data.put(next(iterator), run.batch_sharding, "train")
      state, metrics = run.train_step(state, run.built.frozen, batch)
      guard.check(step, metrics["nonfinite"], run.checkpointer)
      if cadence.logs(step):
        metrics = jax.device_get(metrics)
        run.writer.write(step, "train", metrics)
        clock.update()
        log_line(progress.line(step, metrics))
      if cadence.validates(step):
        validation(step, state)
        if stopper.stop:
          log_line(f"early stopping at step {step}: no {stopper.metric} improvement "
                   f"> {stopper.min_delta} in {stopper.patience} evaluations")
      if cadence.checkpoints(step) or stopper.stop:
        saver.save(step, state)
      if on_step is not None:
        on_step(step)
      if preemption.requested():
        guard.finish(run.checkpointer)
        saver.preempted(step, state)
    guard.finish(run.checkpointer)
  return state


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
  config = models.resolved(config)  # model.name "auto": the model the checkpoint needs
  _check_workdir(workdir)
  started = time.perf_counter()
  run_ = _Run(config, workdir, devices)
  log_line(f"{run_.data.total_steps} steps ({run_.data.steps_per_epoch} per epoch), batch "
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
  names = [name for name, _ in run_.data.inputs.task_classes]
  if not names:
    return {registry.data_set_name(run_.config.data.name):
            at_start["accuracy"] - test["accuracy"]}
  return {name: at_start[f"{name}/accuracy"] - test[f"{name}/accuracy"] for name in names}


def _train_and_test(run_: _Run, on_step: Callable[[int], None] | None,
                    started: float) -> dict[str, Any]:
  config, workdir = run_.config, run_.workdir
  iterator = run_.data.train_iterator()
  state, stopper, at_start = _resume(run_, iterator)
  # Only now that the config has proven to fit the workdir's checkpoints, if any.
  _write_config(run_)
  clock = tracking.record_start(workdir, config.seed, started)
  run_.trackers.start()
  if int(jax.device_get(state.step)) == 0:  # a resumed run restores what follows
    if regularizers.kind(config) == "ewc":
      state = state.replace(anchor={"center": state.anchor["center"],
                                    "weight": _fisher_weights(run_, state)})
    if config.test_at_start or config.init_from:  # kept in every checkpoint
      at_start = run_.evaluate((state.params, state.stats), "test")
      log_line("test at start: " + " ".join(f"{k}={v:.4f}" for k, v in at_start.items()))
  saver = _Checkpoints(run_, iterator, stopper, at_start)
  state = _train(run_, state, iterator, stopper, saver, clock, on_step)
  run_.checkpointer.wait()
  best = run_.checkpointer.restore_best(state.params, state.stats)
  final = {
      "best_step": stopper.best_step,
      "stopped_early": stopper.stop,
      # The best evaluation's metrics are those of the restored best parameters.
      "validation": stopper.best_metrics or run_.evaluate(best, "validation"),
      "test": run_.evaluate(best, "test"),
      "train_seconds": clock.update(),  # every start's share, killed ones included
  }
  extra_evals = run_.data.extra_evals
  if extra_evals:  # the extra sets' validation metrics of the best parameters
    final["extra_eval"] = {name: run_.evaluate(best, name) for name in extra_evals}
  if at_start is not None:
    final["test_at_start"] = at_start
    final["forgetting"] = _forgetting(run_, at_start, final["test"])
  step = int(jax.device_get(state.step))
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

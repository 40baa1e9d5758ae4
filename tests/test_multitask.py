"""Multi-task classification, task mixtures, and the continual-learning penalties (L2-SP, EWC)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import minilm_sentiment
from ftjax import checkpoint, config as config_lib, optim, regularizers, tasks
from ftjax import state as state_lib, step as step_lib
from ftjax.data import mixture, registry
from ftjax.errors import CheckpointError, ConfigError

from conftest import with_overrides

TWO_TASKS = "rotten_tomatoes+tweets"  # 2 + 3 classes: logits 0-1 and 2-4


class LinearClassifier:
  """A model with the `Model.apply` / `apply_with_stats` contract and no dropout."""

  def apply_with_stats(self, params, stats, batch, *, train, rng=None, features=False):
    del train, rng, features
    return batch["features"] @ params["head"]["kernel"] + params["head"]["bias"], stats

  def apply(self, params, batch, *, train, rng=None, features=False, stats=None):
    return self.apply_with_stats(params, stats, batch, train=train, rng=rng,
                                 features=features)[0]


def _multi_task():
  config = minilm_sentiment.get_config(f"data={TWO_TASKS}")
  return tasks.get(config, task_classes=registry.preset_class_counts(config))


def _batch(rng, n=12, tasks_=(0, 1)):
  task = rng.choice(tasks_, size=n).astype(np.int32)
  label = np.where(task == 0, rng.integers(0, 2, size=n), rng.integers(0, 3, size=n))
  return {"features": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
          "task": jnp.asarray(task), "label": jnp.asarray(label, jnp.int32),
          "mask": jnp.ones((n,), bool)}


def test_multi_task_loss_is_each_examples_own_task_cross_entropy():
  rng = np.random.default_rng(0)
  batch = _batch(rng)
  logits = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  sums = _multi_task().train_sums(logits, batch)
  expected, correct = 0.0, 0
  for row, task, label in zip(np.asarray(logits), np.asarray(batch["task"]),
                              np.asarray(batch["label"])):
    own = row[:2] if task == 0 else row[2:]
    expected += -(own[label] - np.log(np.exp(own).sum()))
    correct += int(np.argmax(own) == label)
  np.testing.assert_allclose(sums["loss"], expected, rtol=1e-5)
  assert sums["accuracy"] == correct and sums["weight"] == 12
  # Another task's logits get no gradient.
  grads = jax.grad(lambda x: _multi_task().train_sums(x, batch)["loss"])(logits)
  other = np.where(np.asarray(batch["task"])[:, None] == 0, np.arange(5) >= 2, np.arange(5) < 2)
  assert np.all(np.asarray(grads)[other] == 0) and np.any(np.asarray(grads)[~other] != 0)


def test_multi_task_metrics_per_task_and_their_mean():
  rng = np.random.default_rng(1)
  task = _multi_task()
  batch = _batch(rng, n=40)
  batch["mask"] = batch["mask"].at[-4:].set(False)  # padding rows count nowhere
  logits = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
  metrics = task.summarize(jax.device_get(task.eval_sums(logits, batch)))
  single = tasks.get(ml_collections.ConfigDict({"task": "classification",
                                                "model": {"num_classes": 3}}))
  for t, (name, start, size) in enumerate([("rotten_tomatoes", 0, 2), ("tweets", 2, 3)]):
    keep = (np.asarray(batch["task"]) == t) & np.asarray(batch["mask"])
    sub = {"label": batch["label"][keep], "mask": batch["mask"][keep]}
    own = jnp.pad(logits[keep][:, start:start + size], ((0, 0), (0, 3 - size)),
                  constant_values=-1e9)
    expected = single.summarize(jax.device_get(single.eval_sums(own, sub)))
    for key in ("loss", "accuracy", "count"):
      np.testing.assert_allclose(metrics[f"{name}/{key}"], expected[key], rtol=1e-5)
  assert metrics["accuracy"] == pytest.approx(
      (metrics["rotten_tomatoes/accuracy"] + metrics["tweets/accuracy"]) / 2)
  assert metrics["count"] == 36


class _Source(list):
  """A random-access split of dict examples."""


def test_mixtures():
  a = _Source({"i": i} for i in range(10))
  b = _Source({"i": 100 + i} for i in range(30))
  tagged = [mixture.Tagged(a, 0), mixture.Tagged(b, 1)]
  both = mixture.training_mixture(tagged, "proportional", (), seed=0)
  assert len(both) == 40 and both[9] == {"i": 9, "task": 0} and both[10]["task"] == 1
  with pytest.raises(IndexError):
    both[40]  # pylint: disable=pointless-statement
  equal = mixture.training_mixture(tagged, "weights", (1.0, 1.0), seed=0)
  entries = [equal[i] for i in range(len(equal))]
  assert len(entries) == 40 and sum(e["task"] == 0 for e in entries) == 20
  small = [e["i"] for e in entries if e["task"] == 0]
  assert sorted(set(small)) == list(range(10)) and all(small.count(i) == 2 for i in range(10))
  large = [e["i"] for e in entries if e["task"] == 1]
  assert len(set(large)) == 20  # a subset of b, each once
  replay = mixture.training_mixture(tagged, "weights", (0.0, 1.0), seed=0)
  assert len(replay) == 30 and {replay[i]["task"] for i in range(30)} == {1}
  assert mixture._shares(10, [1, 1, 1]) == [4, 3, 3]  # pylint: disable=protected-access


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_classes": 4}, "the tasks of 'rotten_tomatoes+tweets' have 5 classes together"),
    ({"data.mixing": "random"}, "config.data.mixing='random': must be one of"),
    ({"data.mixing": "weights", "data.weights": (1.0,)}, "needs one weight per task"),
    ({"data.mixing": "weights", "data.weights": (0.0, 0.0)}, "not all 0"),
    ({"data.train_examples": (5,)}, "needs a count >= 0 per task"),
    ({"data.source_path": "/x.csv"}, "multi-task runs read each data set's own source"),
    ({"data.name": "rotten_tomatoes+fashion_mnist"}, "'fashion_mnist' cannot be a task"),
    ({"data.name": "tweets+tweets"}, "each once"),
    ({"regularizer.kind": "ewc", "regularizer.strength": 1.0, "init_from": "/a",
      "regularizer.fisher_task": "imdb"}, "fisher_task='imdb': not a task of this run"),
])
def test_bad_multi_task_configs(overrides, message):
  config = with_overrides(minilm_sentiment.get_config(f"data={TWO_TASKS}"), **overrides)
  with pytest.raises(ConfigError, match=None) as error:
    config_lib.validate(config)
  assert message in str(error.value)


@pytest.mark.parametrize("arg, overrides, message", [
    ("regularizer=l2sp", {}, "regularizer.strength=0.0: must be > 0"),
    ("regularizer=ewc,strength=1", {}, "'ewc' needs config.init_from"),
    ("regularizer=ewc,strength=1,init_from=/a", {"regularizer.fisher_examples": 0},
     "fisher_examples=0: must be a positive integer"),
    ("regularizer=l1,strength=1", {}, "config.regularizer.kind='l1': must be one of"),
])
def test_bad_regularizer_configs(arg, overrides, message):
  config = with_overrides(minilm_sentiment.get_config(arg), **overrides)
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  assert message in str(error.value)
  single = with_overrides(minilm_sentiment.get_config(), **{"data.weights": (1.0,)})
  with pytest.raises(ConfigError, match="only for multi-task runs"):
    registry.check(single)


def _params(rng):
  return {"head": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}


def test_penalty_value_and_gradient():
  rng = np.random.default_rng(2)
  params, center = _params(rng), _params(rng)
  weight = jax.tree.map(lambda x: jnp.abs(x) + 0.5, _params(rng))
  for anchor in ({"center": center}, {"center": center, "weight": weight}):
    w = anchor.get("weight", jax.tree.map(jnp.ones_like, params))
    reference = lambda p: 0.5 * 3.0 * sum(  # pylint: disable=cell-var-from-loop
        jnp.sum(wi * (pi - ci) ** 2) for wi, pi, ci in zip(
            jax.tree.leaves(w), jax.tree.leaves(p), jax.tree.leaves(center)))
    value, grads = regularizers.penalty(params, anchor, 3.0)
    np.testing.assert_allclose(value, reference(params), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(reference)(params))):
      np.testing.assert_allclose(a, b, rtol=1e-5)


def test_anchored_train_step_adds_the_penalty_to_the_loss():
  rng = np.random.default_rng(3)
  params = _params(rng)
  optimizer = minilm_sentiment.get_config().optimizer
  optimizer.unlock()
  optimizer.warmup_steps, optimizer.clip_norm, optimizer.weight_decay = 0, 0.0, 0.0
  tx, schedule = optim.make_optimizer(optimizer, params, total_steps=10)
  state = state_lib.create(params, tx, seed=0, anchor="center")
  state = state.replace(params=jax.tree.map(lambda x: x + 0.1, state.params))
  batch = _batch(rng)
  step = lambda s: step_lib.train_step(s, {}, batch, model=LinearClassifier(), task=_multi_task(),
                                       tx=tx, schedule=schedule, penalty_strength=2.0)
  _, metrics = jax.jit(step)(state)

  def objective(p):
    sums = _multi_task().train_sums(LinearClassifier().apply(p, batch, train=True), batch)
    return sums["loss"] / sums["weight"] + regularizers.penalty(p, state.anchor, 2.0)[0]

  expected = optax.global_norm(jax.grad(objective)(state.params))
  np.testing.assert_allclose(metrics["grad_norm"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["penalty"], 0.5 * 2.0 * 0.01 * 25, rtol=1e-4)


def test_fisher_is_the_mean_squared_per_example_gradient_scaled_to_mean_one():
  rng = np.random.default_rng(4)
  params, model, task = _params(rng), LinearClassifier(), _multi_task()
  batches = [_batch(rng, n=6), _batch(rng, n=6)]
  batches[1]["mask"] = batches[1]["mask"].at[4:].set(False)
  fisher_step = jax.jit(lambda p, b: step_lib.fisher_step(p, {}, {}, b, model=model, task=task))
  weights = regularizers.fisher_weights(lambda p, s, f, b: fisher_step(p, b), params, {}, {},
                                        batches)
  loss = lambda p, example: task.train_sums(
      model.apply(p, jax.tree.map(lambda x: x[None], example), train=False),
      jax.tree.map(lambda x: x[None], example))["loss"]
  expected = jax.tree.map(jnp.zeros_like, params)
  for batch in batches:
    for i in range(6):
      if batch["mask"][i]:
        example = {key: value[i] for key, value in batch.items()}
        grads = jax.grad(loss)(params, example)
        expected = jax.tree.map(lambda e, g: e + g ** 2, expected, grads)
  mean = np.mean(np.concatenate([np.ravel(x) for x in jax.tree.leaves(expected)]))
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, np.asarray(b) / mean, rtol=1e-4, atol=1e-6)
  no_examples = [dict(batches[0], mask=jnp.zeros((6,), bool))]
  with pytest.raises(ConfigError, match="no training examples"):
    regularizers.fisher_weights(lambda p, s, f, b: fisher_step(p, b), params, {}, {},
                                no_examples)


def test_a_checkpoint_written_before_the_anchor_field_still_resumes(tmp_path):
  config = ml_collections.ConfigDict({"every": 1, "max_to_keep": 2, "use_async": False})
  checkpointer = checkpoint.Checkpointer(str(tmp_path), config)
  tx = optax.adam(1e-3)
  state = state_lib.create({"w": jnp.arange(3.0)}, tx, seed=0)
  older = {field: getattr(state, field) for field in ("step", "params", "opt_state", "rng",
                                                      "stats")}
  checkpointer._latest.save(3, args=ocp.args.Composite(  # pylint: disable=protected-access
      state=ocp.args.StandardSave(older), progress=ocp.args.JsonSave({"x": 1})), force=True)
  restored, progress = checkpointer.restore_latest(state)
  assert progress == {"x": 1} and restored.anchor == {}
  np.testing.assert_array_equal(restored.params["w"], [0.0, 1.0, 2.0])
  with pytest.raises(CheckpointError, match="cannot be restored into this run.s state"):
    checkpointer.restore_latest(state_lib.create({"w": jnp.arange(3.0)}, tx, 0, anchor="center"))
  checkpointer.close()

"""Models chosen by name from the config, handled functionally as (graphdef, params)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from ftjax import param_groups
from ftjax.errors import ConfigError
from ftjax.hub import assets
from ftjax.hub import bert as bert_hub
from ftjax.models import bert


@dataclasses.dataclass(frozen=True)
class Model:
  """A module's static graph; `apply` is a pure function of the parameters."""

  graphdef: nnx.GraphDef

  def apply(self, params: Any, batch: dict[str, jax.Array], *, train: bool,
            rng: jax.Array | None = None) -> jax.Array:
    """Runs the model on `batch`; `rng` drives dropout when `train` is True."""
    module = nnx.merge(self.graphdef, params)
    rngs = nnx.Rngs(dropout=rng) if train else None
    return module(batch, deterministic=not train, rngs=rngs)


def _bert_classifier(config: ml_collections.ConfigDict):
  directory = assets.model_dir(config.pretrained) if config.pretrained else ""
  arch = (bert.BertConfig.from_json(os.path.join(directory, "config.json"))
          if directory else bert.BertConfig())

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return bert.SequenceClassifier(arch, num_classes=config.num_classes,
                                   pooling=config.pooling, head_init=config.head_init,
                                   rngs=rngs)

  def load(params):
    return bert_hub.load_pretrained_into(params, directory, config.dont_load) if directory else params

  return build, load


_REGISTRY: dict[str, Callable[..., Any]] = {
    "bert_classifier": _bert_classifier,
}


def create(config: ml_collections.ConfigDict, seed: int) -> tuple[Model, Any]:
  """Builds the model named by `config.name` and its (pretrained) parameters.

  Args:
    config: the `model` section of a run config.
    seed: seeds the initialisation of parameters the checkpoint does not provide.

  Returns:
    (model, params) with params a nested dict of float32 arrays: checkpoint
    tensors where the model has a pretrained checkpoint, fresh initial values
    for the rest (and for everything without one).
  """
  if config.name not in _REGISTRY:
    raise ConfigError(f"config.model.name={config.name!r}: unknown model; "
                      f"known: {sorted(_REGISTRY)}")
  build, load = _REGISTRY[config.name](config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(params=seed))))
  params = load(nnx.to_pure_dict(abstract))
  todo = {path for path, leaf in param_groups.flatten(params).items()
          if isinstance(leaf, jax.ShapeDtypeStruct)}

  @jax.jit
  def initialise():
    # Only the parameters the checkpoint does not provide: XLA drops the rest.
    state = nnx.to_pure_dict(nnx.state(build(nnx.Rngs(params=seed))))
    return {path: leaf for path, leaf in param_groups.flatten(state).items() if path in todo}

  fresh = initialise() if todo else {}
  return Model(graphdef), param_groups.map_with_path(lambda p, x: fresh.get(p, x), params)

"""Models chosen by name from the config, handled functionally as (graphdef, params)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
from flax import nnx

from ftjax import param_groups, schema
from ftjax.errors import ConfigError
from ftjax.hub import assets
from ftjax.hub import bert as bert_hub
from ftjax.hub import deberta as deberta_hub
from ftjax.hub import gguf as gguf_hub
from ftjax.hub import llama as llama_hub
from ftjax.hub import convnext as convnext_hub
from ftjax.hub import loading, safetensors_io
from ftjax.hub import resnet as resnet_hub
from ftjax.hub import modernbert as modernbert_hub
from ftjax.hub import vision as vision_hub
from ftjax.hub import vit as vit_hub
from ftjax.models import batch_norm, bert, heads, hf_config, llama, mobilenet, modernbert, vit
from ftjax.models import attention, convnext, deberta, resnet


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a model keeps its embeddings, blocks and head, as patterns over parameter paths.

  Freezing presets, gradual unfreezing and layer-wise learning-rate decay are
  written against this, so they work for every model in the registry.
  """

  embeddings: str  # regex, e.g. "encoder/embeddings/.*"
  block: str       # path prefix with {} for the block index, e.g. "encoder/layers/{}"
  head: str        # regex, e.g. "head/.*"
  # A new task head (trained alongside adapters and BitFit biases) rather than a
  # pretrained one (a language model's, which those methods leave frozen).
  head_is_new: bool = True
  # The kernels LoRA / DoRA adapt when `peft.target` names none: PEFT's usual choice for
  # the family (attention queries and values, fused q/k/v, 1x1 convolutions).
  adapted: str = ""

  def blocks(self, indices) -> str:
    """A regex matching every parameter of the blocks `indices`."""
    return self.block.format("(" + "|".join(str(i) for i in indices) + ")") + "/.*"

  def block_index(self, path: str) -> int | None:
    match = re.fullmatch(self.blocks([r"\d+"]), path)
    return int(match.group(1)) if match else None

  def num_blocks(self, paths) -> int:
    indices = [self.block_index(p) for p in paths]
    return max([i for i in indices if i is not None], default=-1) + 1

  def depth(self, path: str, num_blocks: int) -> int:
    """Distance from the output: 0 for the head (and anything above the blocks),
    num_blocks - i for block i, num_blocks + 1 for the embeddings."""
    if re.fullmatch(self.embeddings, path):
      return num_blocks + 1
    index = self.block_index(path)
    return 0 if index is None else num_blocks - index

  def depths(self, tree: Any, params: Any) -> Any:
    """Each leaf's `depth` in a tree like `tree`, counting the blocks of all `params`."""
    num_blocks = self.num_blocks(param_groups.flatten(params))
    return param_groups.map_with_path(lambda path, _: self.depth(path, num_blocks), tree)


# The attention's query and value kernels, in the encoders' and ViT's paths.
_QUERY_VALUE = ".*attention/(query|value)/kernel"


def set_call_mode(module: nnx.Module, *, train: bool, rngs: nnx.Rngs | None) -> None:
  """Gives the layers wrapped around a model's own (adapters: their `set_call_mode`) the
  mode and dropout rng of the coming call."""
  for _, node in nnx.iter_graph(module):
    if hasattr(node, "set_call_mode"):
      node.set_call_mode(train=train, rngs=rngs)


class Features(NamedTuple):
  """A language model's final hidden states and how to turn them into logits."""

  hidden: jax.Array  # [B, L, hidden] in the compute dtype
  unembed: Callable[[jax.Array], jax.Array]  # hidden [..., hidden] -> float32 logits
  kernel: jax.Array | None  # the [hidden, vocab] unembedding matrix; None if adapted or capped


@dataclasses.dataclass(frozen=True)
class Model:
  """A module's static graph; `apply` is a pure function of the parameters.

  Parameter trees handed to a Model hold every variable of the module. Batch
  statistics (BatchNorm running means and variances, at `stat_paths`) are kept
  apart from the parameters during training (`split_stats`): they get no
  gradient, stay float32 and are updated by the forward pass itself in the
  BatchNorm layers named by `updating`.
  """

  graphdef: nnx.GraphDef
  layout: Layout
  # (regex, logical axes) for every parameter, e.g. ("encoder/.*/query/kernel",
  # ("embed", "heads")); `ftjax.sharding` maps them to mesh axes.
  axes: param_groups.Rules = ()
  stat_paths: frozenset[str] = frozenset()
  # BatchNorm layers that normalise with batch statistics and update their running
  # ones in training (`batch_norm.updating_layers`); the others keep them.
  updating: frozenset[str] = frozenset()

  def module(self, params: Any) -> nnx.Module:
    """The module holding `params` (a nested dict of every parameter)."""
    return nnx.merge(self.graphdef, params)

  def split_stats(self, params: dict) -> tuple[dict, dict]:
    """(parameters, batch statistics) of a tree of every variable of the module."""
    mask = param_groups.map_with_path(lambda path, _: path not in self.stat_paths, params)
    return param_groups.partition(params, mask)

  def apply(self, params: Any, batch: dict[str, jax.Array], *, train: bool,
            rng: jax.Array | None = None, features: bool = False, stats: Any = None) -> Any:
    """Runs the model on `batch`; `rng` drives dropout when `train` is True.

    Args:
      params: the parameters (with the batch statistics, or those in `stats`).
      batch: the model's inputs.
      train: training mode (dropout; batch statistics in the `updating` layers).
      rng: the dropout key.
      features: return a language model's `Features` instead of logits.
      stats: the batch statistics when `params` does not hold them.

    Returns:
      The module's output (logits), or with `features` (language models) its
      `Features`, for losses that compute logits a chunk at a time.
    """
    return self.apply_with_stats(params, stats or {}, batch, train=train, rng=rng,
                                 features=features)[0]

  def apply_with_stats(self, params: Any, stats: Any, batch: dict[str, jax.Array], *,
                       train: bool, rng: jax.Array | None = None,
                       features: bool = False) -> tuple[Any, Any]:
    """Like `apply`, also returning the batch statistics after the call.

    Returns:
      (output, stats): in training, the `updating` layers' running statistics
      have moved toward the batch's; everything else is `stats` unchanged.
    """
    module = nnx.merge(self.graphdef, param_groups.combine(params, stats) if stats else params)
    rngs = nnx.Rngs(dropout=rng) if train else None
    set_call_mode(module, train=train, rngs=rngs)
    batch_norm.set_updating(module, self.updating if train else frozenset())
    if features:
      out = Features(module.features(batch), module.unembed, module.unembed_kernel())
    else:
      out = module(batch, deterministic=not train, rngs=rngs)
    if train and self.updating:
      stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    return out, stats


def _bert_classifier(config: ml_collections.ConfigDict):
  directory = assets.model_dir(config.pretrained) if config.pretrained else ""
  if directory:
    arch = bert.BertConfig.from_json(os.path.join(directory, "config.json"))
  else:  # a randomly initialised encoder of the architecture in config.arch
    arch = bert.BertConfig.from_dict(ml_collections.ConfigDict(config.arch).to_dict())

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return bert.SequenceClassifier(arch, num_classes=config.num_classes,
                                   pooling=config.pooling, head_init=config.head_init,
                                   rngs=rngs)

  def load(params):
    return (bert_hub.load_pretrained_into(params, directory, arch.model_type, config.dont_load)
            if directory else params)

  return build, load, Layout(embeddings="encoder/embeddings/.*", block="encoder/layers/{}",
                             head="head/.*", adapted=_QUERY_VALUE), bert.PARAM_AXES


def _deberta_classifier(config: ml_collections.ConfigDict):
  """A DeBERTa-v2 / v3 encoder with BERT's pooling and a new linear head, from a Hugging
  Face folder or randomly initialised from `config.arch`."""
  directory = assets.model_dir(config.pretrained) if config.pretrained else ""
  arch = (deberta.DebertaConfig.from_json(os.path.join(directory, "config.json")) if directory
          else deberta.DebertaConfig.from_dict(ml_collections.ConfigDict(config.arch).to_dict()))

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return deberta.SequenceClassifier(arch, num_classes=config.num_classes,
                                      pooling=config.pooling, head_init=config.head_init,
                                      rngs=rngs)

  def load(params):
    return (deberta_hub.load_pretrained_into(params, directory, config.dont_load)
            if directory else params)

  return build, load, Layout(embeddings=deberta.EMBEDDINGS, block="encoder/layers/{}",
                             head="head/.*", adapted=_QUERY_VALUE), deberta.PARAM_AXES


def _modernbert_classifier(config: ml_collections.ConfigDict):
  """A ModernBERT encoder with ModernBertForSequenceClassification's head, from a
  Hugging Face folder (the head loaded where its checkpoint has one) or `config.arch`."""
  directory = assets.model_dir(config.pretrained) if config.pretrained else ""
  if directory:
    source = os.path.join(directory, "config.json")
    arch = modernbert.ModernBertConfig.from_json(source)
  else:
    source = "config.model.arch"
    raw = ml_collections.ConfigDict(config.arch).to_dict()
    arch = modernbert.ModernBertConfig.from_dict(
        {"classifier_pooling": config.pooling, **raw}, source)
  if arch.classifier_pooling != config.pooling:
    raise ConfigError(f"{source}: classifier_pooling={arch.classifier_pooling!r}, but "
                      f"config.model.pooling={config.pooling!r}: a ModernBERT classifier "
                      "pools as its config says (so do transformers and a merged export); "
                      f"set config.model.pooling={arch.classifier_pooling!r}, or "
                      f"classifier_pooling in {source}")

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return modernbert.SequenceClassifier(arch, num_classes=config.num_classes,
                                         head_init=config.head_init, rngs=rngs)

  def load(params):
    return (modernbert_hub.load_pretrained_into(params, directory, config.dont_load)
            if directory else params)

  return build, load, Layout(embeddings="encoder/embeddings/.*", block="encoder/layers/{}",
                             head="head/.*|classifier/.*", adapted=r".*/attn/Wqkv/kernel"
                             ), modernbert.PARAM_AXES


def _llama_lm(config: ml_collections.ConfigDict, classifier: bool = False):
  """A Llama-family decoder from a checkpoint folder, a GGUF file or `config.arch`: a
  language model, or with `classifier` a sequence classifier of `config.num_classes`."""
  directory = assets.model_dir(config.pretrained) if config.pretrained else ""
  gguf_path = gguf_hub.find_gguf(directory) if directory else None
  if gguf_path:
    raw, tensors = gguf_hub.read_gguf(gguf_path)
    arch = llama.LlamaConfig.from_dict(raw, source=gguf_path)
  elif directory:
    arch = llama.LlamaConfig.from_json(os.path.join(directory, "config.json"))
  elif config.arch:
    arch = llama.LlamaConfig.from_dict(ml_collections.ConfigDict(config.arch).to_dict())
  else:
    raise ConfigError("config.model.pretrained is empty and config.model.arch is not set: "
                      f"{config.name} needs a checkpoint folder or the architecture's config "
                      "fields")
  remat = config.remat

  def build(rngs: nnx.Rngs) -> nnx.Module:
    if classifier:
      return llama.SequenceClassifier(arch, num_classes=config.num_classes,
                                      head_init=config.head_init, remat=remat,
                                      scan_layers=config.scan_layers,
                                      attention=config.attention, rngs=rngs)
    return llama.CausalLM(arch, remat=remat, scan_layers=config.scan_layers,
                          attention=config.attention, rngs=rngs)

  def load(params):
    if not directory:
      return params
    checkpoint = tensors if gguf_path else safetensors_io.load_safetensors(directory)
    dont_load = tuple(config.dont_load)
    if classifier and "score.weight" not in checkpoint:  # a causal LM's: a new head
      dont_load += ("score/.*",)
    return loading.load_tensors(params, checkpoint, llama_hub.hf_name_to_path,
                                source=gguf_path or directory, dont_load=dont_load)[0]

  # Queries and values (Phi-3's and GPT-2's fused q/k/v).
  adapted = r".*/self_attn/(q_proj|v_proj|qkv_proj)/kernel"
  if classifier:
    layout = Layout(embeddings="model/embed_(tokens|positions)/.*", block="model/layers/{}",
                    head="score/.*", adapted=adapted)
  else:
    layout = Layout(embeddings="model/embed_(tokens|positions)/.*", block="model/layers/{}",
                    head="lm_head/.*|model/norm/.*", head_is_new=False, adapted=adapted)
  return build, load, layout, llama.PARAM_AXES


def _decoder_classifier(config: ml_collections.ConfigDict):
  """A Llama-family decoder scoring each row's last real token (reward models); from a
  causal LM's checkpoint, which has no `score` head, the head starts new."""
  return _llama_lm(config, classifier=True)


def _convnet(config: ml_collections.ConfigDict):
  """MobileNetV2 / EfficientNet-lite0 (by `config.name`), from ImageNet weights if
  `config.pretrained` names a packaged checkpoint or a .pth file, else random."""
  arch = mobilenet.get_arch(config.name)
  weights = vision_hub.weights_file(config.pretrained) if config.pretrained else ""

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return mobilenet.ImageClassifier(arch, config.num_classes, head_init=config.head_init,
                                     rngs=rngs)

  def load(params):
    return (vision_hub.load_pretrained_into(params, weights, config.name, config.dont_load)
            if weights else params)

  return build, load, Layout(embeddings="stem/.*", block="blocks/{}", head="head/.*",
                             adapted=r"(blocks/\d+/(expand|project)|top)/kernel"
                             ), mobilenet.PARAM_AXES


def _vit(config: ml_collections.ConfigDict):
  """A ViT from a Hugging Face ViT folder (`config.pretrained`), at `config.image_size`
  (the position table is interpolated when it differs from the checkpoint's), or
  randomly initialised from `config.arch`."""
  directory = assets.model_dir(config.pretrained) if config.pretrained else ""
  image_size = config.image_size or None
  if directory:
    arch = vit_hub.model_config(directory, image_size)
  else:
    arch = vit.ViTConfig.from_dict(ml_collections.ConfigDict(config.arch).to_dict())

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return vit.ImageClassifier(arch, config.num_classes, head_init=config.head_init, rngs=rngs)

  def load(params):
    return (vit_hub.load_pretrained_into(params, directory, arch, config.dont_load)
            if directory else params)

  return build, load, Layout(embeddings="embeddings/.*", block="layers/{}",
                             head="head/.*", adapted=_QUERY_VALUE), vit.PARAM_AXES


def _stage_convnet(config: ml_collections.ConfigDict, module: Any, hub: Any):
  """A ResNet or ConvNeXt (`module`, its checkpoints read by `hub`) from a Hugging Face
  folder, a torchvision state dict (ResNet; the architecture from `config.arch`) or
  random weights of `config.arch`. Its stages are the layout's blocks."""
  arch = hub.model_config(config.pretrained, ml_collections.ConfigDict(config.arch).to_dict())

  def build(rngs: nnx.Rngs) -> nnx.Module:
    return module.ImageClassifier(arch, config.num_classes, head_init=config.head_init,
                                  rngs=rngs)

  def load(params):
    return (hub.load_pretrained_into(params, config.pretrained, config.dont_load)
            if config.pretrained else params)

  return build, load, Layout(embeddings="stem/.*", block="stages/{}", head="head/.*",
                             adapted=module.adapted_kernels(arch)), module.param_axes(arch)


_REGISTRY: dict[str, Callable[..., Any]] = {
    "convnext": lambda config: _stage_convnet(config, convnext, convnext_hub),
    "resnet": lambda config: _stage_convnet(config, resnet, resnet_hub),
    "bert_classifier": _bert_classifier,
    "deberta_classifier": _deberta_classifier,
    "decoder_classifier": _decoder_classifier,
    "llama_lm": _llama_lm,
    "mobilenet_v2": _convnet,
    "modernbert_classifier": _modernbert_classifier,
    "efficientnet_lite0": _convnet,
    "vit": _vit,
}
# What each model reads: "text" (tokens of texts to classify), "tokens" (language-model
# rows) or "image".
INPUTS = {"bert_classifier": "text", "deberta_classifier": "text",
          "decoder_classifier": "text", "llama_lm": "tokens",
          "modernbert_classifier": "text",
          "resnet": "image", "convnext": "image",
          "mobilenet_v2": "image", "efficientnet_lite0": "image", "vit": "image"}
# The models that also read packed batches of texts (several texts per row,
# `ftjax.data.packing`). DeBERTa's convolution would mix neighbouring texts of a row; the
# decoder classifier reads one text per row.
READS_PACKED = frozenset({"bert_classifier", "modernbert_classifier"})


AUTO = "auto"


def _model_type(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(model_type, where it was read) of `config.pretrained` (its config.json or GGUF
  metadata) or, without a checkpoint, of `config.arch`."""
  if not config.pretrained:
    return dict(config.arch).get("model_type", ""), "config.model.arch"
  if os.path.isfile(config.pretrained):
    raise ConfigError(f"config.model.name={AUTO!r} reads the model family from a folder's "
                      f"config.json, and config.model.pretrained={config.pretrained!r} is a "
                      "file; name the model (config.model.name=resnet for a torchvision "
                      "state dict)")
  directory = assets.model_dir(config.pretrained)
  path = os.path.join(directory, "config.json")
  if os.path.isfile(path):
    return hf_config.read_json(path).get("model_type", ""), path
  gguf_path = gguf_hub.find_gguf(directory)
  if gguf_path:
    return gguf_hub.read_config(gguf_path)["model_type"], gguf_path
  raise ConfigError(f"config.model.name={AUTO!r} reads the model family from a Hugging Face "
                    f"folder's config.json, and {directory} has none; name the model "
                    f"(config.model.name, one of {sorted(_REGISTRY)})")


# Image families whose `model_type` is the name of the model reading them.
_IMAGE_FAMILIES = ("vit", "resnet", "convnext")


def resolve_name(config: ml_collections.ConfigDict, task: str) -> str:
  """`config.name`, or for "auto" the model that reads the checkpoint's `model_type` for
  `task`: an encoder classifier, a decoder classifier or language model, or a ViT.

  Args:
    config: the `model` section of a run config.
    task: the run's task (`config.task`).

  Raises:
    ConfigError: for "auto" with a checkpoint whose `model_type` no model reads, naming
      the file and the supported types.
  """
  if config.name != AUTO:
    return config.name
  model_type, where = _model_type(config)
  if model_type in bert.FAMILIES:
    return "bert_classifier"
  if model_type == modernbert.MODEL_TYPE:
    return "modernbert_classifier"
  if model_type in deberta.MODEL_TYPES:
    return "deberta_classifier"
  if model_type in llama.FAMILIES:
    return "llama_lm" if task in ("causal_lm", "preference") else "decoder_classifier"
  if model_type in _IMAGE_FAMILIES:
    return model_type
  supported = sorted([*bert.FAMILIES, *deberta.MODEL_TYPES, *llama.FAMILIES,
                      modernbert.MODEL_TYPE, *_IMAGE_FAMILIES])
  raise ConfigError(f"{where}: model_type={model_type!r}: config.model.name={AUTO!r} knows "
                    f"no model for it; supported model types: {supported}")


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `model.name` "auto" replaced by the model it resolves to (a copy; as
  is otherwise), so that what a run records names the model it built."""
  name = resolve_name(config.model, config.task)
  if name == config.model.name:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.name = name
  return config


# name -> (checkpoint name map, {ftjax path: (name, transform)} for new parameters, or a
# function of the pretrained folder giving it: an encoder family names its head its own way)
_HF_FORMATS = {
    "bert_classifier": (bert_hub.hf_name_to_path, bert_hub.export_extra),
    "deberta_classifier": (deberta_hub.hf_name_to_path, deberta_hub.EXPORT_EXTRA),
    "llama_lm": (llama_hub.hf_name_to_path, llama_hub.EXPORT_EXTRA),
    "decoder_classifier": (llama_hub.hf_name_to_path, llama_hub.CLASSIFIER_EXPORT_EXTRA),
    "modernbert_classifier": (modernbert_hub.hf_name_to_path, modernbert_hub.EXPORT_EXTRA),
    "vit": (vit_hub.hf_name_to_path, vit_hub.EXPORT_EXTRA),
    "resnet": (resnet_hub.hf_name_to_path, resnet_hub.EXPORT_EXTRA),
    "convnext": (convnext_hub.hf_name_to_path, convnext_hub.EXPORT_EXTRA),
}


def _class_count_problem(value: int) -> str:
  return ("" if value >= 0 else
          "must be a positive integer, or 0 to take the data's class count")


_class_count_problem.wording = ("positive ", ", or 0 to take the data's class count")

SCHEMA = schema.Section("model", "The network: its family, checkpoint and new head.", {
    "name": schema.Key("bert_classifier", "the model family and head; auto: from the "
                       "checkpoint's config.json model_type and the task",
                       choices=tuple(sorted(_REGISTRY)) + (AUTO,)),
    "pretrained": schema.Key("", "a packaged model name, a Hugging Face folder, a GGUF or "
                             ".pth file; empty: random weights of `arch`"),
    "arch": schema.Key({}, "Hugging Face config fields of a randomly initialised model "
                       "(used when `pretrained` is empty)", free=True),
    "num_classes": schema.Key(0, "classes of the new head (0: as many as the data has)",
                              rule=_class_count_problem),
    "pooling": schema.Key("mean", "encoder classifiers: how token states become one vector "
                          "(ModernBERT: its config.json's classifier_pooling)",
                          choices=bert.POOLINGS),
    "head_init": schema.Key("zeros", "how a new head's kernel starts", choices=heads.HEAD_INITS),
    "dont_load": schema.Key((), "regexes of parameters not taken from the checkpoint (a "
                            "replaced head)"),
    "remat": schema.Key("none", "decoders: recompute each block in the backward pass, "
                        "keeping what the policy names (dots_saveable: every matmul output; "
                        "save_qkv_proj, save_dot_except_mlp, ...: the named projections)",
                        choices=("none",) + tuple(llama.REMAT_POLICIES)),
    "attention": schema.Key("xla", "decoders: the attention kernel: xla (dense masks, any "
                            "platform), cudnn (GPU, one example per row), pallas (GPU flash "
                            "attention with segment ids), splash (TPU), auto (per layer, the "
                            "fastest exact one for the platform)",
                            choices=attention.IMPLEMENTATIONS),
    "scan_layers": schema.Key(False, "decoders: run the blocks with jax.lax.scan, so that "
                              "compile time does not grow with depth (same parameters, "
                              "checkpoints and adapters)"),
    "batch_norm": schema.Key("update", "trained BatchNorm layers: normalise with batch "
                             "statistics and update the running ones, or keep them frozen",
                             choices=batch_norm.MODES),
    "image_size": schema.Key(0, "ViT: the input resolution the position table is "
                             "interpolated to (0: the checkpoint's)", rule=schema.at_least(0)),
})


def hf_format(config: ml_collections.ConfigDict) -> tuple[str, Any, Any]:
  """(pretrained folder, checkpoint name map, names of new parameters) of a model config.

  The names of new parameters are {ftjax path: (name, transform) or None (left out)}, or
  a function of the pretrained folder giving them (`ftjax.hub.export.save_merged`).
  """
  if not config.pretrained:
    raise ConfigError(f"config.model.pretrained is empty: {config.name} has no checkpoint "
                      "whose tensor names an export could follow")
  if config.name not in _HF_FORMATS:
    raise ConfigError(f"config.model.name={config.name!r}: no Hugging Face checkpoint format "
                      f"to export to; exportable: {sorted(_HF_FORMATS)}")
  name_map, extra = _HF_FORMATS[config.name]
  return assets.model_dir(config.pretrained), name_map, extra


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a `model` section) with the keys it lacks at their defaults: a run
  recorded before a key existed, or a section written by hand, builds as it did then."""
  missing = {name: key.default for name, key in SCHEMA.keys.items() if name not in config}
  if not missing:
    return config
  return ml_collections.ConfigDict({**config.to_dict(), **missing})


def create(config: ml_collections.ConfigDict, seed: int,
           shardings: Callable[[Model, Any], Any] | None = None) -> tuple[Model, Any]:
  """Builds the model named by `config.name` and its (pretrained) parameters.

  Args:
    config: the `model` section of a run config.
    seed: seeds the initialisation of parameters the checkpoint does not provide.
    shardings: optional (model, parameter shapes) -> their shardings; freshly
      initialised parameters are then created directly in their shards.

  Returns:
    (model, params) with params a nested dict of float32 arrays: checkpoint
    tensors (host numpy arrays) where the model has a pretrained checkpoint,
    fresh initial values for the rest (and for everything without one).
  """
  config = with_defaults(config)
  if config.name == AUTO:
    raise ConfigError(f"config.model.name={AUTO!r} depends on the run's task: resolve it "
                      "first (ftjax.models.resolved)")
  if config.name not in _REGISTRY:
    raise ConfigError(f"config.model.name={config.name!r}: unknown model; "
                      f"known: {sorted(_REGISTRY)}")
  build, load, layout, axes = _REGISTRY[config.name](config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(params=seed))))
  stat_paths = frozenset(param_groups.flatten(nnx.to_pure_dict(nnx.state(
      nnx.merge(graphdef, abstract), nnx.BatchStat))))
  model = Model(graphdef, layout, axes, stat_paths)
  params = load(nnx.to_pure_dict(abstract))
  todo = {path: leaf for path, leaf in param_groups.flatten(params).items()
          if isinstance(leaf, jax.ShapeDtypeStruct)}

  def initialise():
    # Only the parameters the checkpoint does not provide: XLA drops the rest.
    state = nnx.to_pure_dict(nnx.state(build(nnx.Rngs(params=seed))))
    return {path: leaf for path, leaf in param_groups.flatten(state).items() if path in todo}

  out_shardings = None
  if shardings is not None and todo:
    placed = param_groups.flatten(shardings(model, nnx.to_pure_dict(abstract)))
    out_shardings = {path: placed[path] for path in todo}
  fresh = jax.jit(initialise, out_shardings=out_shardings)() if todo else {}
  return model, param_groups.map_with_path(lambda p, x: fresh.get(p, x), params)

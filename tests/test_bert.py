"""The BERT encoder against transformers' PyTorch BertModel, and the weight loader."""


import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ftjax import models, param_groups
from ftjax.errors import ConfigError, WeightsError
from ftjax.hub import assets, bert as bert_hub, safetensors_io
from ftjax.models import bert

TEXTS = ["A gripping, beautifully shot film.", "Dull. I wanted my two hours back!",
         "the plot meanders , but the cast is terrific and the ending lands ."]


def _model_config(**overrides):
  values = dict(name="bert_classifier", pretrained="minilm-l6", num_classes=3, pooling="mean",
                head_init="zeros", dont_load=["head/.*"])
  values.update(overrides)
  return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def minilm():
  return models.create(_model_config(), seed=0)


def test_encoder_matches_transformers_bert_model(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = assets.model_dir("minilm-l6")
  tokens = transformers.AutoTokenizer.from_pretrained(directory)(
      TEXTS, padding="max_length", truncation=True, max_length=24, return_tensors="np")
  reference = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    expected = reference(**{k: torch.tensor(v) for k, v in tokens.items()}).last_hidden_state
  model, params = minilm
  module = nnx.merge(model.graphdef, params)
  hidden = module.encoder(jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]),
                          jnp.asarray(tokens["token_type_ids"]))
  np.testing.assert_allclose(np.asarray(hidden), expected.numpy(), atol=1e-4, rtol=0)


def test_new_head_is_zero_and_pretrained_weights_loaded(minilm):
  model, params = minilm
  flat = param_groups.flatten(params)
  assert not np.any(flat["head/kernel"]) and flat["head/kernel"].shape == (384, 3)
  tensors = safetensors_io.load_safetensors(assets.model_dir("minilm-l6"))
  np.testing.assert_array_equal(
      flat["encoder/layers/5/attention/query/kernel"],
      tensors["encoder.layer.5.attention.self.query.weight"].T)
  batch = {"input_ids": jnp.ones((2, 8), jnp.int32), "attention_mask": jnp.ones((2, 8), jnp.int32),
           "token_type_ids": jnp.zeros((2, 8), jnp.int32)}
  assert np.all(np.asarray(model.apply(params, batch, train=False)) == 0)


def test_every_checkpoint_tensor_is_mapped_except_pooler_and_buffers():
  tensors = safetensors_io.load_safetensors(assets.model_dir("minilm-l6"))
  unmapped = sorted(n for n in tensors if bert_hub.hf_name_to_path(n) is None)
  assert unmapped == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]


def _small_checkpoint(tmp_path, drop=(), reshape=()):
  """Saves a small random BERT in HF naming to tmp_path; returns its config."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = bert.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16,
                           max_position_embeddings=16)
  (tmp_path / "config.json").write_text(
      '{"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,'
      ' "intermediate_size": 16, "max_position_embeddings": 16, "model_type": "bert"}')
  module = bert.SequenceClassifier(config, num_classes=2, rngs=nnx.Rngs(0))
  flat = param_groups.flatten(nnx.to_pure_dict(nnx.split(module)[1]))
  paths = {}
  names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
           "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
           "embeddings.LayerNorm.bias"]
  for part in ("query", "key", "value"):
    names += [f"encoder.layer.0.attention.self.{part}.weight",
              f"encoder.layer.0.attention.self.{part}.bias"]
  for prefix in ("encoder.layer.0.attention.output", "encoder.layer.0.intermediate",
                 "encoder.layer.0.output"):
    names += [f"{prefix}.dense.weight", f"{prefix}.dense.bias"]
  for prefix in ("encoder.layer.0.attention.output", "encoder.layer.0.output"):
    names += [f"{prefix}.LayerNorm.weight", f"{prefix}.LayerNorm.bias"]
  rng = np.random.default_rng(0)
  for name in names:
    path, transform = bert_hub.hf_name_to_path(name)
    shape = transform(np.zeros(flat[path].shape)).shape
    paths[name] = rng.normal(size=shape).astype(np.float32)
  for name in drop:
    del paths[name]
  for name, shape in reshape:
    paths[name] = np.zeros(shape, np.float32)
  paths["pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  save_file(paths, str(tmp_path / "model.safetensors"))
  return paths


def test_loader_reports_unused_tensors_and_keeps_new_head(tmp_path):
  tensors = _small_checkpoint(tmp_path)
  model, params = models.create(_model_config(pretrained=str(tmp_path), num_classes=2), seed=0)
  flat = param_groups.flatten(params)
  np.testing.assert_array_equal(flat["encoder/layers/0/intermediate/kernel"],
                                tensors["encoder.layer.0.intermediate.dense.weight"].T)
  module = bert.SequenceClassifier(bert.BertConfig.from_json(str(tmp_path / "config.json")),
                                   num_classes=2, rngs=nnx.Rngs(0))
  fresh = nnx.to_pure_dict(nnx.split(module)[1])
  _, report = bert_hub.loading.load_tensors(
      fresh, safetensors_io.load_safetensors(str(tmp_path)), bert_hub.hf_name_to_path,
      source=str(tmp_path), dont_load=["head/.*"])
  assert report.unexpected == ["pooler.dense.weight"]
  assert report.missing == ["head/bias", "head/kernel"]


def test_loader_fails_on_shape_mismatch_naming_the_tensor(tmp_path):
  _small_checkpoint(tmp_path, reshape=[("encoder.layer.0.attention.self.key.weight", (8, 4))])
  with pytest.raises(WeightsError, match=r"encoder\.layer\.0\.attention\.self\.key\.weight.*"
                                         r"\(8, 4\).*encoder/layers/0/attention/key/kernel"):
    models.create(_model_config(pretrained=str(tmp_path), num_classes=2), seed=0)


def test_loader_fails_on_missing_tensor_naming_the_parameter(tmp_path):
  _small_checkpoint(tmp_path, drop=["encoder.layer.0.output.LayerNorm.bias"])
  with pytest.raises(WeightsError, match="encoder/layers/0/output_norm/bias"):
    models.create(_model_config(pretrained=str(tmp_path), num_classes=2), seed=0)


def test_missing_or_corrupt_weights_file_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"hidden_size": 8, "num_attention_heads": 2}')
  with pytest.raises(WeightsError, match="weights file not found: .*model.safetensors"):
    models.create(_model_config(pretrained=str(tmp_path)), seed=0)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(WeightsError, match="cannot read safetensors file"):
    models.create(_model_config(pretrained=str(tmp_path)), seed=0)


def test_random_encoder_of_the_configured_architecture():
  arch = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=16)
  _, params = models.create(_model_config(pretrained="", arch=arch), seed=0)
  flat = param_groups.flatten(params)
  assert flat["encoder/embeddings/word_embeddings/embedding"].shape == (100, 32)
  assert flat["encoder/layers/2/intermediate/kernel"].shape == (32, 64)
  assert "encoder/layers/3/intermediate/kernel" not in flat
  with pytest.raises(ConfigError, match="config.model.arch: hidden_size 30 is not divisible "
                     "by num_attention_heads 4"):
    models.create(_model_config(pretrained="", arch=dict(arch, hidden_size=30)), seed=0)

"""Meshes, axis rules and parameter shardings; sharded training equals one device.

Runs on the 8 fake CPU devices of tests/conftest.py.
"""

import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from conftest import with_overrides
from ftjax import build, data, param_groups, sharding, tasks, trainer
from ftjax import config as ftjax_config
from ftjax.data import inputs as inputs_lib
from ftjax.data import registry
from ftjax.errors import ConfigError

MESHES = [dict(data=8), dict(fsdp=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]
STEPS = 3


def _mesh_config(**sizes):
  config = ftjax_config.defaults().mesh
  config.data = 1
  config.update(sizes)
  return config


@pytest.fixture
def llama_debug_config(data_dir):
  from configs import smollm2_chat  # pylint: disable=g-import-not-at-top
  return with_overrides(smollm2_chat.get_config("debug"), **{"data.data_dir": data_dir,
                                                     "samples.count": 0})


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  """Preference pairs of prompts and completions of a few lengths."""
  path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
  with open(path, "w") as f:
    for i in range(48):
      f.write(json.dumps({"prompt": f"Review {i}: it was", "chosen": " good" * (1 + i % 4),
                          "rejected": " bad" * (1 + i % 3)}) + "\n")
  return str(path)


def _pair_config(kind, data_dir, pairs_file):
  """DPO on the tiny decoder, or a reward model on the tiny encoder, of pairs_file."""
  from configs import reward_model, smollm2_preference  # pylint: disable=g-import-not-at-top
  module = smollm2_preference if kind == "dpo" else reward_model
  return with_overrides(module.get_config("debug,peft=full,batch_size=8"), **{
      "data.data_dir": data_dir, "data.files.train": pairs_file})


def test_mesh_sizes_fill_the_rest_and_reject_mismatches():
  assert sharding.mesh_shape(_mesh_config(data=-1, tensor=2), 8) == (4, 1, 2)
  assert sharding.mesh_shape(_mesh_config(fsdp=8), 8) == (1, 8, 1)
  with pytest.raises(ConfigError, match=r"data=2 x fsdp=2 x tensor=1\) has 4 devices, but the "
                     r"run has 8"):
    sharding.mesh_shape(_mesh_config(data=2, fsdp=2), 8)
  with pytest.raises(ConfigError, match="other axes \\(3 devices\\) do not divide the 8"):
    sharding.mesh_shape(_mesh_config(data=-1, tensor=3), 8)
  config = ftjax_config.defaults()
  with pytest.raises(ConfigError, match="only one axis may be -1"):
    ftjax_config.validate(with_overrides(config, **{"mesh.data": -1, "mesh.fsdp": -1}))
  with pytest.raises(ConfigError, match="config.mesh.tensor=0"):
    ftjax_config.validate(with_overrides(config, **{"mesh.tensor": 0}))
  with config.unlocked():
    config.mesh.pipeline = 2
  with pytest.raises(ConfigError, match="config.mesh.pipeline: unknown key"):
    ftjax_config.validate(config)


def test_axis_rules_name_what_is_wrong():
  with pytest.raises(ConfigError, match="\\('mlp', 'model'\\) names unknown mesh axes \\['model'\\]"):
    sharding.Rules.from_config([("mlp", "model")])
  with pytest.raises(ConfigError, match="unknown logical axis 'hidden'"):
    sharding.Rules.from_config([("hidden", "fsdp")])
  with pytest.raises(ConfigError, match="'embed' has two rules"):
    sharding.Rules.from_config([("embed", "fsdp"), ("embed", None)])


def test_spec_replicates_dimensions_an_axis_cannot_split():
  mesh = sharding.make_mesh(_mesh_config(fsdp=4, tensor=2))
  rules = sharding.Rules.from_config(sharding.DEFAULT_RULES)
  assert rules.spec(("embed", "mlp"), (384, 1536), mesh) == P("fsdp", "tensor")
  assert rules.spec(("embed", "classes"), (384, 2), mesh) == P("fsdp")
  assert rules.spec(("embed", "mlp"), (6, 1536), mesh) == P(None, "tensor")  # 6 % 4
  assert rules.spec(("embed", "embed"), (8, 8), mesh) == P("fsdp")  # fsdp used once
  assert rules.spec(("norm",), (384,), mesh) == P()
  assert rules.batch_axes(mesh) == ("data", "fsdp")


def _built(config, **mesh_sizes):
  mesh = sharding.make_mesh(_mesh_config(**mesh_sizes))
  rules = sharding.Rules.from_config(config.axis_rules)
  return build.build(config, mesh, rules, total_steps=10, abstract=True)


def _specs(tree):
  return {path: tuple(leaf.sharding.spec) for path, leaf in param_groups.flatten(tree).items()}


def test_bert_parameters_and_adam_moments_are_sharded_as_the_rules_say(debug_config):
  built = _built(debug_config, fsdp=4, tensor=2)
  specs = _specs(built.state.params)
  assert specs["encoder/embeddings/word_embeddings/embedding"] == ("tensor", "fsdp")
  assert specs["encoder/layers/0/attention/query/kernel"] == ("fsdp", "tensor")
  assert specs["encoder/layers/0/attention/output/kernel"] == ("tensor", "fsdp")
  assert specs["encoder/layers/3/intermediate/kernel"] == ("fsdp", "tensor")
  assert specs["encoder/layers/3/output/kernel"] == ("tensor", "fsdp")
  assert specs["encoder/layers/0/attention/query/bias"] == ("tensor",)
  assert specs["encoder/layers/0/output_norm/scale"] == ()
  assert specs["head/kernel"] == ("fsdp",)  # 2 classes stay whole
  moments = [s for s in jax.tree.leaves(built.state.opt_state)
             if s.shape == (384, 1536)]
  assert moments and all(tuple(m.sharding.spec) == ("fsdp", "tensor") for m in moments)
  assert all(s.sharding.spec == P() for s in jax.tree.leaves(built.state.opt_state)
             if s.shape == ())
  # Each device holds an eighth of the big matrices.
  assert sharding.local_bytes(built.state.params) < 0.2 * sum(
      x.size * 4 for x in jax.tree.leaves(built.state.params))


def test_adapter_factors_and_quantized_kernels_follow_their_kernel(debug_config):
  lora = _built(with_overrides(debug_config, **{"peft.method": "dora"}), fsdp=4, tensor=2)
  specs = _specs(lora.state.params)
  assert specs["encoder/layers/0/attention/query/lora_a"] == ("fsdp",)
  assert specs["encoder/layers/0/attention/query/lora_b"] == (None, "tensor")
  assert specs["encoder/layers/0/attention/query/lora_magnitude"] == ("tensor",)
  frozen = _specs(lora.frozen)
  assert frozen["encoder/layers/0/attention/query/kernel"] == ("fsdp", "tensor")
  qlora = _built(with_overrides(debug_config, **{"peft.method": "qlora", "peft.quant": "int8"}),
                 fsdp=4, tensor=2)
  frozen = _specs(qlora.frozen)
  assert frozen["encoder/layers/0/attention/key/kernel/codes"] == ("fsdp",)
  assert frozen["encoder/layers/0/attention/key/kernel/scale"] == ("tensor",)
  nf4 = _specs(_built(with_overrides(debug_config, **{"peft.method": "qlora"}), fsdp=8).frozen)
  assert nf4["encoder/layers/0/intermediate/kernel/codes"] == ("fsdp",)
  assert nf4["encoder/layers/0/intermediate/kernel/absmax"] == ("fsdp",)


def test_quantizing_randomly_initialised_weights_needs_arrays(llama_debug_config):
  with pytest.raises(ConfigError, match="computed on the host"):
    _built(with_overrides(llama_debug_config, **{"peft.method": "qlora"}), fsdp=8)


def test_llama_parameters_are_sharded_as_the_rules_say(llama_debug_config):
  specs = _specs(_built(with_overrides(llama_debug_config, **{"peft.method": "full"}),
                        fsdp=4, tensor=2).state.params)
  assert specs["model/embed_tokens/embedding"] == ("tensor", "fsdp")
  assert specs["model/layers/0/self_attn/q_proj/kernel"] == ("fsdp", "tensor")
  assert specs["model/layers/0/self_attn/k_proj/kernel"] == ("fsdp", "tensor")
  assert specs["model/layers/1/mlp/down_proj/kernel"] == ("tensor", "fsdp")
  assert specs["model/norm/scale"] == ()


def test_batch_not_divisible_by_the_batch_parallel_size_is_refused(debug_config, tmp_path):
  config = with_overrides(debug_config, **{"mesh.data": 4, "mesh.fsdp": 2, "grad_accum_steps": 2})
  with pytest.raises(ConfigError, match=r"config.batch_size=8 is not divisible by the "
                     r"batch-parallel size \(8 = .*\) times grad_accum_steps \(2\)"):
    trainer.run(config, str(tmp_path))


# --- a few steps on each mesh equal the same steps on one device -------------------------

class _CompileCounter(logging.Handler):
  def __init__(self):
    super().__init__()
    self.train_steps = 0

  def emit(self, record):
    if "Compiling" in record.getMessage() and "train_step" in record.getMessage():
      self.train_steps += 1


def _host_batches(config):
  """The first STEPS training batches of `config`'s data, as host arrays."""
  inputs = inputs_lib.build(config)
  iterator = data.train_iterator(inputs.splits["train"], inputs.preprocess,
                                 batch_size=config.batch_size, seed=config.seed,
                                 num_epochs=None, shard_index=0, shard_count=1)
  return [next(iterator) for _ in range(STEPS)]


def _batch_spec(config):
  return registry.batch_spec(registry.check(config)[0].kind, config.data)


def _steps(config, batches, mesh_sizes, devices):
  """Builds the state on a mesh of `devices` and trains on `batches`;
  (losses, params, train-step compilations, parameter specs)."""
  config = with_overrides(config, **{f"mesh.{k}": v
                                     for k, v in _mesh_config(**mesh_sizes).items()})
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.Rules.from_config(config.axis_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  try:
    with jax.log_compiles(True):
      built = build.build(config, mesh, rules, total_steps=10)
      train, _ = build.jit_steps(built, tasks.get(config, mesh, rules), config, rules,
                                 batch_sharding)
      step = train.lower(built.state, built.frozen,
                         build.abstract_batch(_batch_spec(config), config.batch_size,
                                              batch_sharding)).compile()
      state, losses = built.state, []
      for batch in batches:
        state, metrics = step(state, built.frozen, jax.device_put(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
  finally:
    logger.removeHandler(counter)
  return losses, jax.device_get(state.params), counter.train_steps, _specs(state.params)


@pytest.fixture(scope="module")
def _reference_cache():
  return {}


# Decoder families other than Llama, on the debug config's tiny architecture: Gemma 3
# (sandwich norms, q/k norms, local and global layers), Phi-3 (fused projections) and
# GPT-2 (LayerNorms, learned positions, a plain MLP, biases).
_DECODER_ARCHS = {
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=16,
                   sliding_window_pattern=2, query_pre_attn_scalar=16),
    "phi3": dict(model_type="phi3", sliding_window=16),
    "gpt2": dict(model_type="gpt2"),
}
# An encoder family other than BERT: a random RoBERTa (positions after the padding token)
# reading MiniLM's tokenizer.
_ROBERTA = {"model.pretrained": "", "data.tokenizer": "minilm-l6",
            "model.arch": dict(model_type="roberta", vocab_size=30522, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=40,
                               type_vocab_size=1, pad_token_id=0)}
# DeBERTa-v3's attention: relative positions in log buckets through the shared projections.
_DEBERTA = {"model.name": "deberta_classifier", "model.pretrained": "",
            "data.tokenizer": "minilm-l6",
            "model.arch": dict(model_type="deberta-v2", vocab_size=30522, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, relative_attention=True,
                               position_buckets=8, norm_rel_ebd="layer_norm",
                               share_att_key=True, pos_att_type="p2c|c2p",
                               position_biased_input=False)}


def _case_id(case):
  model, mesh_sizes = case
  return f"{'-'.join(f'{k}{v}' for k, v in mesh_sizes.items())}-{model}"


@pytest.mark.parametrize("case", [(model, mesh) for model in ("bert", "llama")
                                  for mesh in MESHES]
                         + [(model, dict(fsdp=4, tensor=2))
                            for model in [*_DECODER_ARCHS, "roberta", "deberta", "dpo",
                                          "reward"]],
                         ids=_case_id)
def test_sharded_steps_equal_one_device(case, debug_config, llama_debug_config, data_dir,
                                        pairs_file, _reference_cache):
  model, mesh_sizes = case
  if model in ("dpo", "reward"):  # pair batches [B, 2, L] read as [2B, L] rows
    config = _pair_config(model, data_dir, pairs_file)
  elif model in ("bert", "roberta", "deberta"):
    config = debug_config if model == "bert" else with_overrides(
        debug_config, **(_ROBERTA if model == "roberta" else _DEBERTA))
  else:
    config = with_overrides(llama_debug_config, **{"peft.method": "full"})
  if model in _DECODER_ARCHS:
    config = with_overrides(config, **{"model.arch": {**config.model.arch.to_dict(),
                                                      **_DECODER_ARCHS[model]}})
  if model not in _reference_cache:
    batches = _host_batches(config)
    _reference_cache[model] = batches, _steps(config, batches, dict(data=1),
                                              jax.devices()[:1])
  batches, (ref_losses, ref_params, _, _) = _reference_cache[model]
  losses, params, compiles, specs = _steps(config, batches, mesh_sizes, jax.devices())
  # Float32 sums in another order: losses within 1e-5 relative, parameters within 1e-6.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  flat, ref_flat = param_groups.flatten(params), param_groups.flatten(ref_params)
  for path, value in flat.items():
    np.testing.assert_allclose(value, ref_flat[path], rtol=0, atol=1e-6, err_msg=path)
  assert compiles == 1
  mesh = sharding.make_mesh(_mesh_config(**mesh_sizes))
  rules = sharding.Rules.from_config(config.axis_rules)
  expected = sharding.param_shardings(ref_params, config_model_axes(model), rules, mesh)
  assert specs == {p: tuple(s.spec) for p, s in param_groups.flatten(expected).items()}


def config_model_axes(model):
  from ftjax.models import bert, deberta, llama  # pylint: disable=g-import-not-at-top
  if model == "deberta":
    return deberta.PARAM_AXES
  return bert.PARAM_AXES if model in ("bert", "roberta", "reward") else llama.PARAM_AXES


# --- a checkpoint written on one mesh resumes on another ----------------------------------

class _Stop(Exception):
  pass


def _stop_after(step):
  def on_step(current):
    if current == step:
      raise _Stop
  return on_step


def _state(workdir, step):
  path = workdir / "checkpoints" / str(step) / "state"
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(str(path.absolute())))


def _train_losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_checkpoints_resume_across_meshes(llama_debug_config, tmp_path, capfd):
  """fsdp=8 on 8 devices -> data=4 on 4 devices -> 1 device equals 1 device throughout."""
  config = with_overrides(llama_debug_config, **{
      "total_steps": 6, "checkpoint.every": 2, "log_every": 1, "checkpoint.use_async": False,
      "eval_at_start": False, "eval_every": 6})  # one evaluation: at the end
  on = lambda **sizes: with_overrides(config, **{f"mesh.{k}": v
                                        for k, v in _mesh_config(**sizes).items()})
  reference = tmp_path / "reference"
  trainer.run(on(data=1), str(reference), devices=jax.devices()[:1])

  moved = tmp_path / "moved"
  with pytest.raises(_Stop):
    trainer.run(on(fsdp=8), str(moved), on_step=_stop_after(2))
  with pytest.raises(_Stop):
    trainer.run(on(data=4), str(moved), on_step=_stop_after(4), devices=jax.devices()[:4])
  assert "resumed from step 2" in capfd.readouterr().out
  trainer.run(on(data=1), str(moved), devices=jax.devices()[:1])
  assert "resumed from step 4" in capfd.readouterr().out

  # Float32 sums in another order on each mesh: within 1e-5 relative / 1e-6 absolute.
  losses, expected = _train_losses(moved), _train_losses(reference)
  assert sorted(losses) == sorted(expected) == list(range(1, 7))
  np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-5)
  state, want = param_groups.flatten(_state(moved, 6)), param_groups.flatten(_state(reference, 6))
  assert state.keys() == want.keys()
  for path, value in state.items():
    np.testing.assert_allclose(value, want[path], rtol=1e-5, atol=1e-6, err_msg=path)

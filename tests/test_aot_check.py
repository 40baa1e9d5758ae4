"""launch/aot_check.py: the steps compiled ahead of time for a mesh of fake devices."""

import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from launch import aot_check

_LLAMA = "configs/smollm2_chat.py:debug"
# EWC (the second stage of continual fine-tuning) adds the anchor and the Fisher step;
# the run that `init_from` names is not read to compile. Packed batches for the train and
# eval steps, one example per row for the Fisher step.
_BERT_EWC = "configs/minilm_sentiment.py:debug,regularizer=ewc,strength=1,init_from=/stage_a"
_MESHES = {
    "data8": ["--config.mesh.data=8"],
    "fsdp8": ["--config.mesh.data=1", "--config.mesh.fsdp=8"],
    "fsdp4_tensor2": ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"],
}
# (config, mesh, extra flags): every run the tests below read, started together.
_RUNS = {
    ("llama", "data8"): (_LLAMA, ["--memory_per_device=16GiB"]),
    ("llama", "fsdp8"): (_LLAMA, []),
    ("llama", "fsdp4_tensor2"): (_LLAMA, ["--memory_per_device=1MiB"]),
    ("bert_ewc", "fsdp8"): (_BERT_EWC, ["--config.data.packing=on"]),
}
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _run(*args: str) -> subprocess.CompletedProcess:
  # The script sets its own device count; the 8 devices of this process's XLA_FLAGS
  # must not decide it.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "aot_check.py"), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.fixture(scope="module")
def runs():
  """{(model, mesh): finished run}; two at a time (compiling is single-threaded)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {key: pool.submit(_run, f"--config={config}", "--topology=cpu:8",
                                *_MESHES[key[1]], *extra)
               for key, (config, extra) in _RUNS.items()}
    return {key: future.result() for key, future in futures.items()}


def _state_row(stdout: str, row: str) -> tuple[float, float]:
  """(per device, whole model) bytes of a row of the report's state table."""
  size = r"(\d[\d.]*) (B|KiB|MiB|GiB|TiB)"
  match = re.search(rf"^{re.escape(row)}\s+{size}\s+{size}$", stdout, re.MULTILINE)
  assert match, f"no row {row!r} in:\n{stdout}"
  values = match.groups()
  return (float(values[0]) * _UNITS[values[1]], float(values[2]) * _UNITS[values[3]])


def _parameters(stdout: str) -> tuple[float, float]:
  trainable, frozen = (_state_row(stdout, "trainable parameters"),
                       _state_row(stdout, "frozen parameters"))
  return trainable[0] + frozen[0], trainable[1] + frozen[1]


def test_fsdp_keeps_an_eighth_of_the_parameters_on_each_device(runs):
  data, fsdp = runs[("llama", "data8")], runs[("llama", "fsdp8")]
  assert data.returncode == 0, data.stderr[-3000:]
  assert fsdp.returncode == 0, fsdp.stderr[-3000:]
  assert "mesh: data=1 x fsdp=8 x tensor=1 over 8 cpu devices" in fsdp.stdout
  # Only norms (and other small vectors) stay whole on every device; the report
  # rounds to three digits.
  per_device, whole = _parameters(data.stdout)
  assert per_device == whole > 0
  assert 0.12 <= _parameters(fsdp.stdout)[0] / per_device < 1 / 7, fsdp.stdout


def test_fsdp_shards_a_fully_fine_tuned_encoder_its_optimizer_state_and_ewc_anchor(runs):
  result = runs[("bert_ewc", "fsdp8")]
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ("trainable parameters", "optimizer state", "regularizer anchor"):
    per_device, whole = _state_row(result.stdout, row)
    assert 0.12 <= per_device / whole < 1 / 7, result.stdout
  # The anchor holds the starting weights and their Fisher weights: twice the parameters.
  anchor, params = (_state_row(result.stdout, row)[1]
                    for row in ("regularizer anchor", "trainable parameters"))
  assert anchor == pytest.approx(2 * params, rel=0.01)
  assert re.search(r"^compiled step, per device.*train step\s+eval step\s+EWC Fisher step$",
                   result.stdout, re.MULTILINE), result.stdout


def test_report_has_the_compiled_memory_of_both_steps(runs):
  result = runs[("llama", "data8")]
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh: data=8 x fsdp=1 x tensor=1 over 8 cpu devices (--topology=cpu:8)" in out
  header = re.search(r"^compiled step, per device.*train step\s+eval step$", out, re.MULTILINE)
  assert header, out
  for row in ("arguments", "outputs", "aliased", "temporaries", "generated code",
              "peak estimate", "lower + compile seconds"):
    assert re.search(rf"^{re.escape(row)}", out, re.MULTILINE), f"no {row!r} row in:\n{out}"
  # XLA compiles the CPU steps whole: no kernel of its own is called.
  assert re.search(r"^kernels \(custom calls\)\s+none\s+none$", out, re.MULTILINE), out
  assert re.search(r"^fits: the (train|eval) step's peak estimate .* of 16 GiB per device$", out,
                   re.MULTILINE), out


def test_tensor_parallel_mesh_compiles_and_a_small_limit_fails_clearly(runs):
  result = runs[("llama", "fsdp4_tensor2")]
  assert result.returncode == aot_check.EXIT_DOES_NOT_FIT, result.stderr[-3000:]
  assert "mesh: data=1 x fsdp=4 x tensor=2 over 8 cpu devices" in result.stdout
  assert "peak estimate" in result.stdout  # the report comes before the verdict
  message = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      r"error: does not fit: the (train|eval) step's peak estimate is \d.* per device, \d+% of "
      r"--memory_per_device=1MiB \(1 MiB\) on mesh data=1 x fsdp=4 x tensor=2; biggest "
      r"contributors: .*temporaries.*", message), message
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--topology=gpu:8"], "error: --topology='gpu:8': expected cpu:N"),
    (["--topology=cpu:8", "--config.mesh.fsdp=3"],
     "error: config.mesh (data=-1 x fsdp=3 x tensor=1): the other axes (3 devices) do not "
     "divide the 8 devices"),
    (["--topology=cpu:8", "--memory_per_device=16 parsecs"],
     "error: --memory_per_device='16 parsecs': expected a positive size"),
])
def test_bad_flags_fail_before_compiling(flags, message):
  result = _run(f"--config={_LLAMA}", *flags)
  assert result.returncode == 1
  assert message in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: the TPU topology would compile")
def test_tpu_topology_without_libtpu_says_so_and_suggests_cpu():
  result = _run(f"--config={_LLAMA}", "--topology=v5e:2x2")
  assert result.returncode == 1
  assert "error: --topology=v5e:2x2: JAX cannot describe this TPU topology" in result.stderr
  assert "libtpu" in result.stderr and "--topology=cpu:N" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.tpu_compile
@pytest.mark.parametrize("attention", ["auto", "splash"])
def test_a_tpu_slice_compiles_the_splash_kernel_per_device(attention):
  """The TPU compiler, on this machine: the decoder's attention (auto: splash on TPU) is
  the Mosaic kernel, run per device over batch and heads (a kernel the compiler cannot
  split)."""
  if importlib.util.find_spec("libtpu") is None:
    message = "needs libtpu: make test-tpu-compile installs it beside .venv"
    if os.environ.get("FTJAX_REQUIRE_LIBTPU"):
      pytest.fail(message)
    pytest.skip(message)
  result = _run(f"--config={_LLAMA}", "--topology=v5e:2x4", "--config.mesh.data=2",
                "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                f"--config.model.attention={attention}", "--memory_per_device=16GiB")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh: data=2 x fsdp=2 x tensor=2 over 8 TPU v5 lite devices (--topology=v5e:2x4)" in out
  assert re.search(r"^kernels \(custom calls\)\s+tpu_custom_call\s+tpu_custom_call$", out,
                   re.MULTILINE), out
  assert re.search(r"^XLA peak_memory_in_bytes\s+\d", out, re.MULTILINE), out


@pytest.mark.parametrize("text,expected", [
    ("16GiB", 16 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5 GiB", 3 * 2**29), ("4096", 4096), ("10 kb", 10_000)])
def test_parse_bytes(text, expected):
  assert aot_check.parse_bytes(text) == expected




def _with_arch(config, **arch):
  """`config` with `model.arch` (a random model of that Hugging Face config) and FSDP over
  8 devices."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.pretrained = ""
    config.model.arch = arch
    config.mesh.data, config.mesh.fsdp = 1, 8
  config.lock()
  return config


@pytest.mark.parametrize("family", ["roberta", "mistral"])
def test_new_families_compile_sharded_ahead_of_time(family):
  from configs import minilm_sentiment, smollm2_chat  # pylint: disable=g-import-not-at-top
  if family == "roberta":  # positions after the padding token, one token type
    config = _with_arch(minilm_sentiment.get_config("debug"), model_type="roberta",
                        vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1)
  else:  # a sliding window shorter than the rows
    config = _with_arch(smollm2_chat.get_config("debug"), model_type="mistral",
                        vocab_size=49152, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=32, tie_word_embeddings=True)
  report, failure = aot_check.check(config, "cpu:8", "1GiB")
  assert failure is None, report
  per_device, whole = _parameters(report)
  assert per_device < whole / 4  # FSDP: each device holds a share of the parameters


def test_a_dpo_run_compiles_its_reference_step_ahead_of_time():
  from configs import smollm2_preference  # pylint: disable=g-import-not-at-top
  config = smollm2_preference.get_config("debug,peft=full,batch_size=8")
  with config.unlocked():  # named, not read: the check compiles from the config alone
    config.data.files.train = "pairs.jsonl"
    config.mesh.data, config.mesh.fsdp = 1, 8
  report, failure = aot_check.check(config, "cpu:8", "1GiB")
  assert failure is None, report
  header = next(line for line in report.splitlines() if line.startswith("compiled step"))
  assert header.split()[-6:] == ["train", "step", "eval", "step", "reference", "step"]
  per_device, whole = _parameters(report)
  assert per_device < whole / 4

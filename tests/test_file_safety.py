"""Loading files never runs code from them: no unrestricted unpickling, no remote code,
no modules imported from checkpoint or data folders."""

import io
import json
import os
import re
import tokenize

import pytest

from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import DataError

from conftest import REPO

# (pattern, the only files allowed to use it, why there)
_FORBIDDEN = [
    (r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|\bshelve\b|\bmarshal\.loads?\(", None,
     "unrestricted unpickling runs code"),
    (r"pickle\.Unpickler\b", ("ftjax/hub/torch_pickle.py",),
     "the restricted unpickler (state dicts only; every other global refused)"),
    (r"\btorch\.load\(", None, "torch.load unpickles; ftjax reads .pth with torch_pickle"),
    (r"allow_pickle\s*=\s*True", None, "numpy object arrays unpickle"),
    (r"trust_remote_code\s*=\s*True", None, "would run code shipped with a model"),
    (r"\byaml\.(load|unsafe_load|full_load)\(|yaml\.(Full|Unsafe)?Loader\b", None,
     "only yaml.SafeLoader"),
    (r"(?<![\w.])(eval|exec)\(", None, "no code from strings"),
    (r"spec_from_file_location|__import__\(|importlib\.import_module\(",
     ("ftjax/sweeps/study.py", "ftjax/data/registry.py", "ftjax/hub/assets.py"),
     "study and config files the user names; the packaged preset modules; the packages "
     "that assemble a model shipped in parts"),
]


def _sources():
  for top in ("ftjax", "launch", "configs"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(root, name)
          with open(path) as f:
            yield os.path.relpath(path, REPO), f.read()


def _code_matches(pattern, text):
  """Line numbers where `pattern` matches outside comments and string literals."""
  lines = text.splitlines(keepends=True)
  offsets = [0]
  for line in lines:
    offsets.append(offsets[-1] + len(line))
  prose = [(offsets[t.start[0] - 1] + t.start[1], offsets[t.end[0] - 1] + t.end[1])
           for t in tokenize.generate_tokens(io.StringIO(text).readline)
           if t.type in (tokenize.COMMENT, tokenize.STRING)]
  return [text[:m.start()].count("\n") + 1 for m in re.finditer(pattern, text)
          if not any(start <= m.start() < end for start, end in prose)]


@pytest.mark.parametrize("pattern, allowed, why", _FORBIDDEN, ids=[w for *_, w in _FORBIDDEN])
def test_no_code_path_runs_code_from_files(pattern, allowed, why):
  del why
  found = [f"{path}:{line}" for path, text in _sources() if path not in (allowed or ())
           for line in _code_matches(pattern, text)]
  assert not found, found


def test_the_scan_sees_code_but_not_prose():
  text = ('"""Never pickle.load( here."""\nx = 1  # eval(x) is not run\n'
          'data = pickle.load(f)\ny = eval("1")\n')
  assert _code_matches(_FORBIDDEN[0][0], text) == [3]
  assert _code_matches(_FORBIDDEN[6][0], text) == [4]


def test_a_tokenizer_folder_with_custom_code_is_not_run(tmp_path):
  marker = tmp_path / "ran"
  (tmp_path / "evil.py").write_text(
      f"open({str(marker)!r}, 'w').close()\n"
      "from transformers import PreTrainedTokenizerFast\n"
      "class EvilTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]},
       "tokenizer_class": "EvilTokenizer"}))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises((DataError, ValueError)):
    tokenizer_lib.load_hf_tokenizer(str(tmp_path))
  assert not marker.exists()

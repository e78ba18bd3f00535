"""The package's import graph: the library never imports the tasks, and nothing imports
itself back.

`gensar_tasks` (tasks/) registers SeqIO tasks built from the library, the way a T5X user's
task module builds on T5X; the library reaches the tasks only through gin (`import
gensar_tasks` in the run files), so the library can be used, tested and served without
them. A cycle between modules makes import order matter and hides which module owns an
idea, so any cycle fails here, whether the import is at module level or inside a function.
"""
import ast
import os
from typing import Dict, List, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"gensar_jax": "gensar_jax", "gensar_tasks": "tasks"}


def module_files() -> Dict[str, str]:
  """Module name -> file path, for every module of both packages."""
  modules = {}
  for package, folder in PACKAGES.items():
    root = os.path.join(REPO, folder)
    for directory, _, files in os.walk(root):
      for name in files:
        if not name.endswith(".py"):
          continue
        relative = os.path.relpath(os.path.join(directory, name), root)[:-3].split(os.sep)
        if relative[-1] == "__init__":
          relative = relative[:-1]
        modules[".".join([package] + relative)] = os.path.join(directory, name)
  return modules


def imported_modules(path: str, module: str, known: Set[str]) -> Set[str]:
  """The project modules `module` imports anywhere in its file (functions included)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import submodule` depends on the submodule (a package's own `__init__`
      # importing its submodules is how packages are written, not a cycle); `from module
      # import name` on the module.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
               for alias in node.names]
    else:
      continue
    for name in names:
      # `import a.b.c` depends on the deepest project module it names.
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module:
        found.add(name)
  return found


def import_graph() -> Dict[str, Set[str]]:
  files = module_files()
  known = set(files)
  return {module: imported_modules(path, module, known) for module, path in files.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """One representative cycle per strongly connected component of more than one module."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  on_stack: Set[str] = set()
  found: List[List[str]] = []

  def visit(node: str) -> None:  # Tarjan; the graph has a few hundred nodes
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for child in sorted(graph.get(node, ())):
      if child not in index:
        visit(child)
        low[node] = min(low[node], low[child])
      elif child in on_stack:
        low[node] = min(low[node], index[child])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_dotted_imports_resolve_to_project_modules(tmp_path):
  source = tmp_path / "mod.py"
  source.write_text("from . import sibling\nimport gensar_jax.data.records\n"
                    "def f():\n  from gensar_tasks import prompts\n", encoding="utf-8")
  known = {"gensar_jax.data", "gensar_jax.data.sibling", "gensar_jax.data.records",
           "gensar_tasks", "gensar_tasks.prompts"}
  assert imported_modules(str(source), "gensar_jax.data.mod", known) == {
      "gensar_jax.data.sibling", "gensar_jax.data.records", "gensar_tasks.prompts"}


def test_the_library_never_imports_the_tasks_package():
  offenders = sorted(f"{module} imports {target}"
                     for module, targets in import_graph().items()
                     if module.startswith("gensar_jax")
                     for target in targets if target.startswith("gensar_tasks"))
  assert offenders == []


def test_no_import_cycle():
  assert cycles(import_graph()) == []

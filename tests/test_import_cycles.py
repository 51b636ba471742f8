"""The import graph of ``avpt`` has no cycle: every ``import`` statement counts, the ones inside
functions too (a deferred import hides a loop, it does not remove it), and importing
``pkg.sub`` counts as importing the package ``pkg`` (its ``__init__`` runs first) unless the
importer lives inside ``pkg``."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package: str) -> Dict[str, str]:
    mods = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return mods


def _imports(mod: str, path: str, mods: Dict[str, str]) -> Set[str]:
    """The modules of ``mods`` that ``mod`` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    named = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_package else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # ``from pkg import sub`` imports the module pkg.sub
                sub = f"{target}.{alias.name}"
                named.add(sub if sub in mods else target)
    edges = set()
    for name in named:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            # a package's own parents are already being imported when it runs
            if prefix in mods and prefix != mod and (prefix == name or not mod.startswith(prefix + ".")):
                edges.add(prefix)
    return edges


def import_cycles(package: str) -> List[List[str]]:
    """The strongly connected components (more than one module) of ``package``'s import graph."""
    mods = _modules(package)
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_avpt_has_no_import_cycle():
    assert import_cycles("avpt") == []


def test_the_cycle_finder_finds_a_deferred_cycle(tmp_path, monkeypatch):
    """A loop made of one top-level and one in-function import is found (the walker is not
    blind to deferred imports)."""
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    assert import_cycles("loopy") == [["loopy.a", "loopy.b"]]


def test_cli_choices_come_from_their_owners():
    """No literal lists in the CLI: --dataset/--modality/--backend/--amp/--compile offer what the
    owners define."""
    from avpt_kernels.backend import BACKENDS

    from avpt.cli import build_parser
    from avpt.compiled_step import COMPILE_MODES
    from avpt.recipes import RECIPE_NAMES
    from avpt.data import DATASETS, MODALITIES
    from avpt.runtime import AMP_MODES

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.choices}
    assert choices == {"dataset": DATASETS, "modality": MODALITIES, "backend": BACKENDS,
                       "amp": AMP_MODES, "compile": COMPILE_MODES, "recipe": RECIPE_NAMES}

"""The code's shape: no import cycle among the modules of ``avpt`` and ``avpt_kernels`` (read
with ``ast``: the imports a module runs when it is imported, and also those inside its
functions), and no source file over 500 lines.
"""
import ast
import os
import sys
from typing import Dict, Iterator, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("avpt", "avpt_kernels")
MAX_LINES = 500
# Files still over MAX_LINES, each with the reason and who shrinks it. The list only shrinks:
# an entry whose file is gone or back under the limit fails below, so whoever splits the file
# removes its line here.
KNOWN_LONG: Dict[str, str] = {}


def _python_files(*folders: str) -> List[str]:
    """Repository-relative paths of the .py files under ``folders`` (sorted)."""
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            found += [os.path.relpath(os.path.join(dirpath, f), ROOT)
                      for f in filenames if f.endswith(".py")]
    return sorted(found)


def _module_name(path: str) -> str:
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """The import statements that run when the module is imported: at module level, in
    module-level ``if``/``try``/``with`` blocks and class bodies; not in functions (they run
    when called) and not under ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *[h.body for h in node.handlers]):
                yield from _import_time_nodes(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _import_time_nodes(node.body)


def _with_parents(name: str) -> List[str]:
    """``a.b.c`` -> [a, a.b, a.b.c]: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _all_import_nodes(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """Every import statement, those inside functions included."""
    for stmt in body:
        yield from (n for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))


def import_graph(paths: List[str], inside_functions: bool = False) -> Dict[str, Set[str]]:
    """module -> the modules of ``paths`` that importing it runs (directly), or with
    ``inside_functions`` that it imports anywhere. A module's own packages are left out (they
    are already being imported when it runs)."""
    modules = {_module_name(p): p for p in paths}
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        package = module if is_package else module.rpartition(".")[0]
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        nodes = _all_import_nodes if inside_functions else _import_time_nodes
        for node in nodes(tree.body):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            own = set(_with_parents(module))
            for target in targets:
                for name in _with_parents(target):
                    if name in modules and name not in own:
                        graph[module].add(name)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with a cycle (depth-first, Tarjan), as sorted lists."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]


def test_the_import_graph_reads_relative_imports_and_runs_the_packages_first():
    graph = import_graph(_python_files(*PACKAGES))
    assert "avpt.losses" in graph["avpt.methods.base"]                    # from ..losses import
    assert "avpt.methods.avpt.anatomy" in graph["avpt.methods.avpt.loss"]  # from .anatomy import
    assert "avpt.methods.avpt" in graph["avpt.methods"]                    # from . import avpt
    # a module never depends on its own packages (they are mid-import when it runs)
    assert "avpt.methods" not in graph["avpt.methods.avpt.model"]


def test_the_import_graph_sees_a_cycle_through_an_import_inside_a_function(tmp_path, monkeypatch):
    """A loop made of one top-level and one in-function import is found with
    ``inside_functions`` (the walker is not blind to deferred imports), and only then."""
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    files = _python_files("loopy")
    assert find_cycles(import_graph(files, inside_functions=True)) == [["loopy.a", "loopy.b"]]
    assert find_cycles(import_graph(files)) == []


def test_no_import_cycle_in_avpt_or_avpt_kernels():
    cycles = find_cycles(import_graph(_python_files(*PACKAGES)))
    assert not cycles, "import cycles (module-level imports): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_import_cycle_counting_imports_inside_functions():
    cycles = find_cycles(import_graph(_python_files(*PACKAGES), inside_functions=True))
    assert not cycles, "import cycles (imports inside functions included): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_python_file_over_500_lines():
    lengths = {}
    for path in _python_files("avpt", "avpt_kernels", "benchmarks", "tests"):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            lengths[path.replace(os.sep, "/")] = sum(1 for _ in f)
    too_long = {p: n for p, n in lengths.items() if n > MAX_LINES and p not in KNOWN_LONG}
    assert not too_long, f"files over {MAX_LINES} lines (split them): {too_long}"
    # the known exceptions only shrink: a split file leaves the list
    stale = [p for p in KNOWN_LONG if lengths.get(p, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): remove from KNOWN_LONG: {stale}"


if __name__ == "__main__":  # prints the cycles, if any
    for cycle in find_cycles(import_graph(_python_files(*PACKAGES))):
        print(" <-> ".join(cycle))
    pytest.main([__file__, "-q"])

"""The package's layout: no import cycle between its modules.

Every ``import`` and ``from ... import`` of a module of ``mambaprune`` inside another, at module level or inside
a function (a lazy import hides a cycle, it does not remove it), is an edge of a graph read from the source with
:mod:`ast`; the graph must have no cycle. ``from package import name`` is an edge to the submodule
``package.name`` when there is one, else to the package's ``__init__``. A package's ``__init__`` is not taken as
imported implicitly by its submodules (Python runs it first, but that order is not a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mambaprune"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_names(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}``; a package is named by its folder (its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` (at ``path``) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]      # the package relative imports start from
    found = set()

    def add(target: str) -> None:
        # the longest prefix of ``target`` that is a module of the package (``a.b.name`` -> ``a.b``)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; a module importing
    itself counts too."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The checker on a made-up package: a cycle closed by an import inside a function is found, and
    ``from . import sub`` / ``from .pkg import name`` resolve to the right modules."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .sub.b import B\nA = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\nB = 2\n\ndef f():\n    from ..a import A\n    return A\n")
    (pkg / "sub" / "c.py").write_text("from . import b\nfrom toy.sub import b as again\n")
    graph = import_graph(pkg, "toy")
    assert graph == {"toy": {"toy.a"}, "toy.a": {"toy.sub.b"}, "toy.sub": set(), "toy.sub.b": {"toy.a"},
                     "toy.sub.c": {"toy.sub.b"}}
    assert cycles(graph) == [["toy.a", "toy.sub.b"]]
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    assert cycles(import_graph(pkg, "toy")) == []


def test_no_import_cycle_in_the_package():
    """Loading depends on the model and never the reverse (``models.checkpoints`` imports ``models.mamba_lm``,
    which imports nothing of it), and so for every other pair of modules."""
    graph = import_graph()
    assert "mambaprune.models.mamba_lm" in graph["mambaprune.models.checkpoints"]
    assert cycles(graph) == []

"""The import graph of mcf, read from the source (nothing is imported): no circle anywhere, and no
import pointing up the layers of README's "Layout" section.

Every import between mcf's modules counts, those inside functions and under ``TYPE_CHECKING``
included: a function-level import ties two modules together as surely as a top-level one, and moving
an import into a function is how a circle hides.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder → the package it installs as (setup.py's package_dir: kernels/ is mcf.kernels)
SOURCES = {"mcf": ROOT / "mcf", "mcf.kernels": ROOT / "kernels"}

# Lowest first. A module may import its own layer and those below, never one above. A module's layer
# is that of the longest prefix naming it; every package's command-line entry point (``cli``,
# ``__main__``) sits on top, where the commands are wired together.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mcf.errors", "mcf.fileio", "mcf.logs", "mcf.threads", "mcf.dist", "mcf.serialization", "mcf.configtree",
     "mcf.measure"),
    ("mcf.kernels",),
    ("mcf.models", "mcf.losses"),
    ("mcf.compat",),
    ("mcf.data.core",),
    ("mcf.data.formats",),
    ("mcf.data.loaders", "mcf.data.tools"),
    ("mcf.data",),
    ("mcf.config",),
    ("mcf.train",),
    ("mcf.downstream", "mcf.bench"),
    ("mcf",),
)
ENTRY_POINTS = ("cli", "__main__")


def find_modules(sources: dict[str, Path]) -> dict[str, Path]:
    """Dotted name → file of every module under ``sources`` (a package is named by its folder)."""
    out = {}
    for package, folder in sources.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """``(dotted name, line)`` of everything ``module`` imports, wherever the import statement sits;
    ``from a import b`` gives ``a.b`` (``b`` may be a submodule), relative imports made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def import_graph(sources: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module → {imported mcf module: first line}; an imported name resolves to the deepest module
    that holds it. Imports of one's own parent packages are left out (Python runs them anyway)."""
    mods = find_modules(sources)
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        for name, line in imported_names(m, path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m and not m.startswith(name + "."):
                graph[m].setdefault(name, line)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, targets = work[-1]
            w = next(targets, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``; entry points are above every layer."""
    if module.rpartition(".")[2] in ENTRY_POINTS:
        return len(LAYERS)
    best, rank = "", -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, rank = p, i
    return rank


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """``a:line -> b`` for every import of a module in a higher layer than the importer's."""
    return [
        f"{a}:{line} -> {b} (layer {layer_of(a)} imports layer {layer_of(b)})"
        for a, targets in sorted(graph.items())
        for b, line in sorted(targets.items())
        if layer_of(b) > layer_of(a)
    ]


@pytest.fixture(scope="module")
def graph():
    return import_graph(SOURCES)


def test_no_import_circle(graph):
    found = circles(graph)
    tied = [f"{a} -> {b} (line {graph[a][b]})" for comp in found for a in comp for b in graph[a] if b in comp]
    assert not found, "import circle(s):\n" + "\n".join(tied)


def test_every_module_has_a_layer(graph):
    """Only the root package and the entry points fall through to the top: a new module or package
    must be placed in LAYERS (and README's map), not land on top unnoticed."""
    assert len(graph) > 100  # the walk found the package
    unplaced = [m for m in graph if layer_of(m) == len(LAYERS) - 1 and m != "mcf"]
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"


def test_no_upward_import(graph):
    bad = upward_imports(graph)
    assert not bad, "imports pointing up the layers (README, Layout):\n" + "\n".join(bad)


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The walk itself: a function-level import closing a circle, a relative import and an upward
    one are all found (so a clean graph above means a clean package, not a blind walk)."""
    pkg = tmp_path / "mcf"
    (pkg / "data" / "core").mkdir(parents=True)
    (pkg / "train").mkdir()
    for d in (pkg, pkg / "data", pkg / "data" / "core", pkg / "train"):
        (d / "__init__.py").write_text("")
    (pkg / "data" / "core" / "a.py").write_text("from . import b\n")
    (pkg / "data" / "core" / "b.py").write_text("def f():\n    from mcf.data.core.a import x\n")
    (pkg / "data" / "core" / "c.py").write_text("if True:\n    import mcf.train.t\n")
    (pkg / "train" / "t.py").write_text("from mcf.data.core import c\n")
    g = import_graph({"mcf": pkg})
    expected = [("mcf.data.core.a", "mcf.data.core.b"), ("mcf.data.core.c", "mcf.train.t")]
    assert sorted(map(tuple, circles(g))) == expected
    assert upward_imports(g) == ["mcf.data.core.c:2 -> mcf.train.t (layer 4 imports layer 9)"]

"""The import graph of ``service/``: no cycles, and the layers point one way.

Every module under ``service/`` is parsed with :mod:`ast` (nothing is imported), every import
statement in it (module level or inside a function: a lazy import is still a dependency) becomes
an edge to the ``service`` module it names, and the graph is checked:

* no cycle between modules (strongly connected components of more than one module, or a module
  importing itself), reported with one concrete cycle;
* layering: ``service.core`` (the pure algorithm core) imports nothing from ``service`` outside
  ``service.core``; ``service.alignment`` imports only itself and ``service.core``; the adapters
  (:data:`ADAPTERS`) are imported by neither.

Edges: ``import a.b`` -> ``a.b``; ``from a.b import c`` -> ``a.b.c`` when that is a module, else
``a.b`` (the name comes from the package's ``__init__``). Parent packages are not edges (they are
executed on the way, but depending on ``service.alignment.model`` is not depending on
``service.alignment``'s ``__init__``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "service"
ADAPTERS = ("service.wire", "service.streaming", "service.rpc", "service.observability")

# --------------------------------------------------------------------------- graph
def _modules(root: Path = ROOT / PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file in the package (packages included)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str | None:
    if level == 0:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: {service modules it imports}}`` (see the module docstring for the edges)."""
    modules = _modules() if modules is None else modules
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, name, is_pkg)
                if base is None:
                    continue
                from_init = False
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:
                        targets.append(sub)
                    else:
                        from_init = True
                if from_init:
                    targets.append(base)
            for t in targets:
                # "import a.b.c" of a non-module attribute path: the longest module prefix
                while t and t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and (t == PACKAGE or t.startswith(PACKAGE + ".")):
                    graph[name].add(t)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative), each a set of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The cyclic components: more than one module, or a module importing itself."""
    return [c for c in strongly_connected(graph)
            if len(c) > 1 or next(iter(c)) in graph[next(iter(c))]]


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest concrete cycle ``[a, b, ..., a]`` through ``min(component)``."""
    start = min(component)
    prev: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:  # BFS inside the component, back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# --------------------------------------------------------------------------- tests
def test_graph_sees_the_package():
    g = import_graph()
    assert "service.core.selector" in g and "service.core.budget" in g["service.core.selector"]
    assert len(g) > 40


def test_no_import_cycles():
    g = import_graph()
    found = cycles(g)
    assert not found, "import cycles: " + "; ".join(" -> ".join(one_cycle(g, c)) for c in found)


def test_core_imports_only_core():
    g = import_graph()
    bad = {m: sorted(t for t in deps if not _in(t, "service.core"))
           for m, deps in g.items() if _in(m, "service.core")}
    assert not {m: d for m, d in bad.items() if d}


def test_core_depends_on_numpy_and_torch_only():
    """Third-party imports of ``service.core`` (module level or lazy): numpy and torch, nothing
    else; the standard library and ``service.core`` itself are free."""
    allowed = {"numpy", "torch", "__future__", "service"} | set(sys.stdlib_module_names)
    bad = []
    for name, path in _modules().items():
        if not _in(name, "service.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            bad += [f"{name}: {t}" for t in tops if t not in allowed]
    assert not bad, bad


def test_alignment_imports_only_itself_and_core():
    g = import_graph()
    bad = {m: sorted(t for t in deps if not (_in(t, "service.alignment") or _in(t, "service.core")))
           for m, deps in g.items() if _in(m, "service.alignment")}
    assert not {m: d for m, d in bad.items() if d}


def test_adapters_are_not_imported_by_core_or_alignment():
    g = import_graph()
    bad = [(m, t) for m, deps in g.items()
           if _in(m, "service.core") or _in(m, "service.alignment")
           for t in deps if any(_in(t, a) for a in ADAPTERS)]
    assert not bad


def test_checker_finds_cycles_and_layer_breaks(tmp_path):
    """The checks above on a synthetic package, so a green run means something."""
    pkg = tmp_path / PACKAGE
    for rel, src in {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from service.core import b\n",
        "core/b.py": "def f():\n    from service.wire.c import x\n",  # lazy import counts
        "wire/__init__.py": "",
        "wire/c.py": "from ..core.a import y\nx = 1\n",  # relative import resolved
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(src)
    g = import_graph(_modules(pkg))
    assert g["service.core.a"] == {"service.core.b"}
    assert g["service.core.b"] == {"service.wire.c"}
    assert g["service.wire.c"] == {"service.core.a"}
    (comp,) = cycles(g)
    assert comp == {"service.core.a", "service.core.b", "service.wire.c"}
    cyc = one_cycle(g, comp)
    assert cyc[0] == cyc[-1] and set(cyc) == comp and len(cyc) == 4
    assert all(b in g[a] for a, b in zip(cyc, cyc[1:], strict=False))  # consecutive edges

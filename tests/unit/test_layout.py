"""Codebase layout rules (issue 12): the benchmarks build their selectors in one place
(``service/perfbench/fixtures.py``), nothing edits ``sys.path``, the performance harness has no
import cycle, and no two package modules share a file name."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "service" / "perfbench" / "fixtures.py"
SKIP_DIRS = {".git", "node_modules", "__pycache__", "build", "dist"}
# sys.path.insert/append/extend/remove/clear, sys.path[...] = ..., sys.path = / += ...,
# site.addsitedir
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend|remove|clear|pop)\s*\(|"
                           r"(\[[^\]]*\])?\s*\+?=(?!=))|site\.addsitedir\s*\(")


def _py_files(*tops: Path) -> list[Path]:
    out = []
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                           and not d.startswith("venv")]
            out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def test_benchmarks_build_selectors_only_through_the_fixtures():
    offenders = []
    for p in _py_files(ROOT / "service" / "perfbench", ROOT / "loadtests"):
        if p == FIXTURES:
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"\b(StreamingSelector|SelectorConfig)\(", line):
                offenders.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "build selectors with service.perfbench.fixtures.build_selector:\n" + \
        "\n".join(offenders)
    assert "StreamingSelector(model, cfg" in FIXTURES.read_text()


def test_the_sys_path_pattern_catches_edits_and_not_reads():
    for edit in ("sys.path.insert(0, ROOT)", "sys.path.append(x)", "sys.path[:0] = [x]",
                 "sys.path = [x]", "sys.path += [x]", "site.addsitedir(p)"):
        assert SYS_PATH_EDIT.search(edit), edit
    for read in ("if ROOT not in sys.path:", "x == sys.path", "print(sys.path)"):
        assert not SYS_PATH_EDIT.search(read), read


def test_nothing_in_the_repository_edits_sys_path():
    offenders = []
    for p in _py_files(ROOT):
        if p == Path(__file__).resolve():
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if SYS_PATH_EDIT.search(line):
                offenders.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "import packages normally instead:\n" + "\n".join(offenders)


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports, at any depth (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:
                out |= {f"{package}.{a.name}" for a in node.names}
            elif node.module.startswith(package + "."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(package + ".")}
    return out


def test_the_performance_harness_has_no_import_cycle():
    pkg = "service.perfbench"
    mods = {f"{pkg}.{p.stem}": p for p in (ROOT / "service" / "perfbench").glob("*.py")
            if p.stem != "__init__"}
    graph = {m: _imports(p, pkg) & set(mods) for m, p in mods.items()}
    assert graph[f"{pkg}.perf"] >= {f"{pkg}.fixtures", f"{pkg}.peers"}  # the rule sees imports

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"import cycle through {cycles}"


def test_no_two_package_modules_share_a_file_name():
    seen: dict[str, list[str]] = {}
    for p in _py_files(ROOT / "service"):
        rel = p.relative_to(ROOT)
        if p.name == "__init__.py" or "gen" in rel.parts:
            continue
        seen.setdefault(p.name, []).append(str(rel))
    dupes = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dupes, dupes

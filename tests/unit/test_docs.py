"""The README documents every setting and every exported metric (so neither drifts silently);
docstrings cite the papers by keys listed in the References; no hard-coded machine paths."""

import ast
import functools
import re
import subprocess
from dataclasses import fields
from pathlib import Path

from prometheus_client import CollectorRegistry

from service.observability.metrics import PairsieveMetrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
REFERENCES = (ROOT / "docs" / "references.md").read_text()
# a citation key: "[MMAL]", "[CoreSet]"; not "list[Pick]", "x[:, 0]", "[0, 1]" or a "[link](url)"
CITATION = re.compile(r"(?<![\w\]\[])\[([A-Z][A-Za-z0-9]+)\](?!\()")


def test_every_setting_is_documented():
    missing = [Settings.env_name(f.name) for f in fields(Settings)
               if f"`{Settings.env_name(f.name)}`" not in README]
    assert not missing, f"README lacks settings: {missing}"


def test_every_metric_is_documented():
    reg = CollectorRegistry()
    PairsieveMetrics(reg)
    names = [m.name + ("_total" if m.type == "counter" else "") for m in reg.collect()]
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, f"README lacks metrics: {missing}"


def test_readme_quick_start_is_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick


@functools.lru_cache(maxsize=1)
def _git_ignored() -> frozenset[Path]:
    """Files and folders git ignores (what a local run left, e.g. a failed chaos run's worker
    logs in ``reports/reliability.logs/``): not the repository's. Empty without git."""
    try:
        out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard",
                              "--directory"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(ROOT / line.rstrip("/") for line in out.splitlines() if line)


def _text_files(*tops: Path):
    """Every text file under ``tops`` (a file or a folder), binary files (a NUL byte) and what
    git ignores skipped."""
    ignored = _git_ignored()
    for top in tops:
        for p in sorted([top] if top.is_file() else top.rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts:
                continue
            if p in ignored or any(parent in ignored for parent in p.parents):
                continue
            data = p.read_bytes()
            if b"\0" not in data:
                yield p, data.decode("utf-8", errors="replace")


def _listed_keys(text: str) -> set[str]:
    """Keys of a references table: the first cell of each row, "| `[KEY]` | ..."."""
    return set(re.findall(r"^\| `\[([A-Za-z0-9]+)\]` \|", text, flags=re.MULTILINE))


def _cited_keys() -> dict[str, set[str]]:
    """``{key: files}`` of every citation key in the docstrings under ``service/``."""
    out: dict[str, set[str]] = {}
    for p in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for key in CITATION.findall(ast.get_docstring(node) or ""):
                    out.setdefault(key, set()).add(str(p.relative_to(ROOT)))
    return out


def test_the_citation_pattern():
    text = "see [MMAL] §4 and [BMMAL] eq. 14; list[Pick], x[:, 0], [0, 1], [Link](url), [8]"
    assert CITATION.findall(text) == ["MMAL", "BMMAL"]


def test_nothing_cites_papers_by_file_number():
    stale = "paper" + " 00"  # spelled apart so that this file does not match itself
    offenders = [f"{p.relative_to(ROOT)}:{n}" for top in ("service", "README.md", "docs", "reports")
                 for p, text in _text_files(ROOT / top)
                 for n, line in enumerate(text.splitlines(), 1) if stale in line.lower()]
    assert not offenders, f"cite the paper's key from docs/references.md instead: {offenders}"


def test_every_cited_key_is_in_the_references():
    cited = _cited_keys()
    listed = _listed_keys(REFERENCES)
    assert {"MMAL", "BMMAL", "VeCAF", "DUS", "CoreSet", "BADGE"} <= set(cited)  # the scan works
    missing = {k: sorted(v) for k, v in cited.items() if k not in listed}
    assert not missing, f"cited but not in docs/references.md: {missing}"


def test_the_readme_references_list_the_same_keys():
    assert "## References" in README and "(docs/references.md)" in README
    readme = _listed_keys(README.split("## References", 1)[1].split("\n## ", 1)[0])
    assert readme and readme == _listed_keys(REFERENCES)


def test_no_machine_specific_absolute_paths():
    # /work/ anywhere in the package; /work/ and /tmp/ in what users read and run (the container
    # paths in deploy/ are the image's own, not the build machine's)
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
                 for top, pat in (("service", r"/work/"), ("README.md", r"/work/|/tmp/"),
                                  ("docs", r"/work/|/tmp/"), ("Makefile", r"/work/|/tmp/"),
                                  ("loadtests", r"/work/|/tmp/"), ("scripts", r"/work/|/tmp/"),
                                  ("examples", r"/work/|/tmp/"), ("reports", r"/work/|/tmp/"),
                                  ("deploy", r"/work/"))
                 for p, text in _text_files(ROOT / top)
                 for n, line in enumerate(text.splitlines(), 1) if re.search(pat, line)]
    assert not offenders, "\n".join(offenders)


def test_settings_table_is_current():
    # the README's table is Settings.markdown_table(): variable, flag, default and meaning of
    # every setting, the same text `pairsieve serve --help` prints
    assert Settings.markdown_table() in README, (
        "README's settings table is stale; regenerate it with "
        "python -c 'from service.settings import Settings; print(Settings.markdown_table())'")


def test_architecture_doc_names_only_files_and_symbols_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"(service/[\w/]+(?:\.py|/))", text))
    assert len(paths) > 25  # the scan found the map
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    # "file.py  Symbol" pairs on the event path: the symbol is defined in that file
    named = re.findall(r"(service/[\w/]+\.py)  ([A-Z]\w+|[a-z_]+\w*)\b", text)
    assert len(named) >= 5
    for path, symbol in named:
        body = (ROOT / path).read_text()
        assert re.search(rf"^\s*(class|def|async def) {symbol}\b|^{symbol} = ", body, re.M) or \
            f"def {symbol.split('.')[-1]}" in body, f"{symbol} is not defined in {path}"

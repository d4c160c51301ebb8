"""Fixtures of the deploy tests: the Prometheus tools (``promtool``, ``prometheus``).

They come from Debian's ``prometheus`` package (``make deploy-tools`` installs it). A missing
tool FAILS the test with that hint; these tests are never skipped silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in /usr/bin (Debian's package), else None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/bin") / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _require(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH or in /usr/bin: run `make deploy-tools` "
                    f"(apt-get install -y prometheus) to install promtool and prometheus",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool`` (fails with a `make deploy-tools` hint when missing)."""
    return _require("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """Path of the ``prometheus`` server binary (fails with a `make deploy-tools` hint)."""
    return _require("prometheus")

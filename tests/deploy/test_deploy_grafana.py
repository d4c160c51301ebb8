"""Static checks of deploy/grafana: the committed dashboard JSON is what build_dashboards.py
produces now, every panel has a query, and the provisioning files point at the right places."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


def load_builder():
    spec = importlib.util.spec_from_file_location("pairsieve_build_dashboards",
                                                  GRAFANA / "build_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_dashboards_are_fresh():
    b = load_builder()
    built = b.build()
    assert set(built) == {"pairsieve-overview.json", "pairsieve-selection-quality.json"}
    for name, text in built.items():
        path = GRAFANA / "dashboards" / name
        assert path.exists(), f"{path} missing: run python deploy/grafana/build_dashboards.py"
        assert path.read_text() == text, (f"{path} is stale: run "
                                          f"python deploy/grafana/build_dashboards.py")
    res = subprocess.run([sys.executable, str(GRAFANA / "build_dashboards.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_dashboards_are_well_formed():
    b = load_builder()
    for name in b.DASHBOARDS:
        dash = json.loads((GRAFANA / "dashboards" / name).read_text())
        assert dash["uid"] and dash["title"].startswith("pairsieve")
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            assert p["targets"], f"{name}: panel {p['title']!r} has no query"
            for t in p["targets"]:
                assert "pairsieve_" in t["expr"] or t["expr"].startswith("count(up"), t["expr"]
                assert '$job' in t["expr"] and '$instance' in t["expr"], t["expr"]
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        variables = {v["name"] for v in dash["templating"]["list"]}
        assert {"datasource", "job", "instance"} <= variables


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"].startswith("http")
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pairsieve.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

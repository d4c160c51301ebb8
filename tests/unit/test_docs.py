"""The README documents every setting and every exported metric (so neither drifts silently)."""

from dataclasses import fields
from pathlib import Path

from prometheus_client import CollectorRegistry

from service.observability.metrics import PairsieveMetrics
from service.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


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


def test_settings_table_is_current():
    # the README's table is Settings.markdown_table(): variable, flag, default and meaning of
    # every setting, the same text `pairsieve serve --help` prints
    assert Settings.markdown_table() in README, (
        "README's settings table is stale; regenerate it with "
        "python -c 'from service.settings import Settings; print(Settings.markdown_table())'")

"""Every peer of `pairsieve bench` section 2 (the real libraries, installed by `make install`)
runs on a tiny stream and is compared with pairsieve; a missing library fails here loudly
instead of becoming a silent "not runnable" row in reports/perf.md."""

from __future__ import annotations

import pytest

from service.perfbench import peers

pytestmark = pytest.mark.slow


def test_every_default_peer_runs_and_gets_a_ratio(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    res = peers.run(n_items=512, d=96, reps=1, cap_s=0.2, log=lambda s: None)
    rows = {r["key"]: r for r in res["rows"]}
    expected = {p.key for p in peers.default_peers(False)}
    assert set(rows) == expected
    broken = {k: r["reason"] for k, r in rows.items() if not r["runnable"]}
    assert not broken, f"peers not runnable: {broken}"
    for key, r in rows.items():
        assert r["items_per_s"]["median"] > 0, key
        assert 0.0 <= r["accept_rate"] <= 1.0, key
        assert r["pairsieve_ratio"] > 0, key
    assert rows["pairsieve-b256"]["pairsieve_ratio"] == pytest.approx(1.0)
    assert {"river", "modal", "apricot-c256", "skactiveml-vu", "skactiveml-dbal"} <= set(rows)
    assert res["verdict"]["evaluated"] and res["verdict"]["best_same"]["key"] in rows
    text = "\n".join(peers.render(res))
    assert "not runnable" not in text and "river" in text

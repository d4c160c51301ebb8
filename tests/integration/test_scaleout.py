"""Scale-out: two `pairsieve serve` workers in one consumer group (loadtests/scaleout.py, small).

Both configurations of the measurement script run on the session broker: two workers that follow
each other's selections (``PAIRSIEVE_FOLLOW_SELECTIONS=1``) and two that do not (baseline).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.scaleout import ScaleoutParams, run_configs

pytestmark = pytest.mark.integration


def test_two_workers_decide_each_event_once_and_share_their_selections(tansu_broker, tmp_path):
    """150 near-duplicate pairs, the two copies of each on partitions owned by different workers,
    the second copy produced 2 s after the first.

    Asserted for both configurations (correctness, not tuning):

    * every produced event was decided by exactly one worker: the workers' ``seen`` counts
      (gRPC GetStatus) add up to the events produced, and no request id appears twice on the
      requests topic (nor one that was never produced);
    * both workers got partitions and decided (and accepted) something; every partition's
      requests came from one worker (no rebalance during the measurement);
    * every worker shut down cleanly on SIGTERM.

    That the selections are shared is asserted in two ways. The direct, deterministic one: with
    followers each worker's ``budget_spent`` (GetStatus, which is current; the
    ``pairsieve_budget_spent`` gauge is only refreshed when the worker decides a batch, so it can
    lag behind the folded remote selections) equals the number of requests on the topic, i.e.
    includes the other worker's accepts; without followers it equals the worker's own accepts.
    The effect the issue asks for: the double-accept rate (both copies of a pair accepted, among
    pairs with an accept) is strictly lower with followers than without. The stream holds one
    modality, so the utility is diversity only (the uncertainty term has nothing to score against),
    and the 2 s gap is well above the follower's fold-in lag on tansu (~0.5-1 s, fetch long-poll):
    measured 0 of ~80 pairs with followers vs ~0.25 without, so the comparison has a wide margin at
    this size; it would get noisy only if the box stalled for seconds.
    """
    params = ScaleoutParams(pairs=150, chunk=50, gap_s=2.0, warmup_per_partition=30)
    results = run_configs(tansu_broker.bootstrap, params, ("followers", "baseline"),
                          log_dir=str(tmp_path), progress=print)
    assert set(results) == {"followers", "baseline"}
    for name, r in results.items():
        ctx = f"{name}: {r}"
        assert r["unique_request_ids"] == r["requests"], ctx  # no event requested twice
        assert r["unknown_request_ids"] == 0, ctx
        assert r["every_event_decided_once"], ctx
        assert r["decided_total"] == r["events_produced"], ctx
        assert len(r["assignment"]) == 2 and all(r["assignment"].values()), ctx
        assert all(s["seen"] > 0 and s["accepted"] > 0 for s in r["status"].values()), ctx
        assert sorted(r["accepted_per_worker"]) == sorted(r["status"]), ctx
        assert r["assignment_matches_topic"], ctx
        assert r["pairs_on_different_workers"] == 1.0, ctx
        assert r["pairs_with_an_accept"] > 0, ctx
        assert all(code == 0 for code in r["exit_codes"].values()), ctx
        for wid in r["exit_codes"]:  # each logged the signal before its shutdown
            log_text = (Path(r["log_dir"]) / f"{wid}.log").read_text(errors="replace")
            assert "SIGTERM received: shutting down" in log_text, wid

    f, b = results["followers"], results["baseline"]
    assert f["budget_spent_equals_total_requests"], f["status"]
    assert b["budget_spent_equals_own_accepts"], b["status"]
    assert not b["budget_spent_equals_total_requests"], b["status"]
    assert f["double_accept_rate"] < b["double_accept_rate"], (f, b)

"""The closing rule of the adaptive micro-batches (service/streaming/take.py); the behaviour on
a broker is in tests/integration/test_adaptive_take.py; the record bound under poison."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.settings import Settings
from service.streaming.app import faust_app
from service.streaming.take import AdaptiveStream, RefusedShare, close_batch, record_target


@pytest.mark.parametrize("size,seen,elapsed,closes", [
    (0, 0, 9.0, False),   # nothing yet: keep waiting (the first event starts the clock)
    (5, 3, 0.01, False),  # still growing, young
    (5, 5, 0.01, True),   # nothing new since the last check: the inflow paused
    (5, 3, 1.0, True),    # open for the whole time bound
    (10, 9, 0.0, True),   # full
])
def test_close_batch_rule(size, seen, elapsed, closes):
    assert close_batch(size, 10, seen, elapsed, 1.0) is closes


def test_the_idle_gap_must_fit_in_the_time_bound():
    app = faust_app(Settings.from_env({}), "127.0.0.1:1")  # nothing connects: no start
    stream = app.stream(app.channel())
    assert isinstance(stream, AdaptiveStream)

    async def go():
        await stream.take_until_idle(10, within=0.1, idle=0.2).__anext__()

    with pytest.raises(ValueError, match=r"need 0 < idle <= within, got idle=0.2, within=0.1"):
        asyncio.run(go())


def test_record_target_keeps_the_valid_part_full_without_spilling():
    assert record_target(256, 0.0) == 256  # nothing refused: the configured bound
    assert record_target(256, 0.5) == record_target(256, 0.9) == 512  # capped at twice
    assert record_target(1, 0.3) == 1
    rng = np.random.default_rng(0)
    for p in (0.02, 0.1, 0.25, 0.4):
        r = record_target(256, p)
        valid = rng.binomial(r, 1.0 - p, size=20_000)
        # at least as full as under the plain bound (256 (1 - p) valid on average), and from
        # 10 % refused on more than half of the lost slots won back ...
        assert valid.mean() >= 256 * (1.0 - p) - 0.5
        if p >= 0.1:
            assert valid.mean() > 256 * (1.0 - p) + 0.5 * 256 * p
        # ... and a batch spills past 256 valid events rarely (two standard deviations)
        assert (valid > 256).mean() < 0.05, (p, r)
    targets = [record_target(256, p / 100) for p in range(0, 101)]
    assert targets == sorted(targets)  # more refused, more records


@pytest.mark.parametrize("max_items,share,match", [
    (0, 0.1, r"max_items must be >= 1, got 0"),
    (256, -0.1, r"refused_share must be in \[0, 1\], got -0.1"),
    (256, float("nan"), r"refused_share must be in \[0, 1\], got nan"),
])
def test_record_target_rejects_bad_input(max_items, share, match):
    with pytest.raises(ValueError, match=match):
        record_target(max_items, share)


def test_refused_share_follows_recent_batches():
    r = RefusedShare(weight=0.5)
    assert r.share == 0.0
    r.observe(10, 100)
    assert r.share == pytest.approx(0.05)
    for _ in range(30):
        r.observe(20, 100)
    assert r.share == pytest.approx(0.2)
    for _ in range(30):
        r.observe(0, 100)  # the poison stopped: back to the plain bound
    assert record_target(256, r.share) == 256
    with pytest.raises(ValueError, match=r"refused=5, records=3"):
        r.observe(5, 3)
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\], got 0"):
        RefusedShare(weight=0)

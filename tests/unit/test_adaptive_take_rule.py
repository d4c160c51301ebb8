"""The closing rule of the adaptive micro-batches (service/streaming/take.py); the behaviour on
a broker is in tests/integration/test_adaptive_take.py."""

from __future__ import annotations

import asyncio

import pytest

from service.settings import Settings
from service.streaming.app import faust_app
from service.streaming.take import AdaptiveStream, close_batch


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

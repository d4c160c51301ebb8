"""A worker whose view of the shared budget is already over the total (another worker's accept
raced its own: README, Scale-out) keeps deciding every event: skips, logged, nothing spent."""

from __future__ import annotations

import asyncio
import copy

from service.alignment import AlignmentTrainer
from service.core.budget import BudgetConfig
from service.core.selector import SelectorConfig, StreamingSelector
from service.handlers import SelectionHandler
from service.messages import IncomingEvent
from tests.support import DIMS, data_and_model


class _Log:
    def __init__(self):
        self.requests, self.decisions = [], []

    async def publish_requests(self, requests):
        self.requests += list(requests)

    async def publish_decisions(self, outcomes, decided_at):
        self.decisions += [o.event_id for o in outcomes]


def _handler(pub, worker_id):
    _, _, model = data_and_model()
    cfg = SelectorConfig(index_size=128, cache_capacity=64,
                         budget=BudgetConfig(total=6, target_rate=0.5, min_history=8, window=64,
                                             explore=0.0, warmup_accepts=4))
    sel = StreamingSelector(copy.deepcopy(model), cfg, seed=0, device="cpu")
    return SelectionHandler(sel, AlignmentTrainer(DIMS, seed=0), pub, None, worker_id=worker_id,
                            retrain_every=1000, validation_share=0.0)


def _events(a, b, lo, hi):
    return [IncomingEvent(event_id=f"ev-{i}", item_id=f"i{i}", modality="image" if i % 2 == 0
                          else "text", vector=(a if i % 2 == 0 else b)[i].copy(),
                          event_time=None, source="test") for i in range(lo, hi)]


def test_a_worker_over_the_total_keeps_deciding_and_logging():
    a, b, _ = data_and_model()
    mine, other = _Log(), _Log()
    h, o = _handler(mine, "w-me"), _handler(other, "w-other")

    async def body():
        await h.submit(_events(a, b, 0, 8))  # spends part of the budget here
        outs = await o.submit(_events(a, b, 100, 140))  # the other worker spends all of its own
        remote = [x for x in outs if x.decision.accept]
        for x in remote:  # ... and this worker folds them all in: over the total
            i = int(x.event_id[3:])
            await h.observe_remote_selection(x, (a if i % 2 == 0 else b)[i].copy())
        st = h.status()
        assert st.spent > st.budget_total
        spent, n_req = st.spent, len(mine.requests)
        later = await h.submit(_events(a, b, 200, 260))
        assert len(later) == 60 and not any(x.decision.accept for x in later)
        assert {x.decision.reason for x in later} == {"skip:budget_exhausted"}
        assert h.status().spent == spent and len(mine.requests) == n_req
        assert set(mine.decisions) >= {f"ev-{i}" for i in range(200, 260)}

    try:
        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        h.close()
        o.close()

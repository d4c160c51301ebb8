"""Stateful property test of one budget shared by two workers through the budget ledger.

A hypothesis ``RuleBasedStateMachine`` drives two real :class:`~service.handlers.SelectionHandler`
workers that publish into one in-memory requests topic and reserve on one in-memory
:class:`~service.core.budget_ledger.BudgetLedger` (reservations applied in call order, as the
one-partition topic orders them). Each worker reads the other's requests only when a ``follow``
rule says so (or its publish fence reads them back), so its view of the spend is arbitrarily
stale: the race that let two workers overshoot the total. Rules: fresh batches on either worker,
an event redelivered to either worker whether or not that one has read the other's requests, a
reservation that fails (written to the ledger or not), following, and a crash of either worker
(rebuilt from the requests topic, another holder on the ledger, which survives it as the topic
does).

Checked after every step: the requests topic never holds more distinct event ids than the total,
every requested id holds a unit on the ledger, no event id is requested twice, and neither worker
counts more spend than the total.
"""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from service.core.budget_ledger import BudgetLedger
from service.messages import IncomingEvent, PartialPublish
from tests.support import SharedLedger
from tests.unit.test_engine_state_machine import (
    MODALITIES,
    TopicPublisher,
    Topics,
    new_handler,
    vectors,
)


class SharedBudgetMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.topics = Topics()
        self.built = []
        self.n = 0
        self.fail_next: list[str | None] = [None, None]  # per worker: "lost" or "written"

    def teardown(self):
        for h in self.built:
            h.close()
        self.loop.close()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def build(self, k: int):
        h = new_handler(TopicPublisher(self.topics), total=self.total, rate=self.rate)
        machine = self
        holder = f"w{k}-life{len(self.built)}"  # a restarted worker is another holder

        class Ledger(SharedLedger):  # the one-partition topic, as worker k reaches it
            async def reserve(self, ids):
                fail, machine.fail_next[k] = machine.fail_next[k], None
                if fail == "written":  # applied by the log, the answer never came back
                    self.ledger.apply(ids, self.holder)
                if fail is not None:
                    raise PartialPublish((), TimeoutError("reservation not read back"))
                return await super().reserve(ids)

        async def read_to_end():  # the selection follower's read-back (the publish fence)
            await machine._follow(k)
            return True

        h.shared_budget = Ledger(self.total, holder, self.ledger)
        h.publish_fence = read_to_end
        self.built.append(h)
        return h

    @initialize(total=st.integers(1, 12), rate=st.sampled_from([1.0, 0.5]))
    def start(self, total, rate):
        self.total, self.rate = total, rate
        self.ledger = BudgetLedger(total)
        self.workers = [self.build(0), self.build(1)]
        self.cursor = [0, 0]  # requests each worker has read
        self.decided_by: dict[str, tuple[int, IncomingEvent]] = {}

    def _submit(self, k: int, events: list[IncomingEvent]) -> None:
        try:
            self.run(self.workers[k].submit(events))
        except PartialPublish:
            return  # nothing committed; a redelivery decides afresh
        for ev in events:
            self.decided_by.setdefault(ev.event_id, (k, ev))

    @rule(k=st.integers(0, 1), data=st.data())
    def submit_new_batch(self, k, data):
        mods = data.draw(st.lists(st.sampled_from(MODALITIES), min_size=1, max_size=6))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
        events = []
        for m, v in zip(mods, vectors(rng, mods), strict=True):
            self.n += 1
            events.append(IncomingEvent(f"ev-{self.n}", f"item-{self.n}", m, v))
        self._submit(k, events)

    @rule(k=st.integers(0, 1), data=st.data())
    def redeliver_an_event(self, k, data):
        if not self.decided_by:
            return
        _, ev = self.decided_by[data.draw(st.sampled_from(sorted(self.decided_by)))]
        # to either worker, whether or not it has read the other's requests (a partition that
        # moved before the new owner caught up): the ledger's foreign-held units make it read
        # them back before it requests anything twice
        self._submit(k, [ev])

    @rule(k=st.integers(0, 1), how=st.sampled_from(["lost", "written"]))
    def next_reservation_fails(self, k, how):
        self.fail_next[k] = how

    async def _follow(self, k: int) -> None:
        new = self.topics.request_outcomes()[self.cursor[k]:]
        self.cursor[k] = len(self.topics.requests)
        if new:
            await self.workers[k].observe_remote_selections(new)

    @rule(k=st.integers(0, 1))
    def follow(self, k):
        self.run(self._follow(k))

    @rule(k=st.integers(0, 1))
    def crash_and_replay(self, k):
        self.workers[k] = self.build(k)
        self.fail_next[k] = None
        self.cursor[k] = 0
        self.follow(k)

    @invariant()
    def the_total_is_never_passed_and_only_granted_ids_are_requested(self):
        if not hasattr(self, "ledger"):
            return
        ids = self.topics.requested_ids()
        assert len(set(ids)) <= self.total, f"{len(set(ids))} requested, total {self.total}"
        assert all(self.ledger.holds(e) for e in ids)
        assert len(ids) == len(set(ids)), sorted(e for e in set(ids) if ids.count(e) > 1)
        for h in self.workers:
            st_ = h.status()
            assert st_.spent <= self.total
            assert st_.remaining == min(self.total - st_.spent,
                                        self.total - self.ledger.granted)


SharedBudgetMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSharedBudget = SharedBudgetMachine.TestCase

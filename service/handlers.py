"""The one domain facade shared by the Kafka and gRPC paths.

:class:`SelectionHandler` owns the engine state (selector, dedup memory, learning loop) and the
order of operations for every batch, whatever its transport:

1. drop events already decided (redelivery: the earlier decision is returned, marked duplicate;
   nothing is spent again and no second alignment request is made);
2. ``propose`` in the torch executor (the asyncio loop never runs torch); with a budget shared
   by several workers, reserve the accepted event ids on the budget ledger
   (:attr:`SelectionHandler.shared_budget`): an accept that gets no unit becomes
   ``skip:budget_exhausted``, and one whose unit another worker reserved first is requested only
   after the requests topic was read back (the publish fence; it may be there already);
3. publish one :class:`AlignmentRequestOut` per accepted event through the injected
   :class:`Publisher` and wait until they are durably written (the requests topic is the record
   of spend: every worker rebuilds its budget from it);
4. only then ``commit`` (budget, caches, history) and remember the decisions;
5. write every decision (accept and skip) to the decision log.

A batch whose requests publish fails is not committed: the caller sees the exception, nothing
was spent, and the redelivered batch is decided afresh; requests the broker did acknowledge
before the failure (:class:`~service.messages.PartialPublish`) count as selected at once, as the
selection follower would count them. The others may have been written all the same (an
acknowledgement lost with a broker, a request timeout): before the next batch is decided the
requests topic is read back to its end (:attr:`SelectionHandler.publish_fence`, the selection
follower in the service), so a redelivered event whose request did land is answered as a
duplicate instead of being requested a second time. A failed decision-log publish comes after
the commit: the caller sees the exception (its retry is answered as duplicates) and the records
are written before anything else is decided. Labels (:meth:`report_alignment`) go to the
:class:`~service.learning_loop.LearningLoop` (the durable pairs store, retraining on the trainer
worker every ``retrain_every`` new pairs, the quality gate, and model versions swapped in between
two batches). Selections made by other workers (read from the
requests topic) are folded in by :meth:`observe_remote_selection`.

Inputs and outputs are the plain dataclasses of :mod:`service.messages`: converters in
``service.wire`` map them to protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from service.alignment import AlignmentModel, AlignmentTrainer
from service.alignment.quality_gate import GateConfig
from service.core.budget_ledger import Grant
from service.core.pool import DEFAULT_STRATEGY as DEFAULT_POOL_STRATEGY
from service.core.pool import STRATEGIES as POOL_STRATEGIES
from service.core.pool.base import PoolState
from service.core.selector import StreamingSelector
from service.core.types import FeatureItem
from service.core.validation import MAX_ID_CHARS, VectorError, as_matrix, check_modality
from service.decided import DecidedOutcomes
from service.learning_loop import (
    DEFAULT_GAIN_HORIZON,
    DEFAULT_RETRAIN_EVERY,
    DEFAULT_VALIDATION_SHARE,
    LearningLoop,
)
from service.lru import LRU
from service.messages import (
    AlignmentRequestOut,
    EngineStatus,
    IncomingEvent,
    Label,
    LabelResult,
    MetricsSink,
    NullMetrics,
    NullPublisher,
    Outcome,
    PartialPublish,
    Publisher,
    SharedBudget,
)
from service.observability.log_throttle import ThrottledWarnings

log = logging.getLogger("pairsieve.handlers")


class _ReadBackFirst(Exception):
    """Inside :meth:`SelectionHandler.submit`: decide the batch again after the requests topic
    was read back (see :meth:`SelectionHandler._read_back_first`)."""


class SelectionHandler:
    """See module docstring.

    Parameters
    ----------
    selector : StreamingSelector
    trainer : AlignmentTrainer
        Trains new model versions from the acquired pairs.
    publisher : Publisher
    metrics : MetricsSink
    worker_id : str
        This worker's name (tags its requests; its own selections read back are skipped).
    retrain_every : int
        New MATCH pairs between two retrains.
    candidates_k : int
        Partner candidates attached to each alignment request.
    dedup_capacity, vector_capacity : int
        Sizes of the bounded memories of decided event ids and of recent item vectors (to find
        the vectors of a label's item and partner).
    clock : callable returning seconds since the epoch
    on_model : callable(AlignmentModel) or None
        Called after each hot swap (e.g. to checkpoint the model).
    validation_share : float
        Share of the acquired pairs held out to gate and measure model versions.
    gate : GateConfig or None
        The quality gate's tolerance and minimum validation size.
    is_trainer : callable returning bool, or None
        Whether this worker trains now (default: always).
    gain_horizon : int
        N of the stopping signal (expected validation R@1 gain of the next N pairs).

    Attributes
    ----------
    learning : LearningLoop
        Labels, pairs store, retraining and model swap (shares this facade's lock and executor).
    model, model_version, scorer_device
        The model in use, its version and where the selector scores.
    """

    def __init__(self, selector: StreamingSelector, trainer: AlignmentTrainer,
                 publisher: Publisher | None = None, metrics: MetricsSink | None = None, *,
                 worker_id: str = "worker-0", retrain_every: int = DEFAULT_RETRAIN_EVERY,
                 candidates_k: int = 5,
                 dedup_capacity: int = 1_000_000, vector_capacity: int = 200_000,
                 clock: Callable[[], float] = time.time,
                 on_model: Callable[[AlignmentModel], None] | None = None,
                 validation_share: float = DEFAULT_VALIDATION_SHARE,
                 gate: GateConfig | None = None,
                 is_trainer: Callable[[], bool] | None = None,
                 gain_horizon: int = DEFAULT_GAIN_HORIZON):
        if retrain_every < 1:
            raise ValueError(f"retrain_every must be >= 1, got {retrain_every}")
        self.selector = selector
        self.publisher = publisher or NullPublisher()
        self.metrics = metrics or NullMetrics()
        self.worker_id = worker_id
        self.candidates_k = int(candidates_k)
        self.clock = clock
        self.modalities = selector.modalities
        self.dims = dict(selector.model.dims)
        self._decided = DecidedOutcomes(dedup_capacity)  # event_id -> Outcome
        # accepts read from the decision log before their request was folded in (the two
        # followers replay concurrently): the fold then knows the log has them
        self._logged_accepts = LRU(dedup_capacity)
        # decision-log records of committed batches not yet written (the broker failed after
        # the requests were published): written before anything else is decided
        self._unlogged: list[tuple[list[Outcome], float]] = []
        # After a publish that failed part-way, requests the broker did not confirm may be on
        # the topic anyway: ``publish_fence()`` must then fold in everything on the requests
        # topic (True) before anything else is decided. Set by the service to its selection
        # follower's ``read_to_end``; None (tests, a worker that ignores other selections): no
        # read-back is possible, the unconfirmed requests count as not written.
        self.publish_fence: Callable[[], Awaitable[bool]] | None = None
        # A budget shared by several workers: before its accepts are published, their event
        # ids are reserved on the budget ledger (:mod:`service.core.budget_ledger`), which
        # answers per id whether it got a unit; a denied accept becomes skip:budget_exhausted.
        # Set by the service when the budget has a total; None: the local count alone.
        self.shared_budget: SharedBudget | None = None
        self._read_back_for = LRU(dedup_capacity)  # foreign-held ids already fenced once
        self._denials = ThrottledWarnings(log, 60.0)
        self._fence_due = False
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairsieve-torch")
        # retraining (about a second with self-learning) must not stall the decisions
        self._train_executor = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="pairsieve-train")
        self.learning = LearningLoop(selector, trainer, executor=self._executor, lock=self._lock,
                                     train_executor=self._train_executor,
                                     metrics=self.metrics, publisher=self.publisher,
                                     worker_id=worker_id, retrain_every=retrain_every,
                                     vector_capacity=vector_capacity,
                                     request_capacity=dedup_capacity,
                                     validation_share=validation_share, gate=gate,
                                     is_trainer=is_trainer, gain_horizon=gain_horizon,
                                     on_model=on_model, clock=clock)

    # ------------------------------------------------------------------ model
    @property
    def trainer(self) -> AlignmentTrainer:
        return self.learning.trainer

    @property
    def model(self) -> AlignmentModel:
        """The alignment model in use."""
        return self.learning.model

    @property
    def model_version(self) -> int:
        return self.learning.model_version

    @property
    def scorer_device(self) -> str:
        """Where the selector scores (e.g. ``cpu``, ``cuda:0``)."""
        return str(self.selector.scorer.device)

    # ------------------------------------------------------------------ events
    def validate(self, ev: IncomingEvent) -> FeatureItem:
        """Check one event's ids; raises ``ValueError`` naming the problem.

        Its modality and vector are checked once, where the core is entered
        (``StreamingSelector.propose``); the wire codecs checked them before already.
        """
        if not ev.event_id:
            raise ValueError("missing event_id")
        if not ev.item_id:
            raise ValueError(f"event {ev.event_id[:MAX_ID_CHARS]!r}: missing item_id")
        for name, value in (("event_id", ev.event_id), ("item_id", ev.item_id)):
            if len(value) > MAX_ID_CHARS:
                raise ValueError(f"event {ev.event_id[:MAX_ID_CHARS]!r}: {name} has "
                                 f"{len(value)} characters (at most {MAX_ID_CHARS})")
        return FeatureItem(ev.item_id, ev.modality, ev.vector)

    async def submit(self, events: Sequence[IncomingEvent]) -> list[Outcome]:
        """Decide a batch (validated as a whole: one bad event raises ``ValueError``)."""
        if not events:
            raise ValueError("empty batch: submit() needs at least one event")
        items = [self.validate(ev) for ev in events]
        while True:  # each pass that reads back fences one more id of the batch: it ends
            if self._fence_due:  # outside the lock: the follower folds what it reads under it
                await self._read_back_unconfirmed()
            try:
                return await self._submit_once(events, items)
            except _ReadBackFirst:
                continue

    async def _submit_once(self, events: Sequence[IncomingEvent], items: Sequence[FeatureItem]
                           ) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            await self._write_decision_log()  # raises -> nothing decided (broker still down)
            fresh_idx, seen_in_batch = [], set()
            for i, ev in enumerate(events):
                if ev.event_id in self._decided or ev.event_id in seen_in_batch:
                    continue
                seen_in_batch.add(ev.event_id)
                fresh_idx.append(i)
            outcomes: dict[str, Outcome] = {}
            t_score = 0.0
            if fresh_idx:
                fresh = [items[i] for i in fresh_idx]
                t0 = time.perf_counter()
                try:
                    proposal = await loop.run_in_executor(self._executor, self.selector.propose,
                                                          fresh)
                except VectorError as exc:  # the core knows items: name the event too
                    bad = events[fresh_idx[exc.index]].event_id if exc.index is not None else ""
                    raise exc.prefixed(f"event {bad!r}: " if bad else "") from None
                acc_pos = [k for k, dec in enumerate(proposal.decisions) if dec.accept]
                if acc_pos and self.shared_budget is not None:
                    # raises (PartialPublish: retryable) when the ledger cannot answer: nothing
                    # was published or spent
                    acc_ids = [events[fresh_idx[k]].event_id for k in acc_pos]
                    grants = await self.shared_budget.reserve(acc_ids)
                    self._read_back_first(acc_ids, grants)
                    denied = [k for k, ok in zip(acc_pos, grants, strict=True) if not ok]
                    if denied:
                        proposal = self.selector.deny(proposal, denied)
                        self._denials.warn("budget_ledger", f"the shared budget is spent: "
                                           f"{len(denied)} of {len(acc_pos)} accepts of a batch "
                                           "got no unit on the budget ledger (skip:budget_"
                                           "exhausted)")
                vectors = proposal.vectors  # validated, float32
                cands = await loop.run_in_executor(
                    self._executor, self.selector.partner_candidates, proposal, self.candidates_k)
                t_score = time.perf_counter() - t0
                now = self.clock()
                requests = []
                for i, dec, vec in zip(fresh_idx, proposal.decisions, vectors, strict=True):
                    ev = events[i]
                    out = Outcome(ev.event_id, dec, False, self.worker_id)
                    outcomes[ev.event_id] = out
                    if dec.accept:
                        requests.append(AlignmentRequestOut(
                            request_id=ev.event_id, item_id=ev.item_id, modality=ev.modality,
                            vector=vec, candidates=cands.get(ev.item_id, []),
                            outcome=out, requested_at=now, metadata=dict(ev.metadata)))
                # Propose, publish, commit. The requests are the record of spend: a failed
                # publish commits nothing (the redelivered batch is decided afresh), except the
                # requests the broker did acknowledge, which are folded in at once exactly as
                # the selection follower would fold them later (spent, cached, remembered), so
                # the retry answers them as duplicates instead of requesting them again.
                try:
                    if requests:
                        await self.publisher.publish_requests(requests)
                except PartialPublish as exc:
                    if len(exc.acked) < len(requests) and self.publish_fence is not None:
                        self._fence_due = True
                    if exc.acked:
                        log.warning("%d of %d requests were written before the publish failed; "
                                    "they count as selected", len(exc.acked), len(requests))
                        await self._fold_selections([(requests[i].outcome, requests[i].vector)
                                                     for i in exc.acked])
                    raise
                await loop.run_in_executor(self._executor, self.selector.commit, proposal)
                for out in outcomes.values():
                    self._decided.put(out)
                for i, vec in zip(fresh_idx, vectors, strict=True):
                    self.learning.remember(events[i].item_id, events[i].modality, vec)
                # The decision log only after the commit: it never records a verdict that was
                # not kept. A failure raises (the caller retries; the batch is then answered as
                # duplicates) and the records are written before the next decision.
                self._unlogged.append((list(outcomes.values()), now))
            result, emitted, relog = [], set(), []
            for ev in events:
                got = outcomes.get(ev.event_id)
                if got is not None and ev.event_id not in emitted:
                    result.append(got)
                    emitted.add(ev.event_id)
                else:  # decided earlier (or earlier in this batch): same verdict, marked duplicate
                    prev = got or self._decided[ev.event_id]
                    result.append(Outcome(ev.event_id, prev.decision, True, prev.worker_id))
                    if got is None and self._decided.unlogged(ev.event_id):
                        # a selection known from the requests topic only: its worker stopped
                        # before logging it, so the log gets it now (as that worker decided it)
                        relog.append(prev)
                        self._decided.mark_logged(ev.event_id)
            if relog:
                self._unlogged.append((relog, self.clock()))
            await self._write_decision_log()
            now = self.clock()
            latencies = [now - ev.event_time for ev in events if ev.event_time]
            self.metrics.batch_decided(result, latencies, t_score)
            self.metrics.engine_state(self.status())
            return result

    def _read_back_first(self, event_ids: Sequence[str], grants: Sequence[Grant]) -> None:
        """Raise :class:`_ReadBackFirst` (nothing of the batch is committed) when an accept holds
        a unit that another worker process reserved first and was not read back for yet: that
        worker requested it already, or is about to (it decided the event before its partition
        moved here), so the requests topic is read to its end (the publish fence) before the
        batch is decided again; then a request found there answers the event as a duplicate,
        and one still missing (its worker died before publishing) is requested here."""
        foreign = [e for e, g in zip(event_ids, grants, strict=True)
                   if g is Grant.FOREIGN and e not in self._read_back_for]
        if not foreign or self.publish_fence is None:
            return
        for e in foreign:
            self._read_back_for.put(e, True)
        self._fence_due = True
        log.info("%d accepted event(s) hold a budget unit another worker reserved first (a "
                 "redelivery, e.g. %r): reading the requests topic back before requesting them",
                 len(foreign), foreign[0])
        raise _ReadBackFirst

    async def _write_decision_log(self) -> None:
        """Write the pending decision-log records, oldest first (the caller holds the lock);
        raises, keeping what is not written, when the publish fails."""
        while self._unlogged:
            outcomes, at = self._unlogged[0]
            await self.publisher.publish_decisions(outcomes, at)
            self._unlogged.pop(0)

    # ------------------------------------------------------------------ scale-out
    async def observe_remote_selection(self, outcome: Outcome, vector: np.ndarray) -> bool:
        """Fold in one selection another worker published; see
        :meth:`observe_remote_selections`. Returns True when this worker's state changed."""
        return await self.observe_remote_selections([(outcome, vector)]) > 0

    async def observe_remote_selections(self, selections: Sequence[tuple[Outcome, np.ndarray]]
                                        ) -> int:
        """Fold in selections other workers published (read back from the requests topic).

        Their items count for diversity and budget here, and their event ids are remembered so a
        redelivery of one of those events to this worker is answered as a duplicate. Selections
        this process already decided are skipped; this worker's own selections from before a
        restart are NOT (replaying the topic from the start rebuilds spend, caches and dedup
        state). One lock and one engine call per batch and modality, so a replay of 100k
        selections is not 100k round trips. Returns the number folded in.

        Raises
        ------
        ValueError
            A selection of an unknown modality or with a vector of the wrong shape (nothing of
            the batch is folded in).
        """
        checked = []
        for outcome, vector in selections:
            d = outcome.decision
            check_modality(d.modality, self.modalities)
            checked.append((outcome, as_matrix(vector, self.dims[d.modality],
                                               name=f"remote selection {outcome.event_id!r}")[0]))
        async with self._lock:
            # Checked under the lock: submit() records its ids only after publish + commit, and
            # the follower may read this worker's own request back in between.
            return await self._fold_selections(checked)

    async def _read_back_unconfirmed(self) -> None:
        """Fold in the whole requests topic before deciding again after a partly failed publish
        (see the module docstring). Raises :class:`PartialPublish` (retryable: the caller tries
        the batch again later) while the topic cannot be read to its end."""
        assert self.publish_fence is not None
        if not await self.publish_fence():
            raise PartialPublish((), TimeoutError(
                "the requests topic was not read back to its end after a publish that failed "
                "part-way; not deciding until it is (a request may have been written)"))
        self._fence_due = False

    async def _fold_selections(self, checked: Sequence[tuple[Outcome, np.ndarray]]) -> int:
        """Fold in published selections (the caller holds the lock and checked the shapes).

        An event id remembered as accepted is skipped (already counted). One remembered as
        skipped is folded in all the same: a request on the topic is the record of spend and
        wins over a skip read from the decision log first (the followers replay concurrently).
        """
        loop = asyncio.get_running_loop()
        fresh, ids = [], set()
        for outcome, vec in checked:
            prev = self._decided.get(outcome.event_id)
            if (prev is not None and prev.decision.accept) or outcome.event_id in ids:
                continue
            ids.add(outcome.event_id)
            fresh.append((outcome, vec))
        if not fresh:
            return 0
        groups: dict[str, list[np.ndarray]] = {}
        costs: dict[str, float] = {}
        for outcome, vec in fresh:
            m = outcome.decision.modality
            groups.setdefault(m, []).append(vec)
            costs[m] = costs.get(m, 0.0) + float(outcome.decision.cost)

        def fold() -> None:
            for m, vecs in groups.items():
                self.selector.observe_external(m, np.stack(vecs), cost=costs[m])

        await loop.run_in_executor(self._executor, fold)
        for outcome, vec in fresh:
            # the decision log may lack it (its worker stopped after the request): a redelivery
            # answered from here writes it (submit), unless the log was seen to hold it
            logged = self._logged_accepts.pop(outcome.event_id, None) is not None
            self._decided.put(outcome, logged=logged)
            self.learning.remember(outcome.decision.item_id, outcome.decision.modality, vec)
        self.metrics.engine_state(self.status())  # budget gauges include the others' spend
        return len(fresh)

    def holds_logged_decision(self, event_id: str) -> bool:
        """Whether a decision-log record of ``event_id`` would change nothing here: its outcome
        is remembered and known to be logged, so :meth:`observe_remote_decisions` would neither
        remember nor mark anything for it (whatever the record says). The decisions follower
        skips decoding such records (a worker reads its own log back)."""
        return event_id in self._decided and not self._decided.unlogged(event_id)

    async def observe_remote_decisions(self, outcomes: Sequence[Outcome]) -> int:
        """Remember skip decisions from the decision log (any worker's, this one's before a
        restart): a redelivery of such an event gets the earlier verdict, marked duplicate.
        Accepts are folded in from the requests topic instead (they carry the spend); putting
        them here first would hide them from :meth:`observe_remote_selections`. Returns the
        number remembered. An accept read here marks its selection as logged, whether it was
        folded in already or is folded in later (a redelivery of it need not log it again)."""
        n = 0
        for o in outcomes:
            if o.decision.accept:
                if o.event_id in self._decided:
                    self._decided.mark_logged(o.event_id)
                else:
                    self._logged_accepts.put(o.event_id, True)
            elif o.event_id not in self._decided:
                self._decided.put(o)
                n += 1
        return n

    # ------------------------------------------------------------------ labels
    def check_label(self, label: Label) -> None:
        """Raise ``ValueError`` naming the problem if :meth:`report_alignment` would refuse
        ``label`` (see :meth:`LearningLoop.check_label`)."""
        self.learning.check_label(label)

    async def report_alignment(self, labels: Sequence[Label]) -> LabelResult:
        """Take annotators' answers; MATCH pairs whose two vectors are known are published and join
        the training set (see :meth:`LearningLoop.add_labels`)."""
        return await self.learning.add_labels(labels)

    async def wait_for_training(self) -> None:
        """Wait until a retrain in flight (if any) has been swapped in."""
        await self.learning.wait_for_training()

    async def settle(self) -> None:
        """Wait for the submit or label call in progress (if any), then for its retrain
        (:meth:`LearningLoop.settle`). The demo uses this to replay in lock step."""
        await self.learning.settle()

    # ------------------------------------------------------------------ pool mode
    async def select_pool(self, ids: Sequence[str], modalities: Sequence[str], vectors: Sequence,
                          budget: int, strategy: str = "default", seed: int = 0) -> list[str]:
        """Choose ``budget`` of the given candidates to align (does not spend the stream budget)."""
        if len(ids) == 0:
            raise ValueError("select_pool: no candidates")
        if budget < 0:
            raise ValueError(f"select_pool: budget must be >= 0, got {budget}")
        known = sorted(set(POOL_STRATEGIES) | {"default"})
        if strategy not in known:
            raise ValueError(f"unknown pool strategy {strategy!r}; known: {known}")
        groups: dict[str, list[int]] = {m: [] for m in self.modalities}
        for i, m in enumerate(modalities):
            groups[check_modality(m, self.modalities)].append(i)
        model = self.selector.model

        def work():
            raw = {m: as_matrix([vectors[i] for i in g], self.dims[m], name=f"{m} candidates",
                                allow_empty=True) if g else np.zeros((0, self.dims[m]), np.float32)
                   for m, g in groups.items()}
            emb = {m: model.embed(m, r) if len(r) else np.zeros((0, model.dim_out), np.float32)
                   for m, r in raw.items()}
            sel = {m: self.selector.caches[m].embeddings.cpu().numpy() for m in self.modalities}
            state = PoolState(self.modalities, raw, emb, sel, model)
            strat = (DEFAULT_POOL_STRATEGY if strategy == "default"
                     else POOL_STRATEGIES[strategy])()
            picks = strat.select(state, budget, np.random.default_rng(seed))
            return [ids[groups[m][j]] for m, j in picks]

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # ------------------------------------------------------------------ status
    def status(self) -> EngineStatus:
        """The engine's state now (budget, counts, model, caches, labels, model quality)."""
        gain = self.learning.expected_gain()
        # the version the reported recall belongs to (a swap in progress shows the old pair)
        engine = {**self.selector.status(), "model_version": self.learning.version_in_use}
        status = EngineStatus.from_selector(
            engine, worker_id=self.worker_id,
            pairs_acquired=self.learning.pairs_acquired,
            budget_total=self.selector.budget.config.total,
            target_rate=self.selector.budget.config.target_rate,
            labels=dict(self.learning.labels_by_status), dims=dict(self.dims),
            validation_recall=self.learning.validation_recall,
            validation_pairs=self.learning.validation_pairs,
            trainer=bool(self.learning.is_trainer()),
            expected_gain=gain.gain if gain else float("nan"),
            expected_gain_se=gain.se if gain else float("nan"),
            expected_gain_pairs=self.learning.gain_horizon)
        if self.shared_budget is not None and status.remaining is not None:
            # units granted to accepts never published (a worker killed in between) are spent
            # on the ledger though no request counts them here
            status = replace(status, remaining=min(status.remaining,
                                                   max(0, self.shared_budget.units_left())))
        return status

    def close(self) -> None:
        self._train_executor.shutdown(wait=True)
        self._executor.shutdown(wait=True)

"""The one domain facade shared by the Kafka and gRPC paths.

:class:`SelectionHandler` owns the engine state (selector, trainer, training pairs) and the
order of operations for every batch, whatever its transport:

1. drop events already decided (redelivery: the earlier decision is returned, marked duplicate;
   nothing is spent again and no second alignment request is made);
2. ``propose`` in the torch executor (the asyncio loop never runs torch);
3. publish one :class:`AlignmentRequestOut` per accepted event through the injected
   :class:`Publisher`, and wait until it is durably written;
4. only then ``commit`` (budget, caches, history) and remember the decisions.

A batch whose publish fails is not committed: the caller sees the exception, nothing was spent,
and the redelivered batch is decided afresh. Labels (:meth:`report_alignment`) build the training
set; every ``retrain_every`` new pairs a new model version is trained in the executor and
hot-swapped between two batches, the caches following the new space. Selections made by other
workers (read from the requests topic) are folded in by :meth:`observe_remote_selection`.

Inputs and outputs are the plain dataclasses of :mod:`service.messages`: converters in
``service.wire`` map them to protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.alignment import AlignmentModel, AlignmentTrainer
from service.core.pool import DEFAULT_STRATEGY as DEFAULT_POOL_STRATEGY
from service.core.pool import STRATEGIES as POOL_STRATEGIES
from service.core.pool.base import PoolState
from service.core.selector import StreamingSelector
from service.core.types import FeatureItem
from service.core.validation import as_matrix, check_modality
from service.messages import (
    LABEL_STATUSES,
    AlignmentRequestOut,
    EngineStatus,
    IncomingEvent,
    Label,
    LabelResult,
    MetricsSink,
    NullMetrics,
    NullPublisher,
    Outcome,
    Publisher,
)

log = logging.getLogger("pairsieve.handler")


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


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
    """

    def __init__(self, selector: StreamingSelector, trainer: AlignmentTrainer,
                 publisher: Publisher | None = None, metrics: MetricsSink | None = None, *,
                 worker_id: str = "worker-0", retrain_every: int = 25, candidates_k: int = 5,
                 dedup_capacity: int = 1_000_000, vector_capacity: int = 200_000,
                 clock: Callable[[], float] = time.time,
                 on_model: Callable[[AlignmentModel], None] | None = None):
        if retrain_every < 1:
            raise ValueError(f"retrain_every must be >= 1, got {retrain_every}")
        self.selector = selector
        self.trainer = trainer
        self.publisher = publisher or NullPublisher()
        self.metrics = metrics or NullMetrics()
        self.worker_id = worker_id
        self.retrain_every = int(retrain_every)
        self.candidates_k = int(candidates_k)
        self.clock = clock
        self.on_model = on_model
        self.modalities = selector.modalities
        self.dims = dict(selector.model.dims)
        self._decided: _LRU = _LRU(dedup_capacity)  # event_id -> Outcome
        self._vectors: _LRU = _LRU(vector_capacity)  # item_id -> (modality, vector)
        self._pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._pairs_at_last_train = 0
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairsieve-torch")
        self._training: asyncio.Task | None = None
        self._pending_model: AlignmentModel | None = None
        self.labels_by_status = {s: 0 for s in LABEL_STATUSES}

    # ------------------------------------------------------------------ events
    def validate(self, ev: IncomingEvent) -> FeatureItem:
        """Check one event; raises ``ValueError`` naming the problem (-> dead letter / INVALID_ARGUMENT)."""
        if not ev.event_id:
            raise ValueError("missing event_id")
        if not ev.item_id:
            raise ValueError(f"event {ev.event_id!r}: missing item_id")
        check_modality(ev.modality, self.modalities)
        vec = as_matrix(ev.vector, self.dims[ev.modality], name=f"event {ev.event_id!r} vector")[0]
        return FeatureItem(ev.item_id, ev.modality, vec)

    async def submit(self, events: Sequence[IncomingEvent]) -> list[Outcome]:
        """Decide a batch (validated as a whole: one bad event raises ``ValueError``)."""
        if not events:
            raise ValueError("empty batch: submit() needs at least one event")
        items = [self.validate(ev) for ev in events]
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._swap_in_pending_model()
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
                proposal = await loop.run_in_executor(self._executor, self.selector.propose, fresh)
                cands = await loop.run_in_executor(
                    self._executor, self.selector.partner_candidates, proposal, self.candidates_k)
                t_score = time.perf_counter() - t0
                now = self.clock()
                requests = []
                for i, dec in zip(fresh_idx, proposal.decisions):
                    ev = events[i]
                    out = Outcome(ev.event_id, dec, False, self.worker_id)
                    outcomes[ev.event_id] = out
                    if dec.accept:
                        requests.append(AlignmentRequestOut(
                            request_id=ev.event_id, item_id=ev.item_id, modality=ev.modality,
                            vector=items[i].vector, candidates=cands.get(ev.item_id, []),
                            outcome=out, requested_at=now, metadata=dict(ev.metadata)))
                if requests:
                    await self.publisher.publish_requests(requests)  # raises -> nothing committed
                await loop.run_in_executor(self._executor, self.selector.commit, proposal)
                for ev_id, out in outcomes.items():
                    self._decided.put(ev_id, out)
                for i in fresh_idx:
                    self._vectors.put(events[i].item_id, (events[i].modality, items[i].vector))
            result, emitted = [], set()
            for ev in events:
                out = outcomes.get(ev.event_id)
                if out is not None and ev.event_id not in emitted:
                    result.append(out)
                    emitted.add(ev.event_id)
                else:  # decided earlier (or earlier in this batch): same verdict, marked duplicate
                    prev = out or self._decided[ev.event_id]
                    result.append(Outcome(ev.event_id, prev.decision, True, prev.worker_id))
            now = self.clock()
            latencies = [now - ev.event_time for ev in events if ev.event_time]
            self.metrics.batch_decided(result, latencies, t_score)
            self.metrics.engine_state(self.status())
            return result

    # ------------------------------------------------------------------ scale-out
    async def observe_remote_selection(self, outcome: Outcome, vector: np.ndarray) -> bool:
        """Fold in a selection another worker published (read back from the requests topic).

        Its item counts for diversity and budget here, and its event id is remembered so a
        redelivery of that event to this worker is answered as a duplicate. Selections this
        process already decided are skipped; this worker's own selections from before a restart
        are NOT (replaying the topic from the start rebuilds spend, caches and dedup state).
        Returns True when this worker's state changed.
        """
        if outcome.event_id in self._decided:
            return False
        d = outcome.decision
        check_modality(d.modality, self.modalities)
        vec = as_matrix(vector, self.dims[d.modality], name=f"remote selection {outcome.event_id!r}")
        loop = asyncio.get_running_loop()
        async with self._lock:
            # Re-check under the lock: submit() records its ids only after publish + commit,
            # and the follower may read this worker's own request back in between.
            if outcome.event_id in self._decided:
                return False
            await loop.run_in_executor(self._executor, self.selector.observe_external, d.modality, vec)
            self._decided.put(outcome.event_id, outcome)
            self._vectors.put(d.item_id, (d.modality, vec[0]))
            self.metrics.engine_state(self.status())  # budget gauges include the others' spend
        return True

    # ------------------------------------------------------------------ labels
    async def report_alignment(self, labels: Sequence[Label]) -> LabelResult:
        """Take annotators' answers; MATCH pairs whose two vectors are known join the training set."""
        accepted = ignored = 0
        for lb in labels:
            if lb.status not in LABEL_STATUSES:
                raise ValueError(f"label for {lb.item_id!r}: unknown status {lb.status!r}; "
                                 f"expected one of {LABEL_STATUSES}")
            check_modality(lb.modality, self.modalities)
        async with self._lock:
            for lb in labels:
                self.labels_by_status[lb.status] += 1
                self.metrics.labels_received(lb.status)
                if lb.status != "MATCH" or not lb.partner_item_id:
                    ignored += 1
                    continue
                item = self._vectors.get(lb.item_id)
                other = self.selector.model.other(lb.modality)
                if lb.partner_vector is not None and len(lb.partner_vector):
                    partner = as_matrix(lb.partner_vector, self.dims[other],
                                        name=f"partner of {lb.item_id!r}")[0]
                else:
                    got = self._vectors.get(lb.partner_item_id)
                    partner = got[1] if got and got[0] == other else None
                if item is None or partner is None or item[0] != lb.modality:
                    ignored += 1
                    continue
                a, b = (item[1], partner) if lb.modality == self.modalities[0] else (partner, item[1])
                self._pairs[(lb.item_id, lb.partner_item_id)] = (a, b)
                self._vectors.put(lb.partner_item_id, (other, partner))
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.selector.reveal_partner, other, partner[None, :])
                accepted += 1
            if len(self._pairs) - self._pairs_at_last_train >= self.retrain_every:
                self._start_training()
        return LabelResult(accepted, ignored, self.selector.model_version)

    def _start_training(self) -> None:
        if self._training is not None and not self._training.done():
            return
        self._pairs_at_last_train = len(self._pairs)
        pairs = list(self._pairs.values())
        unpaired = {m: [v for mm, v in self._vectors.values() if mm == m] for m in self.modalities}
        init = self.selector.model
        self._training = asyncio.get_running_loop().create_task(self._train(pairs, unpaired, init))

    async def _train(self, pairs, unpaired, init) -> None:
        t0 = time.perf_counter()

        def work():
            if all(len(v) >= 2 for v in unpaired.values()):
                self.trainer.fit_unpaired({m: np.stack(v) for m, v in unpaired.items()})
            a = np.stack([p[0] for p in pairs])
            b = np.stack([p[1] for p in pairs])
            return self.trainer.fit(a, b, init=init)

        try:
            model = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except Exception:  # a failed retrain must not stop the stream
            log.exception("retraining failed; keeping model version %s", init.version)
            self.metrics.retrained(init.version, time.perf_counter() - t0, False)
            return
        self._pending_model = model
        self.metrics.retrained(model.version, time.perf_counter() - t0, True)
        async with self._lock:
            self._swap_in_pending_model()

    def _swap_in_pending_model(self) -> None:
        model, self._pending_model = self._pending_model, None
        if model is None or model.version <= self.selector.model_version:
            return
        self.selector.set_model(model)
        log.info("model version %d hot-swapped in (%d pairs)", model.version, model.n_pairs)
        if self.on_model is not None:
            self.on_model(model)

    async def wait_for_training(self) -> None:
        """Wait until a retrain in flight (if any) has been swapped in."""
        if self._training is not None:
            await self._training

    async def settle(self) -> None:
        """Wait for the submit or label call in progress (if any), then for its retrain.

        A label call starts its retrain right after it releases the engine lock, before it next
        yields; so once the lock is ours, any retrain those labels triggered has been started and
        ``wait_for_training`` sees it. The demo uses this to replay in lock step.
        """
        async with self._lock:
            pass
        await self.wait_for_training()

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
        """The engine's state now (budget, counts, model, caches, labels)."""
        return EngineStatus.from_selector(
            self.selector.status(), worker_id=self.worker_id, pairs_acquired=len(self._pairs),
            budget_total=self.selector.budget.config.total,
            target_rate=self.selector.budget.config.target_rate,
            labels=dict(self.labels_by_status), dims=dict(self.dims))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

"""The learning loop: labels -> acquired pairs -> retraining -> gated model versions.

:class:`LearningLoop` owns what the engine learns from annotators:

* the **item memory**: recent raw vectors by item id (:meth:`LearningLoop.remember`), to find
  the two vectors of a labelled pair and, as unpaired data, to refit the whitening;
* the **pairs store**: one :class:`~service.messages.TrainingPair` per pair key
  ``(item of modality a, item of modality b)`` (:attr:`LearningLoop.pairs`). A MATCH label is
  resolved to both vectors, **published** (the Kafka service writes it to the training-pairs
  topic and waits for the acknowledgement) and only then stored, so a pair the caller was told
  about is durable. Pairs other workers published (or this one, before a restart) come in through
  :meth:`LearningLoop.ingest_pairs`; a pair labelled again replaces itself. Labels are
  deduplicated by request id: a re-sent label is counted once;
* **NO_MATCH** answers are published the same way, as partnerless records (the labelled item's
  vector only), and every worker marks the item partnerless in its selector: items like it lose
  utility (:mod:`service.core.partnerless`). **UNSURE** is counted and changes nothing; it is not
  a final answer, so its request id is not remembered and a later MATCH or NO_MATCH for the same
  request is taken (a second annotator's opinion). pairsieve does not re-request by itself: in a
  stream an item is decided once, and the annotation tool owns its queue;
* the **validation split**: a deterministic share of the pairs (by a hash of the key,
  :mod:`service.alignment.quality_gate`) is held out and never trained on;
* **retraining**, only on the worker that holds the trainer role (``is_trainer``; in the service
  the owner of the labels partition): every ``retrain_every`` new pairs a candidate version is
  trained in the training executor, off the event loop and off the scoring thread;
* the **quality gate**: the candidate and the model in use are evaluated on the validation pairs;
  a candidate worse beyond the tolerance is rejected (logged, counted) and the model stays;
* **one lineage**: an accepted candidate is published (the models topic) before it is swapped
  in; every worker installs the newest version it is offered (:meth:`LearningLoop.offer_model`),
  so all workers use the same model. Version numbers continue from the highest ever offered, so
  they keep rising across a fail-over of the trainer role;
* the **stopping signal**: each version carries the lineage's learning curve (training pairs ->
  validation R@1, :mod:`service.alignment.learning_curve`), from which every worker estimates
  the R@1 gain of the next ``gain_horizon`` pairs (:meth:`LearningLoop.expected_gain`).

It shares the engine lock and the torch executor with :class:`service.handlers.SelectionHandler`,
which delegates its label calls here, so a label, a batch and a model swap never interleave. A
failed retrain or publish is logged and reported; the stream keeps the model it had.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from types import MappingProxyType
from typing import cast

import numpy as np

from service.alignment import AlignmentModel, AlignmentTrainer
from service.alignment.learning_curve import MAX_HISTORY, CurvePoint, GainEstimate, expected_gain
from service.alignment.quality_gate import GateConfig, is_validation, judge, validation_recall
from service.core.selector import StreamingSelector
from service.core.validation import as_matrix, check_modality
from service.lru import LRU
from service.messages import (
    LABEL_STATUSES,
    Label,
    LabelResult,
    MetricsSink,
    ModelRelease,
    NullMetrics,
    NullPublisher,
    Publisher,
    TrainingPair,
)

DEFAULT_RETRAIN_EVERY = 25
"""New MATCH pairs between two retrains: the service's default (``Settings.retrain_every_pairs``)
and the simulator's stream cadence (``SimConfig.retrain_every``), so the benchmark retrains as
often as a deployment."""

DEFAULT_VALIDATION_SHARE = 0.1
"""Share of the acquired pairs held out to measure each model version (never trained on)."""

DEFAULT_GAIN_HORIZON = 100
"""The N of the stopping signal: the expected validation R@1 gain of the next N pairs."""

log = logging.getLogger("pairsieve.learning")

PairKey = tuple[str, str]  # (item id of modality a, item id of modality b)


class LearningLoop:
    """See module docstring.

    Parameters
    ----------
    selector : StreamingSelector
        The engine whose model is swapped and whose caches learn revealed partners.
    trainer : AlignmentTrainer
        Trains candidate versions from the acquired training pairs.
    executor : concurrent.futures.Executor
        Where torch work runs (the engine's single-thread executor).
    lock : asyncio.Lock
        The engine lock (label calls, pair ingestion and model swaps hold it, as batches do).
    metrics : MetricsSink, optional
    publisher : Publisher, optional
        Where pairs and model versions are durably published (default: nowhere, one process).
    train_executor : concurrent.futures.Executor, optional
        Where retraining runs (default: ``executor``).
    worker_id : str
        Recorded with the pairs this worker resolves and the versions it trains.
    retrain_every : int
        New pairs between two retrains (>= 1).
    vector_capacity : int
        Size of the bounded item memory (item id -> (modality, vector (dim,))).
    request_capacity : int
        Size of the bounded memory of label request ids taken in (deduplication).
    validation_share : float
        Share of the pairs held out for validation, in [0, 1).
    gate : GateConfig
        Tolerance and minimum validation size of the quality gate.
    is_trainer : callable returning bool
        Whether this worker trains now (default: always; the service asks the stream processor
        whether it owns the labels partition).
    gain_horizon : int
        N of the stopping signal (expected R@1 gain of the next N pairs).
    on_model : callable(AlignmentModel) or None
        Called after each hot swap (e.g. to checkpoint it).
    clock : callable returning seconds since the epoch

    Raises
    ------
    ValueError
        If ``retrain_every`` is below 1 or ``validation_share`` is outside [0, 1).
    """

    def __init__(self, selector: StreamingSelector, trainer: AlignmentTrainer, *,
                 executor: Executor, lock: asyncio.Lock, metrics: MetricsSink | None = None,
                 publisher: Publisher | None = None, train_executor: Executor | None = None,
                 worker_id: str = "worker-0", retrain_every: int = DEFAULT_RETRAIN_EVERY,
                 vector_capacity: int = 200_000, request_capacity: int = 1_000_000,
                 validation_share: float = DEFAULT_VALIDATION_SHARE,
                 gate: GateConfig | None = None,
                 is_trainer: Callable[[], bool] | None = None,
                 gain_horizon: int = DEFAULT_GAIN_HORIZON,
                 on_model: Callable[[AlignmentModel], None] | None = None,
                 clock: Callable[[], float] = time.time):
        if retrain_every < 1:
            raise ValueError(f"retrain_every must be >= 1, got {retrain_every}")
        if not 0.0 <= validation_share < 1.0:
            raise ValueError(f"validation_share must be in [0, 1), got {validation_share!r}")
        if gain_horizon < 1:
            raise ValueError(f"gain_horizon must be >= 1, got {gain_horizon}")
        self.selector = selector
        self.trainer = trainer
        self.metrics = metrics or NullMetrics()
        self.publisher = publisher or NullPublisher()
        self.worker_id = worker_id
        self.retrain_every = int(retrain_every)
        self.validation_share = float(validation_share)
        self.gate = gate or GateConfig()
        self.is_trainer = is_trainer or (lambda: True)
        self.on_model = on_model
        self.clock = clock
        self.modalities = selector.modalities
        self.dims = dict(selector.model.dims)
        self._executor = executor
        self._train_executor = train_executor if train_executor is not None else executor
        self._lock = lock
        self._items: LRU = LRU(vector_capacity)  # item_id -> (modality, vector)
        self._requests: LRU = LRU(request_capacity)  # label request ids taken in
        # (pair key, request id) of every pair record stored: an echo of an earlier label of a
        # pair labelled again is neither stored over the newer one nor counted again
        self._stored_labels: LRU = LRU(request_capacity)
        self._pairs: dict[PairKey, TrainingPair] = {}
        self._partnerless: dict[PairKey, TrainingPair] = {}  # NO_MATCH: (id a, "") / ("", id b)
        self._validation: set[PairKey] = set()
        self._new_marks: list[tuple[str, np.ndarray]] = []  # partnerless, not yet in the selector
        self._new_costs: list[tuple[str, float]] = []  # answers' costs, not yet in the selector
        self._pairs_at_last_train = 0
        self._highest_version = selector.model_version  # highest ever offered or trained
        self._training: asyncio.Task | None = None
        self.validation_recall: dict[int, float] = {}
        # The version validation_recall and history belong to. The selector's own version
        # changes first, inside the executor, while the event loop may serve a status: status
        # reports this one, set together with the recall, so a version is never shown with its
        # predecessor's quality.
        self.version_in_use = selector.model_version
        self.gain_horizon = int(gain_horizon)
        self.history: tuple[tuple[int, float, int], ...] = ()  # of the version in use
        self.labels_by_status = {s: 0 for s in LABEL_STATUSES}
        self.duplicate_labels = 0
        self.candidates = {"published": 0, "rejected": 0, "failed": 0, "superseded": 0}

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> AlignmentModel:
        """The model in use."""
        # the service builds the selector on an AlignmentModel and only AlignmentModels are
        # installed
        return cast(AlignmentModel, self.selector.model)

    @property
    def model_version(self) -> int:
        return self.selector.model_version

    # ------------------------------------------------------------------ item memory, pairs
    def remember(self, item_id: str, modality: str, vector: np.ndarray) -> None:
        """Keep an item's raw vector (shape (dim,)) so a later label can pair it."""
        self._items.put(item_id, (modality, vector))

    @property
    def items(self) -> Mapping[str, tuple[str, np.ndarray]]:
        """Read-only view of the item memory: item id -> (modality, vector (dim,))."""
        return MappingProxyType(self._items)

    @property
    def pairs(self) -> Mapping[PairKey, TrainingPair]:
        """Read-only view of the pairs store: (item id a, item id b) -> :class:`TrainingPair`."""
        return MappingProxyType(self._pairs)

    @property
    def pairs_acquired(self) -> int:
        """Distinct pairs acquired (validation pairs included)."""
        return len(self._pairs)

    @property
    def partnerless(self) -> Mapping[PairKey, TrainingPair]:
        """Read-only view of the items answered NO_MATCH (keyed ``(id, "")`` for modality a,
        ``("", id)`` for b)."""
        return MappingProxyType(self._partnerless)

    @property
    def validation_pairs(self) -> int:
        return len(self._validation)

    def is_validation(self, key: PairKey) -> bool:
        """Whether the pair ``key`` is held out (deterministic; see the module docstring)."""
        return is_validation(key, self.validation_share)

    # ------------------------------------------------------------------ labels
    def check_label(self, label: Label) -> None:
        """Raise ``ValueError`` naming the problem if ``label`` has an unknown status or
        modality, a negative or non-finite cost, or a partner vector of the wrong shape or
        non-finite."""
        if label.status not in LABEL_STATUSES:
            raise ValueError(f"label for {label.item_id!r}: unknown status {label.status!r}; "
                             f"expected one of {LABEL_STATUSES}")
        check_modality(label.modality, self.modalities)
        if not (math.isfinite(label.cost) and label.cost >= 0):
            raise ValueError(f"label for {label.item_id!r}: cost must be a finite number >= 0, "
                             f"got {label.cost!r}")
        if label.partner_vector is not None and len(label.partner_vector):
            as_matrix(label.partner_vector, self.dims[self.model.other(label.modality)],
                      name=f"partner of {label.item_id!r}")

    def resolve(self, label: Label) -> TrainingPair | str:
        """A checked MATCH label as a :class:`TrainingPair`, or why it cannot be one.

        The labelled item's vector must be in the item memory (every selection of every worker
        is, while it is recent); the partner's comes from ``label.partner_vector`` or, failing
        that, from the item memory (a partner that was itself selected, or seen by this worker).
        """
        what = f"MATCH label for {label.item_id!r} ({label.modality})"
        if not label.partner_item_id:
            return f"{what}: no partner_item_id"
        item = self._items.get(label.item_id)
        if item is None:
            return (f"{what}: the item's vector is unknown here (not a recent selection; the "
                    "item memory keeps the most recent items only)")
        if item[0] != label.modality:
            return f"{what}: the item is known as {item[0]!r}, not {label.modality!r}"
        other = self.model.other(label.modality)
        if label.partner_vector is not None and len(label.partner_vector):
            partner = as_matrix(label.partner_vector, self.dims[other],
                                name=f"partner of {label.item_id!r}")[0]
        else:
            got = self._items.get(label.partner_item_id)
            if got is None:
                return (f"{what}: partner {label.partner_item_id!r} ({other}) is unknown here; "
                        "send its vector in partner_vector")
            if got[0] != other:
                return (f"{what}: partner {label.partner_item_id!r} is known as {got[0]!r}, "
                        f"not {other!r}")
            partner = got[1]
        first = label.modality == self.modalities[0]
        return TrainingPair(
            item_id_a=label.item_id if first else label.partner_item_id,
            item_id_b=label.partner_item_id if first else label.item_id,
            vector_a=item[1] if first else partner, vector_b=partner if first else item[1],
            request_id=label.request_id, annotator=label.annotator, cost=float(label.cost),
            labeled_at=label.labeled_at if label.labeled_at is not None else self.clock(),
            worker_id=self.worker_id, labeled_item_id=label.item_id)

    def resolve_partnerless(self, label: Label) -> TrainingPair | None:
        """A NO_MATCH label as a partnerless record, or None when the item's vector is unknown
        (it is still counted; there is nothing to compare later items with)."""
        item = self._items.get(label.item_id)
        if item is None or item[0] != label.modality:
            return None
        first = label.modality == self.modalities[0]
        empty = np.zeros(0, np.float32)
        return TrainingPair(
            item_id_a=label.item_id if first else "", item_id_b="" if first else label.item_id,
            vector_a=item[1] if first else empty, vector_b=empty if first else item[1],
            request_id=label.request_id, annotator=label.annotator, cost=float(label.cost),
            labeled_at=label.labeled_at if label.labeled_at is not None else self.clock(),
            worker_id=self.worker_id, labeled_item_id=label.item_id, partnerless=True)

    async def add_labels(self, labels: Sequence[Label]) -> LabelResult:
        """Take annotators' answers, under the engine lock.

        All are checked first (one bad label raises ``ValueError`` and nothing is counted). A
        label whose request id was taken in before is a duplicate: counted once, nothing changes.
        MATCH labels are resolved to pairs (:meth:`resolve`; the unresolvable ones are reported
        in ``LabelResult.unresolved`` and not remembered, so a corrected resend is taken), the
        pairs are published (raises -> nothing counted or stored), then stored; a retrain starts
        when enough new pairs arrived.
        """
        for lb in labels:
            self.check_label(lb)
        async with self._lock:
            fresh: list[Label] = []
            duplicates = 0
            taken: set[str] = set()  # request ids answered finally earlier in this call
            pairs: list[TrainingPair] = []
            unresolved: list[str] = []
            remember: list[str] = []
            marks: list[TrainingPair] = []
            for lb in labels:  # in order: within one call as across calls
                rid = lb.request_id
                if rid and (rid in self._requests or rid in taken):
                    duplicates += 1
                    continue
                fresh.append(lb)
                if lb.status == "UNSURE":
                    continue  # not final: a later answer for this request is taken
                if lb.status == "NO_MATCH":
                    remember.append(rid)
                    taken.add(rid)
                    mark = self.resolve_partnerless(lb)
                    if mark is not None:
                        marks.append(mark)
                    continue
                got = self.resolve(lb)
                if isinstance(got, str):
                    unresolved.append(got)  # not final: a corrected resend is taken
                else:
                    pairs.append(got)
                    remember.append(rid)
                    taken.add(rid)
            if pairs or marks:
                await self.publisher.publish_pairs(pairs + marks)  # raises -> nothing changed
            for lb in fresh:
                self.labels_by_status[lb.status] += 1
                self.metrics.labels_received(lb.status)
            for rid in remember:
                if rid:
                    self._requests.put(rid, True)
            await self._store_all(pairs + marks)
            if duplicates:
                self.duplicate_labels += duplicates
                self.metrics.labels_duplicate(duplicates)
            self.maybe_retrain()
        ignored = len(fresh) - len(pairs) - len(unresolved)
        return LabelResult(len(pairs), ignored, self.model_version, duplicates,
                           tuple(unresolved))

    async def ingest_pairs(self, pairs: Sequence[TrainingPair]) -> int:
        """Store pairs published by any worker (read back from the training-pairs topic), under
        the engine lock; the partners they reveal go to the caches in one engine call per
        modality. An echo of a pair already stored changes nothing. Returns the number of new
        pair keys."""
        async with self._lock:
            added = await self._store_all(pairs)
            self.maybe_retrain()
        return added

    async def _store_all(self, pairs: Sequence[TrainingPair]) -> int:
        """Store pairs and apply what they reveal in one engine call (the caller holds the
        lock). Returns the number of new pair keys."""
        reveal: dict[str, list[np.ndarray]] = {}
        for p in pairs:
            side = self._store(p)
            if side is not None:
                reveal.setdefault(side[0], []).append(side[1])
        await self._reveal(reveal)
        return sum(len(v) for v in reveal.values())

    def _store(self, p: TrainingPair) -> tuple[str, np.ndarray] | None:
        """Put ``p`` in the store; for a new key, the (modality, vector) its label revealed (the
        labelled item was selected: it is cached already), else None. A partnerless record
        marks its item in the selector instead (once per key)."""
        key = p.key
        labelled = self.modalities[0] if p.labeled_item_id == p.item_id_a else self.modalities[1]
        if p.partnerless:
            if p.request_id:
                self._requests.put(p.request_id, True)
            if key not in self._partnerless:
                self._partnerless[key] = p
                self._new_costs.append((labelled, p.cost))
                m = self.modalities[0] if p.item_id_a else self.modalities[1]
                vec = p.vector_a if p.item_id_a else p.vector_b
                self._items.put(p.labeled_item_id, (m, vec))
                self._new_marks.append((m, vec))
            return None
        old = self._pairs.get(key)
        if old is not None and old.request_id == p.request_id \
                and np.array_equal(old.vector_a, p.vector_a) \
                and np.array_equal(old.vector_b, p.vector_b):
            return None  # our own publication read back, or a redelivery
        if p.request_id and (key, p.request_id) in self._stored_labels:
            return None  # an earlier label of a pair labelled again since: already counted
        if p.request_id:
            self._stored_labels.put((key, p.request_id), True)
        ma, mb = self.modalities
        self._pairs[key] = p
        if self.is_validation(key):
            self._validation.add(key)
        if p.request_id:
            self._requests.put(p.request_id, True)
        self._items.put(p.item_id_a, (ma, p.vector_a))
        self._items.put(p.item_id_b, (mb, p.vector_b))
        self._new_costs.append((labelled, p.cost))  # a new pair, or one labelled again
        if old is not None:
            return None
        return (ma, p.vector_a) if p.labeled_item_id == p.item_id_b else (mb, p.vector_b)

    async def _reveal(self, by_modality: Mapping[str, list[np.ndarray]]) -> None:
        """Partners revealed (into the caches), items marked partnerless and answers' costs since
        the last call, in one engine call."""
        marks, self._new_marks = self._new_marks, []
        costs, self._new_costs = self._new_costs, []
        if not by_modality and not marks and not costs:
            return

        def work() -> None:
            for m, vecs in by_modality.items():
                self.selector.reveal_partner(m, np.stack(vecs))
            for m, vec in marks:
                self.selector.mark_partnerless(m, vec[None, :])
            for m, c in costs:
                self.selector.observe_cost(m, c)

        await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # ------------------------------------------------------------------ training
    @property
    def training(self) -> asyncio.Task | None:
        """The last retrain started (done or in flight), or None before the first."""
        return self._training

    def maybe_retrain(self) -> bool:
        """Start a retrain when this worker is the trainer, ``retrain_every`` pairs arrived since
        the last version (trained here or offered) and none is in flight. Needs a running event
        loop. Returns True when one started."""
        if len(self._pairs) - self._pairs_at_last_train < self.retrain_every:
            return False
        if self._training is not None and not self._training.done():
            return False
        if not self.is_trainer():
            return False
        train = [p for k, p in self._pairs.items() if k not in self._validation]
        if not train:
            return False
        val = [self._pairs[k] for k in self._validation]
        previous = self._pairs_at_last_train
        self._pairs_at_last_train = len(self._pairs)
        unpaired = {m: [v for mm, v in self._items.values() if mm == m] for m in self.modalities}
        self._training = asyncio.get_running_loop().create_task(
            self._train(train, val, unpaired, self.model, len(self._pairs), previous))
        return True

    async def _train(self, train: list[TrainingPair], val: list[TrainingPair],
                     unpaired: dict[str, list[np.ndarray]], init: AlignmentModel,
                     pairs_seen: int, previous_count: int) -> None:
        t0 = time.perf_counter()
        version = max(init.version, self._highest_version) + 1

        def work():
            if all(len(v) >= 2 for v in unpaired.values()):
                self.trainer.fit_unpaired({m: np.stack(v) for m, v in unpaired.items()})
            a = np.stack([p.vector_a for p in train])
            b = np.stack([p.vector_b for p in train])
            model = self.trainer.fit(a, b, init=init)
            model.version = version
            if not val:
                return model, {}, {}
            va = np.stack([p.vector_a for p in val])
            vb = np.stack([p.vector_b for p in val])
            return model, validation_recall(model, va, vb), validation_recall(init, va, vb)

        try:
            model, cand, cur = await asyncio.get_running_loop().run_in_executor(
                self._train_executor, work)
        except Exception:  # a failed retrain must not stop the stream
            log.exception("retraining failed; keeping model version %s", init.version)
            self.metrics.retrained(init.version, time.perf_counter() - t0, False)
            self._judged("failed")
            return
        self.metrics.retrained(model.version, time.perf_counter() - t0, True)
        verdict = judge(cand, cur, len(val), self.gate)
        if not verdict.accept:
            log.warning("candidate model version %d rejected by the quality gate (%s); keeping "
                        "version %d", model.version, verdict.reason, init.version)
            self._judged("rejected")
            return
        if not self.is_trainer():
            log.warning("candidate model version %d discarded: this worker lost the trainer role "
                        "while training it", model.version)
            self._judged("superseded")
            return
        point = (int(model.n_pairs), float(cand.get(1, float("nan"))), len(val))
        history = (self.history + (point,))[-MAX_HISTORY:]
        release = ModelRelease(model, pairs_seen, len(val), cand, self.worker_id, self.clock(),
                               history)
        try:
            await self.publisher.publish_model(release)
        except Exception:
            log.exception("publishing model version %d failed; keeping version %d (it is retried "
                          "with the next pairs)", model.version, init.version)
            self._pairs_at_last_train = previous_count
            self._judged("failed")
            return
        self._judged("published")
        log.info("model version %d accepted (%s)", model.version, verdict.reason)
        await self.offer_model(release)

    def _judged(self, outcome: str) -> None:
        self.candidates[outcome] += 1
        self.metrics.candidate_judged(outcome)

    async def offer_model(self, release: ModelRelease) -> bool:
        """Install a published version if it is newer than the model in use (the models topic's
        follower and this worker's own trainer call this). Returns True when it was swapped in."""
        self._highest_version = max(self._highest_version, release.version)
        self._pairs_at_last_train = max(self._pairs_at_last_train, release.pairs_seen)
        model = release.model
        if model.version <= self.model_version:
            return False
        if model.dims != self.dims or model.modalities != self.modalities:
            log.warning("ignoring model version %d: modalities %s, this worker has %s",
                        model.version, model.dims, self.dims)
            return False
        if model.dim_out != self.model.dim_out:  # a worker of another PAIRSIEVE_EMBEDDING_DIM
            log.warning("ignoring model version %d: a %d-d shared space, this worker's is %d-d "
                        "(PAIRSIEVE_EMBEDDING_DIM must be the same on every worker)",
                        model.version, model.dim_out, self.model.dim_out)
            return False
        async with self._lock:
            if model.version <= self.model_version:  # a newer one won the race for the lock
                return False
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.selector.set_model, model)
            self.validation_recall = dict(release.validation_recall)
            self.history = tuple(release.history)
            self.version_in_use = model.version
            gain = self.expected_gain()
            self.metrics.model_quality(self.validation_recall, release.validation_pairs,
                                       gain.gain if gain else float("nan"), self.gain_horizon)
        log.info("model version %d swapped in (%d training pairs, trained by %s)", model.version,
                 model.n_pairs, release.worker_id or "?")
        if self.on_model is not None:
            self.on_model(model)
        return True

    def expected_gain(self) -> GainEstimate | None:
        """Expected validation R@1 gain of the next ``gain_horizon`` pairs (None until the
        lineage's learning curve has three usable points)."""
        return expected_gain([CurvePoint(*p) for p in self.history], self.gain_horizon)

    async def wait_for_training(self) -> None:
        """Wait until a retrain in flight (if any) has been judged and, if accepted, installed."""
        if self._training is not None:
            await self._training

    async def settle(self) -> None:
        """Wait for the engine call in progress (if any), then for the retrain it started.

        A label call starts its retrain right after it releases the engine lock, before it next
        yields; so once the lock is ours, any retrain those labels triggered has been started and
        :meth:`wait_for_training` sees it.
        """
        async with self._lock:
            pass
        await self.wait_for_training()

"""The learning loop: labels -> acquired pairs -> retraining -> model hot swap.

:class:`LearningLoop` owns what the engine learns from annotators:

* the **item memory**: recent raw vectors by item id (:meth:`LearningLoop.remember`), to find
  the two vectors of a labelled pair and, as unpaired data, to refit the whitening;
* the **pairs store**: one training pair per (item, partner) MATCH label whose two vectors are
  known (:attr:`LearningLoop.pairs`); a repeated label replaces its pair, it does not add one;
* **retraining**: every ``retrain_every`` new pairs a new model version is trained in the
  training executor (:meth:`LearningLoop.maybe_retrain`), off the event loop and, in the
  service, off the scoring thread (a self-learning fit takes about a second);
* the **model swap**: the trained model replaces the selector's between two batches
  (:meth:`LearningLoop.swap_in_pending`), its caches following the new space, and ``on_model``
  is called (e.g. to checkpoint it).

It shares the engine lock and the single torch executor with
:class:`service.handlers.SelectionHandler`, which delegates its label calls here, so a label, a
batch and a model swap never interleave. A failed retrain is logged and reported; the stream
keeps the model it had.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from types import MappingProxyType
from typing import cast

import numpy as np

from service.alignment import AlignmentModel, AlignmentTrainer
from service.core.selector import StreamingSelector
from service.core.validation import as_matrix, check_modality
from service.lru import LRU
from service.messages import LABEL_STATUSES, Label, LabelResult, MetricsSink, NullMetrics

DEFAULT_RETRAIN_EVERY = 25
"""New MATCH pairs between two retrains: the service's default (``Settings.retrain_every_pairs``)
and the simulator's stream cadence (``SimConfig.retrain_every``), so the benchmark retrains as
often as a deployment."""

log = logging.getLogger("pairsieve.handler")

PairKey = tuple[str, str]  # (item id, partner item id)


class LearningLoop:
    """See module docstring.

    Parameters
    ----------
    selector : StreamingSelector
        The engine whose model is swapped and whose caches learn revealed partners.
    trainer : AlignmentTrainer
        Trains new model versions from the acquired pairs.
    executor : concurrent.futures.Executor
        Where torch work runs (the engine's single-thread executor).
    train_executor : concurrent.futures.Executor, optional
        Where retraining runs (default: ``executor``). The trainer and the snapshot of pairs it
        is given are touched by nothing else, so a separate thread lets decisions go on while a
        new version trains; the swap itself still happens under ``lock``.
    lock : asyncio.Lock
        The engine lock (label calls and model swaps hold it, as batch decisions do).
    metrics : MetricsSink, optional
    retrain_every : int
        New pairs between two retrains (>= 1).
    vector_capacity : int
        Size of the bounded item memory (item id -> (modality, vector (dim,))).
    on_model : callable(AlignmentModel) or None
        Called after each hot swap.

    Raises
    ------
    ValueError
        If ``retrain_every`` is below 1.
    """

    def __init__(self, selector: StreamingSelector, trainer: AlignmentTrainer, *,
                 executor: Executor, lock: asyncio.Lock, metrics: MetricsSink | None = None,
                 train_executor: Executor | None = None,
                 retrain_every: int = DEFAULT_RETRAIN_EVERY, vector_capacity: int = 200_000,
                 on_model: Callable[[AlignmentModel], None] | None = None):
        if retrain_every < 1:
            raise ValueError(f"retrain_every must be >= 1, got {retrain_every}")
        self.selector = selector
        self.trainer = trainer
        self.metrics = metrics or NullMetrics()
        self.retrain_every = int(retrain_every)
        self.on_model = on_model
        self.modalities = selector.modalities
        self.dims = dict(selector.model.dims)
        self._executor = executor
        self._train_executor = train_executor if train_executor is not None else executor
        self._lock = lock
        self._items: LRU = LRU(vector_capacity)  # item_id -> (modality, vector)
        self._pairs: dict[PairKey, tuple[np.ndarray, np.ndarray]] = {}
        self._pairs_at_last_train = 0
        self._training: asyncio.Task | None = None
        self._pending_model: AlignmentModel | None = None
        self.labels_by_status = {s: 0 for s in LABEL_STATUSES}

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> AlignmentModel:
        """The model in use."""
        # the service builds the selector on an AlignmentModel and swap_in_pending only swaps
        # AlignmentModels in
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
    def pairs(self) -> Mapping[PairKey, tuple[np.ndarray, np.ndarray]]:
        """Read-only view of the pairs store: (item id, partner id) -> (first-modality vector
        (dim_0,), second-modality vector (dim_1,))."""
        return MappingProxyType(self._pairs)

    @property
    def pairs_acquired(self) -> int:
        return len(self._pairs)

    # ------------------------------------------------------------------ labels
    def check_label(self, label: Label) -> None:
        """Raise ``ValueError`` naming the problem if ``label`` has an unknown status or
        modality."""
        if label.status not in LABEL_STATUSES:
            raise ValueError(f"label for {label.item_id!r}: unknown status {label.status!r}; "
                             f"expected one of {LABEL_STATUSES}")
        check_modality(label.modality, self.modalities)

    async def add_labels(self, labels: Sequence[Label]) -> LabelResult:
        """Take annotators' answers (checked as a whole first: one bad label raises
        ``ValueError`` and nothing is counted), under the engine lock; start a retrain when
        enough new pairs arrived."""
        for lb in labels:
            self.check_label(lb)
        accepted = ignored = 0
        async with self._lock:
            for lb in labels:
                if await self.add_label(lb):
                    accepted += 1
                else:
                    ignored += 1
            self.maybe_retrain()
        return LabelResult(accepted, ignored, self.model_version)

    async def add_label(self, label: Label) -> bool:
        """Count one checked label; a MATCH whose item and partner vectors are known becomes
        (or replaces) a training pair, and the partner joins the selected-set cache of its
        modality. The caller holds the engine lock. Returns True when a pair was stored."""
        self.labels_by_status[label.status] += 1
        self.metrics.labels_received(label.status)
        if label.status != "MATCH" or not label.partner_item_id:
            return False
        item = self._items.get(label.item_id)
        other = self.model.other(label.modality)
        if label.partner_vector is not None and len(label.partner_vector):
            partner = as_matrix(label.partner_vector, self.dims[other],
                                name=f"partner of {label.item_id!r}")[0]
        else:
            got = self._items.get(label.partner_item_id)
            partner = got[1] if got and got[0] == other else None
        if item is None or partner is None or item[0] != label.modality:
            return False
        a, b = (item[1], partner) if label.modality == self.modalities[0] else (partner, item[1])
        self._pairs[(label.item_id, label.partner_item_id)] = (a, b)
        self._items.put(label.partner_item_id, (other, partner))
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self.selector.reveal_partner, other, partner[None, :])
        return True

    # ------------------------------------------------------------------ training
    @property
    def training(self) -> asyncio.Task | None:
        """The last retrain started (done or in flight), or None before the first."""
        return self._training

    def maybe_retrain(self) -> bool:
        """Start a retrain in the executor when ``retrain_every`` pairs arrived since the last
        one and none is in flight. Needs a running event loop. Returns True when one started."""
        if len(self._pairs) - self._pairs_at_last_train < self.retrain_every:
            return False
        if self._training is not None and not self._training.done():
            return False
        self._pairs_at_last_train = len(self._pairs)
        pairs = list(self._pairs.values())
        unpaired = {m: [v for mm, v in self._items.values() if mm == m] for m in self.modalities}
        init = self.model
        self._training = asyncio.get_running_loop().create_task(self._train(pairs, unpaired, init))
        return True

    async def _train(self, pairs, unpaired, init) -> None:
        t0 = time.perf_counter()

        def work():
            if all(len(v) >= 2 for v in unpaired.values()):
                self.trainer.fit_unpaired({m: np.stack(v) for m, v in unpaired.items()})
            a = np.stack([p[0] for p in pairs])
            b = np.stack([p[1] for p in pairs])
            return self.trainer.fit(a, b, init=init)

        try:
            model = await asyncio.get_running_loop().run_in_executor(self._train_executor, work)
        except Exception:  # a failed retrain must not stop the stream
            log.exception("retraining failed; keeping model version %s", init.version)
            self.metrics.retrained(init.version, time.perf_counter() - t0, False)
            return
        self._pending_model = model
        self.metrics.retrained(model.version, time.perf_counter() - t0, True)
        async with self._lock:
            self.swap_in_pending()

    def swap_in_pending(self) -> None:
        """Hot-swap a trained model that is newer than the one in use. The caller holds the
        engine lock (between two batches)."""
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
        """Wait for the engine call in progress (if any), then for the retrain it started.

        A label call starts its retrain right after it releases the engine lock, before it next
        yields; so once the lock is ours, any retrain those labels triggered has been started and
        :meth:`wait_for_training` sees it.
        """
        async with self._lock:
            pass
        await self.wait_for_training()

"""The streaming selector: events in, decisions out, propose then commit.

Per micro-batch of B items (any mix of the two modalities), in arrival order:

1. embed each modality's items with the current model (one matmul per modality);
2. uncertainty against the OTHER modality's recent index (one (B, K) matmul) and raw diversity =
   distance to the same modality's selected-set cache (one (B, C) matmul); with a typicality
   weight, typicality against the SAME modality's recent index (one more (B, K) matmul);
3. normalise per modality, add the coverage bonus -> utility;
4. decide item by item with a :class:`~service.core.budget.BudgetDraft`; an accept immediately
   lowers the diversity of the *remaining* items of the batch (distance to the accepted vector),
   so two near-duplicates in one batch are not both accepted. With ``cross_insert`` an accepted
   item also counts for the other modality (its partner will lie near it in the shared space).

Cost per item is O(C·k + K·k) plus O(d·k) to embed; memory is bounded by C, K and the windows.

:meth:`StreamingSelector.propose` changes nothing; :meth:`StreamingSelector.commit` applies a
proposal (budget spend, cache inserts, normaliser/threshold history, recent index) and must be
called once the accepted items were published. Proposals must be committed in order; a proposal
made before another commit is rejected as stale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from service.core.acquisition import AcquisitionConfig, ModalityAwareAcquisition
from service.core.budget import BudgetConfig, BudgetController, BudgetDraft
from service.core.cost_budget import CostLedger
from service.core.cross_modal_model import CrossModalModel
from service.core.distance_cache import DistanceCache, pairwise_sq_dist
from service.core.partnerless import PartnerlessMemory
from service.core.reasons import Reason
from service.core.scorer import UncertaintyScorer
from service.core.types import Decision, FeatureItem, decisions_from_columns
from service.core.validation import as_matrix, check_modality, item_vectors


@dataclass(frozen=True)
class SelectorConfig:
    """Settings of :class:`StreamingSelector`."""

    # margin | entropy | least_confidence. least_confidence is the default: over 30 tuning seeds
    # it beat random on all seven learnable benchmark sets, entropy did not
    # (reports/stream-tuning.md).
    uncertainty: str = "least_confidence"
    tau: float = 0.05
    index_size: int = 4096  # K
    cache_capacity: int = 4096  # C
    cross_insert: bool = True
    cache_on_model_change: str = "reproject"  # or "invalidate"
    # drift: the distance to a selected item is inflated by 2 ** (age / half-life), age in items
    # offered since it was cached (DistanceCache, module doc); None: no decay. 4000 on tuning
    # seeds 100-103 of the whole Bible in book order (bench-long-stream): AUC +5.6 +- 4.0 x1000
    # against no decay, 1000: +2.2 +- 5.3; on shuffled streams (Bible 100-105, emoji 100-119)
    # level with no decay (AUC +17.6 vs +14.6 and +5.8 vs +5.8 over random). Near-duplicates of
    # old selections stay covered: the inflation multiplies a distance of ~0
    cache_half_life: float | None = 4000.0
    # NO_MATCH answers (service/core/partnerless.py): utility penalty of an item as similar as
    # a known partnerless one of its modality (cosine 1 -> the full weight, below the radius
    # -> none); the newest partnerless_capacity per modality are kept
    partnerless_weight: float = 0.5
    partnerless_radius: float = 0.8
    partnerless_capacity: int = 1024
    # "items": the budget counts requests (BudgetConfig.total); "cost": cost_total counts what
    # the answers cost (service/core/cost_budget.py), each accept spending its modality's
    # expected cost, and the utility is taken per unit of relative cost
    budget_unit: str = "items"
    cost_total: float | None = None
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)

    def __post_init__(self):
        if self.uncertainty not in ("margin", "entropy", "least_confidence"):
            raise ValueError(f"unknown uncertainty {self.uncertainty!r}; expected margin, entropy "
                             "or least_confidence")
        if self.cache_half_life is not None and not (np.isfinite(self.cache_half_life)
                                                     and self.cache_half_life > 0):
            raise ValueError(f"cache_half_life must be a number > 0 (items) or None, got "
                             f"{self.cache_half_life!r}")
        PartnerlessMemory(self.partnerless_capacity, self.partnerless_weight,
                          self.partnerless_radius)  # raises on a bad value, naming it
        if self.budget_unit not in ("items", "cost"):
            raise ValueError(f"budget_unit must be 'items' or 'cost', got {self.budget_unit!r}")
        if self.budget_unit == "items" and self.cost_total is not None:
            raise ValueError("cost_total is a budget in cost units: set budget_unit='cost'")
        if self.cache_on_model_change not in ("reproject", "invalidate"):
            raise ValueError("cache_on_model_change must be 'reproject' or 'invalidate', got "
                             f"{self.cache_on_model_change!r}")


@dataclass
class Proposal:
    """Decisions for one batch plus what :meth:`StreamingSelector.commit` needs to apply them."""

    decisions: list[Decision]
    _draft: BudgetDraft
    _raw: dict[str, np.ndarray]
    _emb: dict[str, torch.Tensor]
    _rows: dict[str, np.ndarray]  # batch positions of each modality's rows
    _unc: dict[str, np.ndarray]
    _div: dict[str, np.ndarray]
    _epoch: int
    _typ: dict[str, np.ndarray | None] = field(default_factory=dict)  # None: not computed

    @property
    def accepted(self) -> list[Decision]:
        return [d for d in self.decisions if d.accept]

    @property
    def vectors(self) -> list[np.ndarray]:
        """The validated vectors in arrival order: each (d_modality,) float32 (views)."""
        out: list = [None] * len(self.decisions)
        for m, r in self._rows.items():
            for k, i in enumerate(r.tolist()):
                out[i] = self._raw[m][k]
        return out


class StreamingSelector:
    """Composes scorer, per-modality distance caches, acquisition and budget. See module doc.

    Parameters
    ----------
    model : CrossModalModel
        Initial model (version 0 = cold start).
    config : SelectorConfig
    seed : int
        Seed of the budget's counter-based randomness.
    device : str or torch.device or None
    """

    def __init__(self, model: CrossModalModel, config: SelectorConfig | None = None, seed: int = 0,
                 device: str | torch.device | None = None):
        self.config = cfg = config or SelectorConfig()
        self.scorer = UncertaintyScorer(model, cfg.index_size, cfg.tau, device)
        self.modalities = model.modalities
        raw_dim = max(model.dims.values())
        self.caches = {m: DistanceCache(model.dim_out, cfg.cache_capacity, raw_dim=raw_dim,
                                        model_version=model.version, device=self.scorer.device)
                       for m in self.modalities}
        self.acquisition = ModalityAwareAcquisition(self.modalities, cfg.acquisition)
        self.costs = CostLedger(cfg.cost_total if cfg.budget_unit == "cost" else None,
                                self.modalities)
        self.partnerless = {m: PartnerlessMemory(cfg.partnerless_capacity, cfg.partnerless_weight,
                                                 cfg.partnerless_radius)
                            for m in self.modalities}
        self.budget = BudgetController(cfg.budget, seed)
        self._epoch = 0
        self.items_seen = {m: 0 for m in self.modalities}

    @property
    def model(self) -> CrossModalModel:
        return self.scorer.model

    @property
    def clock(self) -> int:
        """Items committed so far, both modalities: the age unit of the cache decay."""
        return sum(self.items_seen.values())

    @property
    def model_version(self) -> int:
        return self.scorer.model_version

    # ------------------------------------------------------------------ propose
    def propose(self, items: Sequence[FeatureItem]) -> Proposal:
        """Decide a batch without changing any state. Raises ``ValueError`` on bad input.

        This is where the core checks its input, once: modalities, then every vector
        (:func:`~service.core.validation.item_vectors`: a
        :class:`~service.core.validation.VectorError` naming the item, its modality, shape,
        dtype and first bad value; ``index`` is its position in ``items``).

        Shape: ``items[i].vector`` is (d_{items[i].modality},).
        """
        if len(items) == 0:
            raise ValueError("empty batch: propose() needs at least one item")
        mods = [it.modality for it in items]
        for m in dict.fromkeys(mods):  # each distinct modality once, the first bad one named
            check_modality(m, self.modalities)
        rows = {m: np.array([i for i, mm in enumerate(mods) if mm == m], dtype=np.int64)
                for m in self.modalities}
        raw, emb, unc, div, scores, norm = {}, {}, {}, {}, {}, {}
        typ: dict[str, np.ndarray | None] = {}
        kind = self.config.uncertainty
        acfg = self.config.acquisition
        clock = self.clock
        for m in self.modalities:
            if len(rows[m]) == 0:
                continue
            # the core's one entry check of the vectors (VectorError names the bad item)
            raw[m] = item_vectors([items[i].vector for i in rows[m]], self.model.dims[m],
                                  item_ids=[items[i].item_id for i in rows[m]], modality=m,
                                  positions=rows[m].tolist())
            emb[m] = self.scorer.embed_valid(m, raw[m])
            scores[m] = self.scorer.score(m, emb[m])
            unc[m] = scores[m].get(kind)
            div[m] = self.caches[m].min_distance(emb[m], clock, self.config.cache_half_life)
            typ[m] = (self.scorer.typicality(m, emb[m], acfg.typicality_k)
                      if acfg.typicality_weight > 0 else None)
        bonus = self.acquisition.coverage_bonus()
        # NO_MATCH answers: items like a known partnerless one lose utility (0 when none known)
        pen = {m: self.partnerless[m].penalty(emb[m], self.model_version,
                                              functools.partial(self.scorer.embed, m))
               for m in div}
        cur_div = {m: div[m].copy() for m in div}
        # typicality does not change within the batch: normalised once
        norm_t = {m: self.acquisition.normalized_typicality(m, typ[m]) for m in div}
        for m in div:
            norm[m] = list(self.acquisition.normalized(m, unc[m], div[m]))
        pos_in_mod = np.empty(len(items), dtype=np.int64)
        for m in rows:
            pos_in_mod[rows[m]] = np.arange(len(rows[m]))
        # Distances between the batch's own items, one matmul per modality pair: an accept then
        # lowers the later items' diversity with a table lookup.
        targets_of = {m: (self.modalities if self.config.cross_insert else (m,)) for m in emb}
        gram = {}
        with torch.inference_mode():
            for m in emb:
                for t in targets_of[m]:
                    if t in emb:
                        e_t, e_m = emb[t], emb[m]
                        gram[(t, m)] = pairwise_sq_dist(e_t, e_m, (e_m * e_m).sum(dim=1)) \
                            .sqrt_().double().cpu().numpy()
        by_cost = self.config.budget_unit == "cost"

        def value(m: str, sub: np.ndarray | slice = slice(None)) -> np.ndarray:
            """Utilities of modality m's items ``sub`` (elementwise: a subset gives the same
            values as the whole)."""
            t_m = norm_t[m]
            nt = t_m[sub] if isinstance(t_m, np.ndarray) else t_m
            u = self.acquisition.utility(norm[m][0][sub], norm[m][1][sub], bonus[m], nt) \
                - pen[m][sub]
            return self.costs.per_cost(m, u) if by_cost else u

        util = {m: value(m) for m in norm}
        n = len(items)
        draft = self.budget.begin(n)
        extra = {m: 0 for m in self.modalities}
        mod_idx = np.array([self.modalities.index(m) for m in mods])
        # arrival-order views of the per-modality arrays, refreshed after every accept
        u_all, d_all = np.empty(n), np.empty(n)
        for m in norm:
            u_all[rows[m]], d_all[rows[m]] = util[m], cur_div[m]
        accept = np.zeros(n, dtype=bool)
        thr_all, div_all, ut_all = np.empty(n), np.empty(n), np.empty(n)
        reasons: list[str] = []
        cost = np.zeros(n)  # what each accept spends in cost units (budget_unit "cost")
        pending = 0.0
        # a cost budget's random tail: from random_after of cost_total spent (the ledger's
        # spend, other workers' included, plus this batch's accepts so far)
        share = self.budget.config.random_after
        tail_from = (share * self.costs.total if by_cost and share is not None
                     and self.costs.total is not None else None)
        i = 0
        while i < n:
            # Decide up to the next accept in one vectorised step (between two accepts nothing
            # a decision depends on changes), then let the accept lower later items' diversity.
            allow = np.array([self.acquisition.quota_allows(m, extra) for m in self.modalities])
            blocked = ~allow[mod_idx[i:]]  # quota
            broke = None  # cost budget: the items whose expected cost no longer fits
            if by_cost:
                fits = np.array([self.costs.affordable(m, pending) for m in self.modalities])
                broke = ~fits[mod_idx[i:]] & ~blocked
                blocked = blocked | broke
            tail = None if tail_from is None else self.costs.spent + pending >= tail_from
            k, acc, thr, why = draft.decide_run(u_all[i:], blocked, tail)
            if broke is not None and broke[:k].any():
                why = [Reason.SKIP_BUDGET_EXHAUSTED if b else w
                       for w, b in zip(why, broke[:k].tolist(), strict=True)]
            thr_all[i:i + k], div_all[i:i + k], ut_all[i:i + k] = (thr, d_all[i:i + k],
                                                                   u_all[i:i + k])
            reasons += why
            i += k
            if not acc:
                continue
            a = i - 1
            accept[a] = True
            m, j = mods[a], int(pos_in_mod[a])
            if by_cost:
                cost[a] = self.costs.expected(m)
                pending += cost[a]
            extra[m] += 1
            for t in targets_of[m]:
                if (t, m) not in gram:
                    continue
                # only the undecided (later) items of t change: rows are in arrival order
                first = int(np.searchsorted(rows[t], a, side="right"))
                if first < len(rows[t]):
                    # only the items the accept is now the nearest selection of change (the
                    # rest keep their diversity, hence their utility, bit for bit)
                    hit = np.flatnonzero(gram[(t, m)][first:, j] < cur_div[t][first:]) + first
                    if len(hit) == 0:
                        continue
                    cur_div[t][hit] = gram[(t, m)][hit, j]
                    norm[t][1][hit] = self.acquisition.normalized_diversity(t, cur_div[t][hit])
                    util[t][hit] = value(t, hit)
                    u_all[rows[t][hit]] = util[t][hit]
                    d_all[rows[t][hit]] = cur_div[t][hit]
        version = self.model_version
        col = {}  # per-item score components in arrival order, as Python floats
        for name in ("uncertainty", "margin", "entropy", "least_confidence"):
            arr = np.empty(n)
            for m in unc:
                arr[rows[m]] = unc[m] if name == "uncertainty" else getattr(scores[m], name)
            col[name] = arr.tolist()
        typ_all = np.zeros(n)
        for m in typ:
            if typ[m] is not None:
                typ_all[rows[m]] = typ[m]
        col["typicality"] = typ_all.tolist()
        pen_all = np.zeros(n)
        for m in pen:
            pen_all[rows[m]] = pen[m]
        col["partnerless"] = pen_all.tolist()
        decisions = decisions_from_columns({
            "item_id": [it.item_id for it in items], "modality": mods, "accept": accept.tolist(),
            "utility": ut_all.tolist(), "uncertainty": col["uncertainty"],
            "diversity": div_all.tolist(), "coverage_bonus": [float(bonus[m]) for m in mods],
            "margin": col["margin"], "entropy": col["entropy"],
            "least_confidence": col["least_confidence"], "threshold": thr_all.tolist(),
            "model_version": [version] * n, "reason": reasons,
            "typicality": col["typicality"], "partnerless": col["partnerless"],
            "cost": cost.tolist()})
        return Proposal(decisions, draft, raw, emb, rows, unc, div, self._epoch, typ)

    def deny(self, proposal: Proposal, positions: Sequence[int]) -> Proposal:
        """The proposal with its accepts at ``positions`` turned into ``skip:budget_exhausted``.

        For a budget shared by several workers (:mod:`service.core.budget_ledger`): the accepts
        the ledger granted no unit are not requested, not spent and not cached when the result
        is committed. The other decisions stay as proposed (a denial means the shared budget is
        spent, and the ledger then grants no later accept of the batch a new unit either).

        Raises
        ------
        ValueError
            A position outside the batch or of a decision that is not an accept.
        """
        denied = set(int(k) for k in positions)
        for k in sorted(denied):
            if not 0 <= k < len(proposal.decisions) or not proposal.decisions[k].accept:
                raise ValueError(f"deny: position {k} is not an accept of this batch of "
                                 f"{len(proposal.decisions)}")
        decisions = [replace(d, accept=False, reason=Reason.SKIP_BUDGET_EXHAUSTED, cost=0.0)
                     if i in denied else d for i, d in enumerate(proposal.decisions)]
        return replace(proposal, decisions=decisions)

    # ------------------------------------------------------------------ commit
    def commit(self, proposal: Proposal) -> None:
        """Apply a proposal after its accepted items were safely published."""
        if proposal._epoch != self._epoch:
            raise ValueError("stale proposal: another proposal was committed or the model changed")
        n_acc = sum(d.accept for d in proposal.decisions)
        self.budget.commit(proposal._draft, accepted=n_acc)
        self.costs.spend(sum(d.cost for d in proposal.decisions if d.accept))
        clock = self.clock  # the batch was scored at this clock; its accepts are born at it
        for m, r in proposal._rows.items():
            if len(r) == 0:
                continue
            acc = np.array([proposal.decisions[i].accept for i in r])
            self.acquisition.commit(m, proposal._unc[m], proposal._div[m], int(acc.sum()),
                                    proposal._typ.get(m))
            self.scorer.observe(m, proposal._raw[m], proposal._emb[m],
                                [proposal.decisions[i].item_id for i in r])
            self.items_seen[m] += len(r)
            if acc.any():
                sel = torch.as_tensor(np.flatnonzero(acc), device=proposal._emb[m].device)
                z = proposal._emb[m][sel]
                raw = proposal._raw[m][acc]
                targets = self.modalities if self.config.cross_insert else (m,)
                for t in targets:
                    self.caches[t].add(z, raw, tag=self._tag(m), clock=clock)
        self._epoch += 1

    def _tag(self, modality: str) -> int:
        return self.modalities.index(modality)

    def partner_candidates(self, proposal: Proposal, k: int) -> dict[str, list[tuple[str, float]]]:
        """Top-k likely partners (other modality, recent index) of each ACCEPTED item, by item
        id."""
        out: dict[str, list[tuple[str, float]]] = {}
        for m, r in proposal._rows.items():
            acc = [j for j, i in enumerate(r) if proposal.decisions[i].accept]
            if not acc:
                continue
            z = proposal._emb[m][torch.as_tensor(acc, device=proposal._emb[m].device)]
            for j, cands in zip(acc, self.scorer.top_partners(m, z, k), strict=True):
                out[proposal.decisions[r[j]].item_id] = cands
        return out

    def observe_external(self, modality: str, raw, count_budget: bool = True,
                         cost: float = 0.0) -> None:
        """An item selected by ANOTHER worker: its diversity counts here, and (by default) its
        spend counts against this worker's view of the shared budget (``cost``: what the
        selections spent in cost units). raw: (n, d_modality)."""
        check_modality(modality, self.modalities)
        arr = as_matrix(raw, self.model.dims[modality], name=f"external {modality}")
        z = self.scorer.embed_valid(modality, arr)
        targets = self.modalities if self.config.cross_insert else (modality,)
        for t in targets:
            self.caches[t].add(z, arr, tag=self._tag(modality), clock=self.clock)
        if count_budget:
            self.budget.record_external(len(arr))
            self.costs.spend(cost)
        self._epoch += 1

    def reveal_partner(self, modality: str, raw) -> None:
        """An annotator revealed a partner item of ``modality``: cache it (diversity knows it now).

        raw: (n, d_modality).
        """
        check_modality(modality, self.modalities)
        arr = as_matrix(raw, self.model.dims[modality], name=f"partner {modality}")
        self.caches[modality].add(self.scorer.embed_valid(modality, arr), arr,
                                  tag=self._tag(modality), clock=self.clock)
        self._epoch += 1

    def observe_cost(self, modality: str, cost: float) -> None:
        """An answer about an item of ``modality`` cost ``cost`` (its label's cost): the
        expected cost of that modality follows (:mod:`service.core.cost_budget`)."""
        check_modality(modality, self.modalities)
        self.costs.observe(modality, cost)

    def mark_partnerless(self, modality: str, raw) -> None:
        """Annotators answered NO_MATCH for these items: they and items like them lose utility
        (:mod:`service.core.partnerless`). raw: (n, d_modality)."""
        check_modality(modality, self.modalities)
        arr = as_matrix(raw, self.model.dims[modality], name=f"partnerless {modality}")
        self.partnerless[modality].add(arr)
        self._epoch += 1

    # ------------------------------------------------------------------ model swap
    def set_model(self, model: CrossModalModel) -> None:
        """Hot-swap the alignment model; caches follow the new space (re-projected or dropped)."""
        self.scorer.set_model(model)
        for cache in self.caches.values():
            if self.config.cache_on_model_change == "invalidate":
                cache.invalidate(model.version)
            else:
                cache.reproject(lambda raw, tag: self.scorer.embed(self.modalities[tag], raw),
                                model.version)
        self._epoch += 1

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Budget, per-modality counts, model version and cache fill (plain data)."""
        return {
            "spent": self.budget.spent,
            "remaining": self.budget.remaining,
            "seen": self.budget.seen,
            "acceptance_rate": self.budget.acceptance_rate(),
            "threshold": self.budget.threshold(),
            "accepted_per_modality": dict(self.acquisition.accepts),
            "seen_per_modality": dict(self.items_seen),
            "model_version": self.model_version,
            "cache_fill": {m: c.fill() for m, c in self.caches.items()},
            "cache_evictions": {m: c.evictions for m, c in self.caches.items()},
            "budget_unit": self.config.budget_unit,
            "cost_spent": self.costs.spent,
            "cost_total": self.costs.total,
            "expected_cost": {m: self.costs.expected(m) for m in self.modalities},
        }

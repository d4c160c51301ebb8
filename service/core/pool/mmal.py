"""Modality-aware uncertainty + diversity selection for unaligned data ([MMAL]).

[MMAL] ("Towards Multimodal Active Learning: Efficient Learning with Limited Paired Data")
combines, in a modality-aware design, a diversity step and an uncertainty step, and makes the
diversity step linear-time with a distance cache (its appendix: ``O(|D_t|·|S_{t-1}|)`` once, then
``O(|D_t|)`` per greedy step). This module implements the three steps as:

1. **Modality choice.** The coverage gap of modality ``m`` is the mean, over its candidates, of
   the Euclidean distance to the nearest acquired item of ``m`` (``selected[m]``); the larger the
   gap, the less covered the modality. A modality with no acquired item is least covered. Ties
   go to the modality with fewer acquisitions so far (``acquired_per_modality``), then to the
   first modality.
2. **Diversity.** :func:`~service.core.pool.kcenter.k_center_greedy`'s cached greedy on that
   modality's candidates (reusing the cache computed in step 1) yields a candidate set of size
   ``candidate_factor * budget``.
3. **Uncertainty.** The ``budget`` candidates with the lowest margin, i.e. the highest
   :func:`~service.core.uncertainty.margin_uncertainty` against the other modality's candidates
   (temperature ``tau``), are picked.

Adaptations: the paper's exact scoring combination is not given in the text we have; we follow
its stated order (modality choice, diversity shortlist, uncertainty ranking). If the chosen
modality has fewer than ``budget`` candidates, all of them are taken and the rest of the budget
is filled from the other modality by the same steps 2-3.
"""

from __future__ import annotations

import numpy as np

from service.core.pool.base import Pick, PoolState, check_budget
from service.core.pool.kcenter import greedy_from_cache, sq_min_dist_to
from service.core.pool.uncertainty_sampling import cross_modal_scores


def coverage_gaps(state: PoolState) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Coverage gap of each modality and the squared-distance cache it was computed from.

    Returns
    -------
    gaps : dict of str to float
        Mean distance of the modality's candidates to its acquired set (``inf`` if that set is
        empty; ``nan`` is never produced: a modality without candidates gets ``-inf``).
    caches : dict of str to ndarray of shape (n_m,)
        Squared min-distances, reusable as the k-center greedy cache.
    """
    gaps: dict[str, float] = {}
    caches: dict[str, np.ndarray] = {}
    for m in state.modalities:
        cache = sq_min_dist_to(state.embedded[m], state.selected[m])
        caches[m] = cache
        if cache.size == 0:
            gaps[m] = -np.inf
        elif np.isinf(cache).any():
            gaps[m] = np.inf
        else:
            gaps[m] = float(np.sqrt(cache).mean())
    return gaps, caches


class MMALStrategy:
    """The modality-aware selection of [MMAL] (see the module docstring).

    Parameters
    ----------
    candidate_factor : int
        The diversity shortlist has ``candidate_factor * budget`` items (default 3).
    tau : float
        Softmax temperature of the margin score (default 0.05).
    """

    name = "mmal"

    def __init__(self, candidate_factor: int = 3, tau: float = 0.05):
        if int(candidate_factor) < 1:
            raise ValueError(f"candidate_factor must be >= 1, got {candidate_factor}")
        if not tau > 0:
            raise ValueError(f"temperature tau must be > 0, got {tau}")
        self.candidate_factor = int(candidate_factor)
        self.tau = float(tau)

    @staticmethod
    def modality_order(state: PoolState, gaps: dict[str, float] | None = None) -> list[str]:
        """Modalities, least covered first (step 1); ``gaps`` as from :func:`coverage_gaps`."""
        if gaps is None:
            gaps, _ = coverage_gaps(state)
        acq = state.acquired_per_modality
        idx = {m: i for i, m in enumerate(state.modalities)}
        return sorted(state.modalities, key=lambda m: (-gaps[m], acq.get(m, 0), idx[m]))

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """Return up to ``budget`` distinct picks; deterministic (``rng`` is not needed)."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        gaps, caches = coverage_gaps(state)
        picks: list[Pick] = []
        for m in self.modality_order(state, gaps):
            need = budget - len(picks)
            if need == 0:
                break
            n_m = state.size(m)
            if n_m == 0:
                continue
            points = np.asarray(state.embedded[m], dtype=np.float64)
            shortlist = np.asarray(
                greedy_from_cache(points, caches[m].copy(), self.candidate_factor * need),
                dtype=np.intp,
            )
            scores = cross_modal_scores(state, m, "margin", self.tau, rows=shortlist)
            best = shortlist[np.argsort(-scores, kind="stable")[:need]]
            picks.extend((m, int(i)) for i in best)
        return picks

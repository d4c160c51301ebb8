"""Pool-based selection strategies. ``STRATEGIES`` maps each baseline's name to its class;
``DEFAULT_STRATEGY`` is pairsieve's own (what ``default`` means to the service and the
benchmark)."""

from __future__ import annotations

from service.core.pool.badge import BadgeStrategy
from service.core.pool.base import PoolStrategy
from service.core.pool.bmmal import BMMALStrategy
from service.core.pool.hybrid import HybridStrategy
from service.core.pool.kcenter import CoresetStrategy
from service.core.pool.mmal import MMALStrategy
from service.core.pool.random import RandomStrategy
from service.core.pool.uncertainty_sampling import EntropyStrategy, MarginStrategy
from service.core.pool.vecaf import VeCAFStrategy

STRATEGIES: dict[str, type[PoolStrategy]] = {
    "random": RandomStrategy,
    "coreset": CoresetStrategy,
    "entropy": EntropyStrategy,
    "margin": MarginStrategy,
    "mmal": MMALStrategy,
    "badge": BadgeStrategy,
    "bmmal": BMMALStrategy,
    "vecaf": VeCAFStrategy,
}

# with its own defaults: margin 0.3 + diversity 0.7, rank
DEFAULT_STRATEGY: type[PoolStrategy] = HybridStrategy


__all__ = ["DEFAULT_STRATEGY", "STRATEGIES"]

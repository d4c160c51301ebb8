"""Pool-based selection strategies. ``STRATEGIES`` maps each baseline's name to its class;
``DEFAULT_STRATEGY`` is pairsieve's own (what ``default`` means to the service and the
benchmark)."""

from __future__ import annotations

from collections.abc import Callable

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



def default_pool_strategy() -> PoolStrategy:
    """pairsieve's pool default: diversity 0.5 + typicality 0.5, rank-normalised per modality, no
    uncertainty term ([TypiClust]: typical items in regions nothing acquired covers yet).

    Chosen on tuning seeds 100-119 (emoji) and 100-105 (Bible), never the report's: on the emoji
    image-text set, where the learner stays below R@1 0.1, the former default (margin 0.3 +
    diversity 0.7) lost to random (AUC -11.6 +- 2.9 x1000) and this one beats it (+8.1 +- 2.4);
    the margin term alone lost too (-8.5 +- 2.8), and so did typicality without diversity
    (-13.0 +- 1.9). See reports/quality-notes.md.
    """
    return HybridStrategy(weight=0.0, typicality=0.5)


DEFAULT_STRATEGY: Callable[[], PoolStrategy] = default_pool_strategy


__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "default_pool_strategy"]

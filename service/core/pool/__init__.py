"""Pool-based selection strategies. ``STRATEGIES`` maps each baseline's name to its class;
``DEFAULT_STRATEGY`` is pairsieve's own (what ``default`` means to the service and the benchmark)."""

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

STRATEGIES: dict[str, type] = {
    "random": RandomStrategy,
    "coreset": CoresetStrategy,
    "entropy": EntropyStrategy,
    "margin": MarginStrategy,
    "mmal": MMALStrategy,
    "badge": BadgeStrategy,
    "bmmal": BMMALStrategy,
    "vecaf": VeCAFStrategy,
}

DEFAULT_STRATEGY: type = HybridStrategy  # with its own defaults: margin 0.3 + diversity 0.7, rank


def make_strategy(name: str, **kwargs) -> PoolStrategy:
    """Instantiate the strategy registered as ``name`` with constructor ``kwargs``.

    Raises
    ------
    ValueError
        ``name`` is not a key of :data:`STRATEGIES`; the message lists the known names.
    """
    try:
        cls = STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown pool strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls(**kwargs)


__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "make_strategy"]

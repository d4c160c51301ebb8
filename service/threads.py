"""One process-wide thread budget for compute (torch intra-op and the BLAS pools).

Kept out of :mod:`service.runtime` so benchmarks and worker processes can set it without
importing the Kafka, faust and gRPC adapters.
"""

from __future__ import annotations


def limit_compute_threads(n: int) -> None:
    """Cap torch's intra-op pool and every BLAS/OpenMP pool numpy or scikit-learn use at ``n``.

    The per-batch matmuls are small, so extra threads mostly add synchronisation; on a shared box
    they also steal the event loop's core. Environment variables such as ``OPENBLAS_NUM_THREADS``
    are read once, when a BLAS library is loaded: a process forked from a parent that had already
    loaded it keeps the parent's pool size, so this goes through threadpoolctl instead.
    """
    if int(n) < 1:
        raise ValueError(f"thread count must be >= 1, got {n!r}")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(n))
    threadpool_limits(limits=int(n))  # not as a context manager: stays in force

"""Offline active-learning evaluation, a product feature (``pairsieve simulate``, ``datasets``,
``bench-quality``, ``bench-long-stream``, ``demo``): built-in and real two-view datasets
(:mod:`~service.evaluation.datasets`, ``data/``, :mod:`~service.evaluation.real_build`), the
pool/stream simulator, learning-curve metrics (:mod:`~service.evaluation.curves`), the quality
report and the long-stream report. The performance harness is :mod:`service.perfbench`."""

"""Performance harness (``pairsieve bench``, ``pairsieve bench-stream-cost``, ``make bench``):
the engine grid, peers, cost vs stream length, profile, Kafka/gRPC end to end and GPU
(:mod:`~service.perfbench.perf`, :mod:`~service.perfbench.peers`,
:mod:`~service.perfbench.stream_cost`, :mod:`~service.perfbench.e2e`).
The offline active-learning evaluation is :mod:`service.evaluation`."""

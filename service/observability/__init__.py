"""Prometheus metrics of the service: :class:`~service.observability.metrics.PairsieveMetrics`."""

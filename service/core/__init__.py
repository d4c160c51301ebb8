"""Pure selection core: numpy and torch only (no I/O, no asyncio, no Kafka/gRPC/Prometheus)."""

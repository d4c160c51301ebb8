"""gRPC adapter: server and servicer (wire codecs live in ``service.wire``)."""

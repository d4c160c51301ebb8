"""Kafka adapter: faust app, agents, embedded broker."""

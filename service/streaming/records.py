"""A raw Kafka record as the stream processor sees it, before decoding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed record: its bytes, headers and position.

    Attributes
    ----------
    value : bytes or None
        The record value as consumed (``None`` for a tombstone).
    headers : sequence of (str, bytes), dict or None
        Record headers as the client gives them (faust: a list of pairs or a dict).
    topic : str
    partition : int
    offset : int
        Position of the record (named in dead letters).
    """

    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | dict[str, bytes] | None
    topic: str
    partition: int
    offset: int

    @classmethod
    def from_message(cls, message: Any) -> KafkaRecord:
        """From a faust/aiokafka message (anything with ``value``, ``headers``, ``topic``,
        ``partition`` and ``offset`` attributes)."""
        return cls(message.value, message.headers, message.topic, message.partition,
                   message.offset)

"""A bounded least-recently-written mapping (the facade's dedup memory, the loop's item memory)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LRU(OrderedDict):
    """An ``OrderedDict`` that keeps at most ``capacity`` entries.

    :meth:`put` inserts or refreshes a key as the newest and drops the oldest beyond
    ``capacity``; plain ``d[key] = value`` does not evict.

    Parameters
    ----------
    capacity : int
        Most entries kept.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)

    def put(self, key: Hashable, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)

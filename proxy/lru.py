"""A bounded map whose entries expire at their own deadline: a hit is one dict get.

It does the job of cachetools' TLRUCache for the two caches every request reads (validated
claims and CPI tokens). TLRUCache costs several Python calls per lookup (a timer context,
expiry bookkeeping, two levels of `get`); here a hit is an OrderedDict get, a clock read and a
`move_to_end`, all in C. Expired entries are dropped when met, and the least recently used entry
is dropped when the map is full, so the size bound always holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringLRU(MutableMapping[K, V], Generic[K, V]):
    def __init__(
        self,
        maxsize: int,
        *,
        deadline: Callable[[V], float],
        clock: Callable[[], float],
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._deadline = deadline
        self._clock = clock
        self._on_evict = on_evict
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        entry = self._data.get(key)
        if entry is None:
            return default
        if entry[0] <= self._clock():
            del self._data[key]
            return default
        self._data.move_to_end(key)
        return entry[1]

    def __getitem__(self, key: K) -> V:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        until = self._deadline(value)
        now = self._clock()
        if until <= now:  # already expired: storing it would only push out a live entry
            self._data.pop(key, None)
            return
        self._data[key] = (until, value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            _, (oldest_until, _) = self._data.popitem(last=False)
            if oldest_until > now and self._on_evict is not None:
                self._on_evict()  # pushed out by size; expiry is not an eviction

    def __delitem__(self, key: K) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        entry = self._data.get(key)  # type: ignore[arg-type]
        return entry is not None and entry[0] > self._clock()

    def __iter__(self) -> Iterator[K]:
        now = self._clock()
        return iter([key for key, (until, _) in self._data.items() if until > now])

    def __len__(self) -> int:
        """Live entries; drops expired ones on the way (O(n): for gauges and tests)."""
        self.expire()
        return len(self._data)

    def expire(self) -> None:
        now = self._clock()
        for key in [key for key, (until, _) in self._data.items() if until <= now]:
            del self._data[key]

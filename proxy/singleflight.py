"""Single-flight: concurrent callers for one key share one in-flight fetch.

async-lru's recipe: keep the task, shield every waiter, forget the task when it ends. A failure
reaches the waiters of that flight only (nothing is cached here; the fetch stores its own
result), and a cancelled waiter never cancels the fetch the others are waiting for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self.waiting = 0  # callers awaiting a flight; observable for tests and metrics

    def busy(self, key: K) -> bool:
        return key in self._inflight

    async def run(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(fetch())
            self._inflight[key] = task
            task.add_done_callback(partial(self._forget, key))
        self.waiting += 1
        try:
            return await asyncio.shield(task)
        finally:
            self.waiting -= 1

    async def close(self) -> None:
        """Cancel every flight and wait for it to end. A flight outlives its cancelled waiters
        by design, so without this one could still hold a connection after shutdown."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, key: K, task: asyncio.Future[V]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have gone away


async def replace_stale(
    cache: MutableMapping[K, V],
    flights: SingleFlight[K, V],
    key: K,
    stale: V | None,
    fetch: Callable[[], Awaitable[V]],
) -> V:
    """A value other than `stale` (which upstream refused): one that another caller already put
    in its place, the fetch already in flight, or one new fetch, never one per caller."""
    current = cache.get(key)
    if current is not None and current is not stale:
        return current
    if current is not None and not flights.busy(key):
        del cache[key]
    return await flights.run(key, fetch)

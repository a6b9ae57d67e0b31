"""ExpiringLRU: each entry lives until its own deadline, and the size bound always holds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.lru import ExpiringLRU


@dataclass(frozen=True)
class Item:
    name: str
    until: float


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(maxsize: int = 3) -> tuple[ExpiringLRU[str, Item], Clock, list[None]]:
    clock = Clock()
    evicted: list[None] = []
    cache: ExpiringLRU[str, Item] = ExpiringLRU(
        maxsize,
        deadline=lambda item: item.until,
        clock=clock,
        on_evict=lambda: evicted.append(None),
    )
    return cache, clock, evicted


def test_each_entry_expires_at_its_own_deadline() -> None:
    cache, clock, _ = make()
    cache["a"], cache["b"] = Item("a", 1010), Item("b", 1020)
    clock.now = 1010
    assert cache.get("a") is None and "a" not in cache
    assert cache.get("b") == Item("b", 1020) and "b" in cache
    clock.now = 1020
    assert cache.get("b") is None
    assert len(cache) == 0


def test_full_cache_drops_the_least_recently_used_and_counts_it() -> None:
    cache, _, evicted = make(maxsize=2)
    cache["a"], cache["b"] = Item("a", 2000), Item("b", 2000)
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache["c"] = Item("c", 2000)
    assert sorted(cache) == ["a", "c"]
    assert len(evicted) == 1


def test_dropping_an_expired_entry_for_room_is_not_an_eviction() -> None:
    cache, clock, evicted = make(maxsize=1)
    cache["a"] = Item("a", 1005)
    clock.now = 1006
    cache["b"] = Item("b", 2000)
    assert list(cache) == ["b"]
    assert evicted == []


def test_an_already_expired_value_is_not_stored_and_replaces_nothing_live() -> None:
    cache, _, _ = make(maxsize=1)
    cache["a"] = Item("a", 2000)
    cache["b"] = Item("b", 999)
    assert list(cache) == ["a"]
    cache["a"] = Item("a", 999)  # an expired replacement removes the old value too
    assert cache.get("a") is None


def test_mapping_protocol() -> None:
    cache, _, _ = make()
    cache["a"] = Item("a", 2000)
    assert cache["a"].name == "a"
    assert cache.pop("a").name == "a"
    with pytest.raises(KeyError):
        cache["a"]
    with pytest.raises(ValueError, match="maxsize"):
        ExpiringLRU(0, deadline=lambda item: 0.0, clock=Clock())

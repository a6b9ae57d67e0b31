"""Prometheus metrics. Labels are bounded: route names, grants, outcomes, never paths or users.

Each app owns a `CollectorRegistry`, so two apps in one process (tests, `dev`) never collide.
The values touched on every request (requests, durations, in flight, bytes, cache lookups) are
plain numbers read at scrape time: the event loop is single-threaded, so they need none of
prometheus-client's per-update locks (a labelled Histogram observation cost ~4 µs).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# From a warm-cache hop (~1 ms) to a slow iFlow (a minute).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


class Tally:
    """A number the event loop bumps without a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount


class Timings:
    """A histogram of one label set that the event loop updates without a lock."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BUCKETS, seconds)] += 1  # le: a value on a bound counts in it
        self.total += seconds


def _histogram(name: str, help_text: str, label: str, timings: dict[str, Timings]) -> Metric:
    family = HistogramMetricFamily(name, help_text, labels=[label])
    bounds = [*(repr(float(b)) for b in _BUCKETS), "+Inf"]  # "60.0", as prometheus-client writes
    for value, t in list(timings.items()):
        cumulative = zip(bounds, accumulate(t.counts), strict=True)
        family.add_metric([value], buckets=list(cumulative), sum_value=t.total)
    return family


class _Hot(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(
            "cpi_proxy_requests",
            "Requests answered, by route, method and status class.",
            labels=["route", "method", "status_class"],
        )
        for (route, method, status_class), tally in list(m.answered.items()):
            requests.add_metric([route, method, f"{status_class}xx"], tally.value)
        yield requests
        yield _histogram(
            "cpi_proxy_request_duration_seconds",
            "Whole request, until the last byte of the answer.",
            "route",
            m.request_timings,
        )
        yield _histogram(
            "cpi_proxy_upstream_duration_seconds",
            "CPI's time to answer headers, per call to CPI (retries count separately).",
            "route",
            m.upstream_timings,
        )
        yield GaugeMetricFamily(
            "cpi_proxy_requests_in_flight", "Requests being handled.", value=m.in_flight.value
        )
        try:
            tasks = len(asyncio.all_tasks())  # counted at scrape time only
        except RuntimeError:  # rendered outside an event loop: nothing to count
            pass
        else:
            yield GaugeMetricFamily(
                "cpi_proxy_asyncio_tasks",
                "asyncio tasks alive in this process (connections and requests have theirs):"
                " growth while idle is a leak.",
                value=tasks,
            )
        yield _counter(
            "cpi_proxy_upstream_bytes",
            "Body bytes sent to (out) and received from (in) CPI.",
            "direction",
            {"out": m.bytes_out, "in": m.bytes_in},
        )
        yield _counter(
            "cpi_proxy_token_cache_lookups",
            "CPI token cache lookups by result (hit or miss).",
            "result",
            {"hit": m.cache_hit, "miss": m.cache_miss},
        )


def _counter(name: str, help_text: str, label: str, tallies: dict[str, Tally]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, tally in tallies.items():
        family.add_metric([value], tally.value)
    return family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.exchange_seconds = Histogram(
            "cpi_proxy_token_exchange_duration_seconds",
            "Token requests to XSUAA.",
            ["grant"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.exchanges = Counter(
            "cpi_proxy_token_exchanges",
            "Token exchanges with XSUAA by grant and outcome (success or the error code).",
            ["grant", "outcome"],
            registry=r,
        )
        self.exchange_retries = Counter(
            "cpi_proxy_token_exchange_retries",
            "Token requests sent a second time after a transient failure (at most one each).",
            ["grant"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "cpi_proxy_token_cache_evictions",
            "CPI tokens dropped from a full cache before they expired.",
            registry=r,
        )
        self.cache_size = Gauge(
            "cpi_proxy_token_cache_size", "CPI tokens currently cached.", registry=r
        )
        self.client_connections = Gauge(
            "cpi_proxy_client_connections",
            "Client connections open in this process (serve only).",
            registry=r,
        )
        self.clients_refused = Counter(
            "cpi_proxy_client_connections_refused",
            "Client connections answered 503 because CPI_PROXY_MAX_CLIENTS were open.",
            registry=r,
        )
        self.head_timeouts = Counter(
            "cpi_proxy_request_head_timeouts",
            "Connections closed because a request head took over CPI_PROXY_HEADER_TIMEOUT.",
            registry=r,
        )
        self.heads_too_large = Counter(
            "cpi_proxy_request_heads_too_large",
            "Connections answered 431 because a request head passed CPI_PROXY_MAX_HEAD_BYTES.",
            registry=r,
        )
        self.key_fetches = Counter(
            "cpi_proxy_key_fetches",
            "Fetches of XSUAA's verification keys by outcome.",
            ["outcome"],
            registry=r,
        )
        self.in_flight, self.bytes_out, self.bytes_in = Tally(), Tally(), Tally()
        self.cache_hit, self.cache_miss = Tally(), Tally()
        r.register(_Hot(self))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, ...
        # Bounded: routes x 8 methods x 5 status classes; routes only.
        self.answered: dict[tuple[str, str, int], Tally] = {}
        self.request_timings: dict[str, Timings] = {}
        self.upstream_timings: dict[str, Timings] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request."""
        key = (route, method_label(method), status // 100)
        tally = self.answered.get(key)
        if tally is None:
            tally = self.answered[key] = Tally()
        tally.value += 1
        self.timings(self.request_timings, route).observe(seconds)

    @staticmethod
    def timings(family: dict[str, Timings], route: str) -> Timings:
        found = family.get(route)
        if found is None:
            found = family[route] = Timings()
        return found

    def track_cache_size(self, size: Callable[[], int]) -> None:
        self.cache_size.set_function(lambda: float(size()))

    def track_clients(self, count: Callable[[], int]) -> None:
        self.client_connections.set_function(lambda: float(count()))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics. Labels are bounded: route names, grants, outcomes, never paths or users.

Each app owns a `CollectorRegistry`, so two apps in one process (tests, `dev`) never collide.
The values touched on every request (in flight, bytes, cache lookups) are plain integers read
at scrape time: the event loop is single-threaded, so they need none of prometheus-client's
per-update locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


class _Hot(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield GaugeMetricFamily(
            "cpi_proxy_requests_in_flight", "Requests being handled.", value=m.in_flight.value
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
        self.requests = Counter(
            "cpi_proxy_requests",
            "Requests answered, by route, method and status class.",
            ["route", "method", "status_class"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "cpi_proxy_request_duration_seconds",
            "Whole request, until the last byte of the answer.",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "cpi_proxy_upstream_duration_seconds",
            "CPI's time to answer headers, per call to CPI (retries count separately).",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
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
        self.key_fetches = Counter(
            "cpi_proxy_key_fetches",
            "Fetches of XSUAA's verification keys by outcome.",
            ["outcome"],
            registry=r,
        )
        self.in_flight, self.bytes_out, self.bytes_in = Tally(), Tally(), Tally()
        self.cache_hit, self.cache_miss = Tally(), Tally()
        r.register(_Hot(self))
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request; label children are looked up once per label set."""
        key = (route, method_label(method), status // 100)  # bounded: routes x 8 x 5
        children = self._children.get(key)
        if children is None:
            labels = (route, key[1], f"{status // 100}xx")
            children = self.requests.labels(*labels), self.request_seconds.labels(route)
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def track_cache_size(self, size: Callable[[], int]) -> None:
        self.cache_size.set_function(lambda: float(size()))

    def track_clients(self, count: Callable[[], int]) -> None:
        self.client_connections.set_function(lambda: float(count()))

    def render(self) -> bytes:
        return generate_latest(self.registry)

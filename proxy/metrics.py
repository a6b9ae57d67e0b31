"""Prometheus metrics. Labels are bounded: route names, grants, outcomes, never paths or users.

Each app owns a `CollectorRegistry`, so two apps in one process (tests, `dev`) never collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# From a warm-cache hop (~1 ms) to a slow iFlow (a minute).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


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
            "Token requests to XSUAA by grant and outcome (success or the error code).",
            ["grant", "outcome"],
            registry=r,
        )
        self.cache = Counter(
            "cpi_proxy_token_cache_lookups",
            "CPI token cache lookups by result (hit or miss).",
            ["result"],
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
        self.key_fetches = Counter(
            "cpi_proxy_key_fetches",
            "Fetches of XSUAA's verification keys by outcome.",
            ["outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            "cpi_proxy_requests_in_flight", "Requests being handled.", registry=r
        )
        self.upstream_bytes = Counter(
            "cpi_proxy_upstream_bytes",
            "Body bytes sent to (out) and received from (in) CPI.",
            ["direction"],
            registry=r,
        )
        self.bytes_out = self.upstream_bytes.labels("out")
        self.bytes_in = self.upstream_bytes.labels("in")
        self.cache_hit = self.cache.labels("hit")
        self.cache_miss = self.cache.labels("miss")

    def track_cache_size(self, size: Callable[[], int]) -> None:
        self.cache_size.set_function(lambda: float(size()))

    def render(self) -> bytes:
        return generate_latest(self.registry)

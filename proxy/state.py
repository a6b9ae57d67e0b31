"""Typed keys for what the app and each request carry (aiohttp's AppKey / RequestKey)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.auth import TokenValidator
from proxy.bindings import Bindings
from proxy.csrf import CsrfStore
from proxy.exchange import TokenExchanger
from proxy.forward import Forwarder
from proxy.keys import KeyStore
from proxy.metrics import Metrics
from proxy.reload import RouteState
from proxy.settings import Settings
from proxy.upstream import Pool


@dataclass(frozen=True)
class Pipeline:
    keys: KeyStore
    validator: TokenValidator
    exchanger: TokenExchanger
    forwarder: Forwarder
    csrf: CsrfStore
    pool: Pool  # connections to CPI


SETTINGS = web.AppKey("settings", Settings)
BINDINGS = web.AppKey("bindings", Bindings)
ROUTES = web.AppKey("routes", RouteState)
PIPELINE = web.AppKey("pipeline", Pipeline)
METRICS = web.AppKey("metrics", Metrics)
# Operator endpoints by exact path (/healthz, /readyz, ...); everything else is proxied.
Endpoint = Callable[[web.Application, web.Request], Awaitable[web.StreamResponse]]
ENDPOINTS = web.AppKey("endpoints", dict[str, Endpoint])

CORRELATION_ID = web.RequestKey("correlation_id", str)
ROUTE_NAME = web.RequestKey("route_name", str)  # for metrics and the request log
USER = web.RequestKey("user", str)  # an anonymous id of the caller, for the request log

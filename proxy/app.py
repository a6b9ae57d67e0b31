"""The aiohttp application: wiring of the pipeline and the single error-to-HTTP mapping.

    route -> authenticate -> authorize -> exchange -> forward

One cleanup context owns the connections: the lean `upstream.Pool` for calls to CPI, and a
ClientSession (no cookie jar, no auto-decompression) for XSUAA and CSRF fetches, and everything
built on them; handlers raise `ProxyError`s and `handle` renders them.
`handle` also sets the correlation id for logging and records the request metrics.
Operator endpoints live in `ops`, the token insight page in `debug`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import debug, ops
from proxy.auth import TokenValidator, authorize, bearer_token
from proxy.bindings import Bindings
from proxy.csrf import CsrfStore
from proxy.errors import MethodNotAllowed, ProxyError
from proxy.exchange import CpiCredentials, TokenExchanger
from proxy.forward import Forwarder
from proxy.keys import KeyFetchError, KeyStore
from proxy.logs import correlation
from proxy.metrics import Metrics
from proxy.reload import RouteState, warn_public_routes
from proxy.routes import RouteTable, map_request
from proxy.settings import Settings
from proxy.state import (
    BINDINGS,
    CORRELATION_ID,
    ENDPOINTS,
    METRICS,
    PIPELINE,
    ROUTE_NAME,
    ROUTES,
    SETTINGS,
    USER,
    Endpoint,
    Pipeline,
)
from proxy.tls import client_context
from proxy.upstream import Pool

log = logging.getLogger(__name__)

CORRELATION_HEADERS = ("x-correlationid", "x-request-id", "x-vcap-request-id")  # approuter's order
_CORRELATION_OK = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


class _Ids:
    """UUID-shaped ids: 80 random bits per process, then a counter. As unique as uuid4 for
    correlation, without a getrandom() call per request; reseeded in forked workers."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        h = uuid.uuid4().hex
        variant = f"{8 | int(h[16], 16) & 3:x}"  # RFC 4122
        self._prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-"
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFF:012x}"


new_correlation_id = _Ids()


def correlation_id(request: web.Request) -> str:
    """The caller's id (approuter's header order) if it is sane, else a new one."""
    if CORRELATION_ID in request:
        return request[CORRELATION_ID]
    value = next((request.headers[h] for h in CORRELATION_HEADERS if h in request.headers), "")
    if not _CORRELATION_OK.fullmatch(value):
        value = new_correlation_id()
    request[CORRELATION_ID] = value
    return value


def json_error(
    status: int,
    error: str,
    description: str,
    cid: str,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, object] | None = None,
) -> web.Response:
    """OAuth-style error body (Authlib's shape) plus the correlation id to quote in a ticket."""
    body = {
        "error": error,
        "error_description": description,
        "correlation_id": cid,
        **(details or {}),
    }
    response = web.json_response(body, status=status, headers=dict(headers or {}))
    response.headers["x-correlationid"] = cid
    return response


_OPS_METHODS = frozenset({"GET", "HEAD"})


async def handle(app: web.Application, request: web.Request) -> web.StreamResponse:
    """Every request: operator endpoints by exact path, everything else through the pipeline.
    Also the correlation id for every log line, request metrics (route names, not paths), and
    the one place where errors become HTTP answers.

    No middleware runs, and `serve` calls this straight from aiohttp's server, past the router
    (see `request_handler`): each layer of either is a coroutine resumed on every step of every
    request. Tests and `dev` reach it through the router's one catch-all route.
    """
    cid = correlation_id(request)
    correlation.set(cid)
    metrics = app[METRICS]
    metrics.in_flight.inc()
    started = time.perf_counter()
    try:
        endpoint = app[ENDPOINTS].get(request.path)
        if endpoint is None:
            response = await proxy_handler(app, request)
        elif request.method in _OPS_METHODS:
            response = await endpoint(app, request)
        else:
            raise MethodNotAllowed(f"{request.path} answers GET", allowed=_OPS_METHODS)
    except ProxyError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.error)
        response = json_error(exc.status, exc.error, exc.description, cid, exc.headers, exc.details)
        if exc.closes:
            await _hang_up(request, response)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, cid)
    except Exception:
        log.exception("unexpected error")
        description = f"unexpected error in cpi-proxy; the log has details under {cid}"
        response = json_error(500, "server_error", description, cid)
    finally:
        metrics.in_flight.dec()
    route = request.get(ROUTE_NAME, "-")
    metrics.observe(route, request.method, response.status, time.perf_counter() - started)
    return response


async def _hang_up(request: web.Request, response: web.StreamResponse) -> None:
    """Send `response` now and close the connection. Left to aiohttp, a request whose body was
    not read to its end keeps the connection up to 10 s more, reading that body ("lingering"):
    pointless once the client has stalled (measured: the close came 11-12 s after the 408)."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:  # the client is gone already
        return
    request.protocol.force_close()  # what is written still goes out before the socket closes


async def _routed(request: web.Request) -> web.StreamResponse:
    return await handle(request.app, request)


def request_handler(
    app: web.Application,
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """What `serve` gives aiohttp's server to call for each request instead of the router: the
    app has one route, so resolving it (and the app's per-request bookkeeping) is pure cost."""

    async def serve_request(request: web.BaseRequest) -> web.StreamResponse:
        assert isinstance(request, web.Request)  # made by the app's request factory
        expect = request.headers.get("Expect")
        if expect is not None and request.version == aiohttp.HttpVersion11:
            # The router's job, done here: tell a waiting client to send its body.
            if expect.lower() != "100-continue":
                why = f"only 'Expect: 100-continue' is understood, not {expect[:40]!r}"
                return json_error(417, "expectation_failed", why, correlation_id(request))
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return await handle(app, request)

    return serve_request


async def proxy_handler(app: web.Application, request: web.Request) -> web.StreamResponse:
    pipeline = app[PIPELINE]
    # The table in force now serves this request to its end, whatever a reload does meanwhile.
    route, target, query = map_request(app[ROUTES].table, request.raw_path, request.method)
    request[ROUTE_NAME] = route.name
    credentials = CpiCredentials(pipeline.exchanger)
    if route.authentication == "xsuaa":
        token = bearer_token(request.headers.getall("Authorization", []))
        claims = await pipeline.validator.validate(token)
        request[USER] = claims.anonymous_id
        authorize(claims, route.scopes)
        if route.grant == "jwt-bearer":
            credentials = CpiCredentials(pipeline.exchanger, claims, token)
    return await pipeline.forwarder.forward(
        request,
        route,
        target,
        query,
        credentials=credentials,
        correlation_id=correlation_id(request),
    )


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    settings, bindings, metrics = app[SETTINGS], app[BINDINGS], app[METRICS]
    tls = client_context()
    connector = aiohttp.TCPConnector(ssl=tls, limit=settings.max_connections)
    session = aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout),
    )
    keys = KeyStore(
        session,
        bindings.xsuaa.jwks_url,
        fallback_pem=bindings.xsuaa.verificationkey,
        ttl=settings.keys_ttl,
        min_refresh=settings.keys_min_refresh,
        timeout=settings.exchange_timeout,
        metrics=metrics,
    )
    exchanger = TokenExchanger(
        session,
        bindings.cpi,
        cache_size=settings.cache_size,
        timeout=settings.exchange_timeout,
        margin=settings.token_margin,
        metrics=metrics,
    )
    pool = Pool(
        bindings.cpi.url,
        ssl_context=tls,
        connect_timeout=settings.connect_timeout,
        limit=settings.max_connections,
    )
    csrf = CsrfStore(
        session,
        cache_size=settings.cache_size,
        timeout=aiohttp.ClientTimeout(total=settings.exchange_timeout),
    )
    app[PIPELINE] = Pipeline(
        keys=keys,
        validator=TokenValidator(
            bindings.xsuaa, keys, leeway=settings.leeway, cache_size=settings.cache_size
        ),
        exchanger=exchanger,
        forwarder=Forwarder(
            pool,
            bindings.cpi.url,
            replay_limit=settings.replay_limit,
            replay_budget=settings.replay_budget,
            body_pause=settings.body_timeout,
            csrf=csrf,
            role_scope=bindings.cpi.scope_of,
            metrics=metrics,
        ),
        csrf=csrf,
        pool=pool,
    )
    warm_up = asyncio.ensure_future(keys.refresh())  # first request need not wait for keys
    warm_up.add_done_callback(_log_warm_up)
    try:
        yield
    finally:
        await keys.close()  # ends the warm-up's fetch too: cancelling the warm-up would stop
        with contextlib.suppress(asyncio.CancelledError, KeyFetchError):  # at its shield
            await warm_up
        await exchanger.close()
        await csrf.close()
        await pool.close()
        await session.close()


async def _live_reload(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP and a cheap poll of the route file both reload the table."""
    state, interval = app[ROUTES], app[SETTINGS].reload_interval
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, state.reload)
    watcher = asyncio.ensure_future(state.watch(interval)) if interval > 0 else None
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _log_warm_up(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("XSUAA keys not loaded at start; will retry on the first request")


def create_app(
    settings: Settings,
    bindings: Bindings,
    routes: RouteTable,
    *,
    routes_file: Path | None = None,
    live_reload: bool = False,
) -> web.Application:
    """The proxy; `live_reload` (serve) reloads `routes_file` on SIGHUP and when it changes."""
    # Real XSUAA tokens with many role collections exceed aiohttp's 8 KiB header default; allow
    # 32 KiB so tokens up to MAX_TOKEN_BYTES reach the validator and get a JSON answer.
    app = web.Application(
        handler_args={"max_field_size": 32 * 1024, "max_line_size": 32 * 1024},
    )
    app[SETTINGS] = settings
    app[BINDINGS] = bindings
    app[METRICS] = Metrics()
    app[ROUTES] = RouteState(routes, bindings.xsuaa.xsappname, routes_file)
    warn_public_routes(app[ROUTES].table)
    app.cleanup_ctx.append(_pipeline)
    if live_reload:
        app.cleanup_ctx.append(_live_reload)
    endpoints: dict[str, Endpoint] = {"/healthz": ops.healthz, "/readyz": ops.readyz}
    if settings.metrics_port:
        app.cleanup_ctx.append(ops.metrics_site)
    else:
        endpoints["/metrics"] = ops.metrics
    if settings.debug:
        endpoints["/_debug/tokens"] = debug.tokens_page
    app[ENDPOINTS] = endpoints
    app.router.add_route("*", "/{tail:.*}", _routed)
    return app

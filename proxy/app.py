"""The aiohttp application: wiring of the pipeline and the single error-to-HTTP mapping.

    route -> authenticate -> authorize -> exchange -> forward

One cleanup context owns the ClientSession (pooled, no cookie jar, no auto-decompression) and
everything built on it; handlers raise `ProxyError`s and `error_middleware` renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.auth import TokenValidator, authorize, bearer_token
from proxy.bindings import Bindings
from proxy.csrf import CsrfStore
from proxy.errors import BadRequest, ProxyError
from proxy.exchange import CpiCredentials, TokenExchanger
from proxy.forward import Forwarder
from proxy.keys import KeyFetchError, KeyStore
from proxy.paths import normalise, split_target
from proxy.reload import RouteState, warn_public_routes
from proxy.routes import TARGET_PREFIX, RouteTable
from proxy.settings import Settings
from proxy.tls import client_context

log = logging.getLogger(__name__)

CORRELATION_HEADERS = ("x-correlationid", "x-request-id", "x-vcap-request-id")  # approuter's order
_CORRELATION_OK = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


@dataclass(frozen=True)
class Pipeline:
    keys: KeyStore
    validator: TokenValidator
    exchanger: TokenExchanger
    forwarder: Forwarder
    csrf: CsrfStore


SETTINGS = web.AppKey("settings", Settings)
BINDINGS = web.AppKey("bindings", Bindings)
ROUTES = web.AppKey("routes", RouteState)
PIPELINE = web.AppKey("pipeline", Pipeline)
CORRELATION_ID = web.RequestKey("correlation_id", str)


def correlation_id(request: web.Request) -> str:
    """The caller's id (approuter's header order) if it is sane, else a new UUID."""
    if CORRELATION_ID in request:
        return request[CORRELATION_ID]
    value = next((request.headers[h] for h in CORRELATION_HEADERS if h in request.headers), "")
    if not _CORRELATION_OK.fullmatch(value):
        value = str(uuid.uuid4())
    request[CORRELATION_ID] = value
    return value


def json_error(
    status: int, error: str, description: str, cid: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """OAuth-style error body (Authlib's shape) plus the correlation id to quote in a ticket."""
    body = {"error": error, "error_description": description, "correlation_id": cid}
    response = web.json_response(body, status=status, headers=dict(headers or {}))
    response.headers["x-correlationid"] = cid
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    cid = correlation_id(request)
    try:
        return await handler(request)
    except ProxyError as exc:
        log.info("%s %s -> %d %s [%s]", request.method, request.path, exc.status, exc.error, cid)
        return json_error(exc.status, exc.error, exc.description, cid, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return json_error(exc.status, code, exc.reason, cid)
    except Exception:
        log.exception("unexpected error [%s]", cid)
        description = f"unexpected error in cpi-proxy; the log has details under {cid}"
        return json_error(500, "server_error", description, cid)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    pipeline = app[PIPELINE]
    raw_path, query = split_target(request.raw_path)
    path = normalise(raw_path)
    route, target = app[ROUTES].table.match(path, request.method)  # this table, to the end
    target = normalise(target)
    if not target.startswith(TARGET_PREFIX):
        raise BadRequest(f"the mapped path leaves {TARGET_PREFIX}; nothing was sent to CPI")
    credentials = CpiCredentials(pipeline.exchanger)
    if route.authentication == "xsuaa":
        token = bearer_token(request.headers.getall("Authorization", []))
        claims = await pipeline.validator.validate(token)
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


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP"})


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    settings, bindings = app[SETTINGS], app[BINDINGS]
    connector = aiohttp.TCPConnector(ssl=client_context(), limit=settings.max_connections)
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
    )
    exchanger = TokenExchanger(
        session,
        bindings.cpi,
        cache_size=settings.cache_size,
        timeout=settings.exchange_timeout,
        margin=settings.token_margin,
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
            session,
            bindings.cpi.url,
            connect_timeout=settings.connect_timeout,
            replay_limit=settings.replay_limit,
            csrf=csrf,
        ),
        csrf=csrf,
    )
    warm_up = asyncio.ensure_future(keys.refresh())  # first request need not wait for keys
    warm_up.add_done_callback(_log_warm_up)
    try:
        yield
    finally:
        warm_up.cancel()
        with contextlib.suppress(asyncio.CancelledError, KeyFetchError):
            await warm_up
        await exchanger.close()
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
        middlewares=[error_middleware],
        handler_args={"max_field_size": 32 * 1024, "max_line_size": 32 * 1024},
    )
    app[SETTINGS] = settings
    app[BINDINGS] = bindings
    app[ROUTES] = RouteState(routes, bindings.xsuaa.xsappname, routes_file)
    warn_public_routes(app[ROUTES].table)
    app.cleanup_ctx.append(_pipeline)
    if live_reload:
        app.cleanup_ctx.append(_live_reload)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path without query (queries may carry secrets), status."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.1fms [%s]',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time * 1000,
            response.headers.get("x-correlationid", "-"),
        )

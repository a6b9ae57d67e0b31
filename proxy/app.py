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
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.auth import TokenValidator, authorize, bearer_token
from proxy.bindings import Bindings
from proxy.errors import BadRequest, ProxyError
from proxy.exchange import TokenExchanger
from proxy.forward import Forwarder
from proxy.keys import KeyFetchError, KeyStore
from proxy.paths import normalise, split_target
from proxy.routes import TARGET_PREFIX, RouteTable
from proxy.settings import Settings

log = logging.getLogger(__name__)

CORRELATION_HEADERS = ("x-correlationid", "x-request-id", "x-vcap-request-id")  # approuter's order
_CORRELATION_OK = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


@dataclass(frozen=True)
class Pipeline:
    keys: KeyStore
    validator: TokenValidator
    exchanger: TokenExchanger
    forwarder: Forwarder


SETTINGS = web.AppKey("settings", Settings)
BINDINGS = web.AppKey("bindings", Bindings)
ROUTES = web.AppKey("routes", RouteTable)
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
    route, target = app[ROUTES].match(path, request.method)
    target = normalise(target)
    if not target.startswith(TARGET_PREFIX):
        raise BadRequest(f"the mapped path leaves {TARGET_PREFIX}; nothing was sent to CPI")
    token = bearer_token(request.headers.getall("Authorization", []))
    claims = await pipeline.validator.validate(token)
    authorize(claims, route.scopes)
    if route.grant == "client-credentials":
        cpi_token = await pipeline.exchanger.for_client()
    else:
        cpi_token = await pipeline.exchanger.for_user(claims, token)
    return await pipeline.forwarder.forward(
        request,
        route,
        target,
        query,
        token=cpi_token.access_token,
        correlation_id=correlation_id(request),
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP"})


def client_ssl_context() -> ssl.SSLContext:
    """The system trust store; OpenSSL honours SSL_CERT_FILE/SSL_CERT_DIR for private CAs."""
    return ssl.create_default_context()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    settings, bindings = app[SETTINGS], app[BINDINGS]
    connector = aiohttp.TCPConnector(ssl=client_ssl_context(), limit=settings.max_connections)
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
    app[PIPELINE] = Pipeline(
        keys=keys,
        validator=TokenValidator(
            bindings.xsuaa, keys, leeway=settings.leeway, cache_size=settings.cache_size
        ),
        exchanger=TokenExchanger(
            session,
            bindings.cpi,
            cache_size=settings.cache_size,
            timeout=settings.exchange_timeout,
            margin=settings.token_margin,
        ),
        forwarder=Forwarder(session, bindings.cpi.url, connect_timeout=settings.connect_timeout),
    )
    warm_up = asyncio.ensure_future(keys.refresh())  # first request need not wait for keys
    warm_up.add_done_callback(_log_warm_up)
    try:
        yield
    finally:
        warm_up.cancel()
        with contextlib.suppress(asyncio.CancelledError, KeyFetchError):
            await warm_up
        await session.close()


def _log_warm_up(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("XSUAA keys not loaded at start; will retry on the first request")


def create_app(settings: Settings, bindings: Bindings, routes: RouteTable) -> web.Application:
    # Real XSUAA tokens with many role collections exceed aiohttp's 8 KiB header default; allow
    # 32 KiB so tokens up to MAX_TOKEN_BYTES reach the validator and get a JSON answer.
    app = web.Application(
        middlewares=[error_middleware],
        handler_args={"max_field_size": 32 * 1024, "max_line_size": 32 * 1024},
    )
    app[SETTINGS] = settings
    app[BINDINGS] = bindings
    app[ROUTES] = routes.resolve(bindings.xsuaa.xsappname)  # idempotent
    app.cleanup_ctx.append(_pipeline)
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

"""Forward a request to the CPI runtime and stream the answer back.

Bodies stream both ways, so a 1 GiB upload or download costs a few buffers of memory; only a
body up to the replay limit (by Content-Length) is held, so that it can be sent a second time
when CPI refuses a stale CPI token (401) or CSRF token (403 `X-CSRF-Token: Required`).
Content-Encoding passes through untouched: the session does not decompress, and it adds no
Accept-Encoding, User-Agent or Content-Type of its own. Cookies never cross the proxy in either
direction: the session's jar is a DummyCookieJar, so one user's CPI session can never be replayed
for another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.csrf import MODIFYING, CsrfState, CsrfStore
from proxy.csrf import required as csrf_required
from proxy.errors import (
    CpiForbidden,
    CpiUnauthorized,
    CsrfRequired,
    MissingCpiRole,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.exchange import CpiCredentials, CpiToken
from proxy.metrics import Metrics
from proxy.routes import Route

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Besides hop-by-hop: replaced by us (authorization, host, x-forwarded-*), never forwarded
# (cookie), or handled by our own server (expect: 100-continue is answered before the handler).
_REQUEST_DROP = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "expect",
    "host",
    "x-correlationid",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
_RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "x-correlationid"}
SMALL_BODY = 64 * 1024  # answers up to this size (by Content-Length) are sent in one write


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def upstream_headers(
    request: web.BaseRequest, *, correlation_id: str, csrf_managed: bool = False
) -> CIMultiDict[str]:
    """The client's headers as CPI should see them, less Authorization (set per attempt)."""
    incoming = request.headers
    drop = _REQUEST_DROP | _connection_tokens(incoming)
    if csrf_managed:
        drop = drop | {"x-csrf-token"}  # the proxy holds the user's CSRF session, not the client
    out = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)
    if not request.body_exists:
        out.popall("Content-Length", None)
    forwarded_for = ", ".join([*incoming.getall("X-Forwarded-For", []), request.remote or ""])
    out["X-Forwarded-For"] = forwarded_for.strip(", ")
    out["X-Forwarded-Proto"] = incoming.get("X-Forwarded-Proto", request.scheme)
    out["X-Forwarded-Host"] = incoming.get("X-Forwarded-Host", request.host)
    out["x-correlationid"] = correlation_id
    return out


def downstream_headers(upstream: CIMultiDictProxy[str], correlation_id: str) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP | _connection_tokens(upstream)
    out = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)
    out["x-correlationid"] = correlation_id
    return out


@dataclass(frozen=True)
class Body:
    """The request body: buffered when small enough to send twice, else streamed once."""

    data: bytes | aiohttp.StreamReader | None
    replayable: bool


async def read_body(request: web.Request, limit: int) -> Body:
    if not request.body_exists:
        return Body(None, replayable=True)
    length = request.content_length
    if length is not None and length <= limit:
        return Body(await request.content.read(), replayable=True)
    return Body(request.content, replayable=False)  # chunked, or too large to hold


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        connect_timeout: float,
        replay_limit: int,
        csrf: CsrfStore,
        role_scope: Callable[[str], str] = lambda role: role,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._role_scope = role_scope
        self._metrics = metrics or Metrics()
        self._connect_timeout = connect_timeout
        self._replay_limit = replay_limit
        self._csrf = csrf
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _timeout(self, route: Route) -> aiohttp.ClientTimeout:
        # No total limit: a long stream may run as long as data keeps moving.
        timeout = self._timeouts.get(route.timeout)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=route.timeout
            )
            self._timeouts[route.timeout] = timeout
        return timeout

    async def forward(
        self,
        request: web.Request,
        route: Route,
        path: str,
        query: str,
        *,
        credentials: CpiCredentials,
        correlation_id: str,
    ) -> web.StreamResponse:
        """Send, and at most once each: renew a refused CPI token, refetch a CSRF token."""
        endpoint = URL(f"{self._base}{path}", encoded=True)
        url = URL(f"{self._base}{path}?{query}", encoded=True) if query else endpoint
        csrf_on = request.method in MODIFYING and route.csrf is not False
        headers = upstream_headers(request, correlation_id=correlation_id, csrf_managed=csrf_on)
        body = await read_body(request, self._replay_limit)
        token = self._with_role(route, await credentials.get())
        csrf = self._csrf.cached(token) if csrf_on else None
        if csrf_on and csrf is None and route.csrf is True:
            csrf = await self._csrf.fresh(token, endpoint, correlation_id)
        renewed = refetched = False
        while True:
            upstream = await self._send(request, route, url, headers, body, token, csrf)
            if upstream.status == 401 and not renewed and credentials.renewable(token):
                renewed = True
                await _discard(upstream)
                token = self._with_role(route, await credentials.renew(token))
                csrf = self._csrf.cached(token) if csrf_on else None
                if body.replayable:
                    continue
                raise CpiUnauthorized(
                    "CPI refused the cached CPI token; a new one is in place, but this request's"
                    " body (chunked or over the replay limit) cannot be sent twice: retry it"
                )
            if csrf_on and not refetched and csrf_required(upstream):
                refetched = True
                await _discard(upstream)
                csrf = await self._csrf.fresh(token, endpoint, correlation_id, stale=csrf)
                if body.replayable:
                    continue
                raise CsrfRequired(
                    "the iFlow is CSRF protected and this request's body (chunked or over the"
                    " replay limit) cannot be sent twice; a CSRF token is now cached: retry, or"
                    ' set "csrf": true on the route so the token is fetched first'
                )
            if upstream.status in (401, 403):
                raise await _refusal(upstream, route, renewed=renewed)
            return await self._respond(request, upstream, correlation_id)

    def _with_role(self, route: Route, token: CpiToken) -> CpiToken:
        """Answer a missing iFlow role here, with its fix, instead of CPI's bare 403."""
        if route.cpi_role is not None and self._role_scope(route.cpi_role) not in token.scopes:
            raise MissingCpiRole(
                f"user lacks CPI role {route.cpi_role}; add it to a role collection assigned to"
                " the user (CPI applies role changes within an hour)"
            )
        return token

    async def _send(
        self,
        request: web.Request,
        route: Route,
        url: URL,
        headers: CIMultiDict[str],
        body: Body,
        token: CpiToken,
        csrf: CsrfState | None,
    ) -> aiohttp.ClientResponse:
        attempt = headers.copy()
        attempt["Authorization"] = f"Bearer {token.access_token}"
        if csrf is not None:
            attempt["X-CSRF-Token"] = csrf.token
            if csrf.cookie:
                attempt["Cookie"] = csrf.cookie
        data: bytes | AsyncIterator[bytes] | None
        if isinstance(body.data, aiohttp.StreamReader):
            data = self._counted(body.data)
        else:
            data = body.data
            self._metrics.bytes_out.inc(len(data or b""))
        started = time.perf_counter()
        try:
            return await self._session.request(
                request.method,
                url,
                headers=attempt,
                data=data,
                timeout=self._timeout(route),
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamTimeout(
                f"CPI did not answer within the route's timeout of {route.timeout:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(
                f"cannot reach the CPI runtime at {url.host} ({exc.__class__.__name__})"
            ) from None
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.upstream_seconds.labels(route.name).observe(elapsed)

    async def _counted(self, stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        sent = 0
        try:
            async for chunk in stream.iter_any():
                sent += len(chunk)
                yield chunk
        finally:
            self._metrics.bytes_out.inc(sent)

    async def _respond(
        self, request: web.Request, upstream: aiohttp.ClientResponse, correlation_id: str
    ) -> web.StreamResponse:
        headers = downstream_headers(upstream.headers, correlation_id)
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            # Most iFlow answers are small: one read, then headers and body in one write.
            async with upstream:
                try:
                    body = await upstream.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise UpstreamUnreachable(
                        f"CPI broke off its answer ({exc.__class__.__name__})"
                    ) from None
            self._metrics.bytes_in.inc(len(body))
            headers.popall("Content-Length", None)
            return web.Response(
                body=body, status=upstream.status, reason=upstream.reason, headers=headers
            )
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            try:
                await response.prepare(request)
            except ConnectionError:  # the client left while CPI was answering
                log.info("client went away before the response started")
                return response
            self._metrics.bytes_in.inc(await _relay(request, upstream, response))
        return response


async def _discard(upstream: aiohttp.ClientResponse) -> None:
    """Drop a refusal (small by nature) so its connection can serve the retry."""
    async with upstream:
        await upstream.read()


async def _refusal(upstream: aiohttp.ClientResponse, route: Route, *, renewed: bool) -> ProxyError:
    """CPI's final 401/403 as a JSON hint naming the cause; CPI's status and body are kept."""
    async with upstream:
        cpi_body = await _head(upstream, 4096)
    details = {"cpi_status": upstream.status, "cpi_body": cpi_body}
    if upstream.status == 401:
        why = "a token XSUAA had just issued" if not renewed else "a freshly renewed token"
        return CpiUnauthorized(
            f"CPI refused {why}: check that the it-rt instance belongs to this CPI tenant and"
            " the iFlow's authentication settings",
            details={"cause": "authentication", **details},
        )
    if csrf_required(upstream):
        return CpiForbidden(
            "CPI demands a CSRF token (X-CSRF-Token: Required) and refused the one it issued;"
            ' check the iFlow\'s "CSRF Protected" setting, or the route\'s "csrf"',
            headers={"X-CSRF-Token": "Required"},
            details={"cause": "csrf", **details},
        )
    role = route.cpi_role or "the role set in the iFlow's HTTPS sender adapter"
    return CpiForbidden(
        f"CPI refused the call: the user lacks {role}; add it to a role collection assigned to"
        ' the user (declare it as the route\'s "cpiRole" to have this checked before CPI)',
        details={"cause": "role", **details},
    )


async def _head(upstream: aiohttp.ClientResponse, limit: int) -> str:
    """At most `limit` bytes of a body, as text, for an error report."""
    data = b""
    while len(data) < limit:
        chunk = await upstream.content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace")


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
) -> int:
    """Copy the body; if either side breaks, cut the client's connection rather than end the
    response cleanly, so a truncated body never looks complete. Returns the bytes copied."""
    copied = 0
    try:
        async for chunk in upstream.content.iter_any():
            copied += len(chunk)
            try:
                await response.write(chunk)
            except ConnectionError:  # "Connection lost", "Cannot write to closing transport"
                log.info("client went away during the response")
                return copied
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        log.warning("CPI broke off the response body (%s)", exc.__class__.__name__)
        if request.transport is not None:
            request.transport.close()
    return copied

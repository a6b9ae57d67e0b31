"""Forward a request to the CPI runtime and stream the answer back.

Bodies stream both ways (never read whole), so a 1 GiB upload or download costs a few buffers of
memory. Content-Encoding passes through untouched: the session does not decompress, and it adds no
Accept-Encoding, User-Agent or Content-Type of its own. Cookies never cross the proxy in either
direction: the session's jar is a DummyCookieJar, so one user's CPI session can never be replayed
for another.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import UpstreamTimeout, UpstreamUnreachable
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
CHUNK = 64 * 1024


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def upstream_headers(
    request: web.BaseRequest, *, token: str, correlation_id: str
) -> CIMultiDict[str]:
    incoming = request.headers
    drop = _REQUEST_DROP | _connection_tokens(incoming)
    out = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)
    if not request.body_exists:
        out.popall("Content-Length", None)
    forwarded_for = ", ".join([*incoming.getall("X-Forwarded-For", []), request.remote or ""])
    out["Authorization"] = f"Bearer {token}"
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


class Forwarder:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, connect_timeout: float
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
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
        token: str,
        correlation_id: str,
    ) -> web.StreamResponse:
        url = URL(f"{self._base}{path}{'?' + query if query else ''}", encoded=True)
        headers = upstream_headers(request, token=token, correlation_id=correlation_id)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.content if request.body_exists else None,
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
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=downstream_headers(upstream.headers, correlation_id),
            )
            await response.prepare(request)
            await self._relay(request, upstream, response)
        return response

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> None:
        """Copy the body; if either side breaks, cut the client's connection rather than end
        the response cleanly, so a truncated body never looks complete."""
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except ConnectionResetError:
            log.info("client went away during the response")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("CPI broke off the response body (%s)", exc.__class__.__name__)
            if request.transport is not None:
                request.transport.close()

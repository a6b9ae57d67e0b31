"""Forward a request to the CPI runtime and stream the answer back.

Bodies stream both ways, so a 1 GiB upload or download costs a few buffers of memory; only a
body up to the replay limit (by Content-Length) is held, so that it can be sent a second time
when CPI refuses a stale CPI token (401) or CSRF token (403 `X-CSRF-Token: Required`).
Requests go out through `upstream.Pool`, a lean keep-alive client for this one hop.
Content-Encoding passes through untouched: nothing is decompressed, and no Accept-Encoding,
User-Agent or Content-Type is added. Cookies never cross the proxy in either direction and the
pool keeps none, so one user's CPI session can never be replayed for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from proxy import upstream as up
from proxy.csrf import MODIFYING, CsrfState, CsrfStore
from proxy.csrf import required as csrf_required
from proxy.errors import (
    BodyBroken,
    BodyTimeout,
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
    "content-length",  # set by the pool from the body it sends
    "cookie",
    "expect",
    "host",
    "x-correlationid",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
_RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "x-correlationid"}
_RESPONSE_DROP_WITH_LENGTH = _RESPONSE_DROP | {"content-length"}
SMALL_BODY = 64 * 1024  # answers up to this size (by Content-Length) are sent in one write
NOT_HELD = "chunked, over the replay limit, or arriving while the replay budget was in use"


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def upstream_headers(
    request: web.BaseRequest, *, correlation_id: str, csrf_managed: bool = False
) -> list[tuple[str, str]]:
    """The client's headers as CPI should see them, less Authorization (set per attempt) and
    Content-Length (set by the pool)."""
    incoming = request.headers
    drop = _REQUEST_DROP
    if "Connection" in incoming:
        drop = drop | _connection_tokens(incoming)
    if csrf_managed:
        drop = drop | {"x-csrf-token"}  # the proxy holds the user's CSRF session, not the client
    out = [(k, v) for k, v in incoming.items() if k.lower() not in drop]
    forwarded_for = ", ".join([*incoming.getall("X-Forwarded-For", ()), request.remote or ""])
    out.append(("X-Forwarded-For", forwarded_for.strip(", ")))
    out.append(("X-Forwarded-Proto", incoming.get("X-Forwarded-Proto", request.scheme)))
    out.append(("X-Forwarded-Host", incoming.get("X-Forwarded-Host", request.host)))
    out.append(("x-correlationid", correlation_id))
    return out


def downstream_headers(
    upstream: CIMultiDictProxy[str], correlation_id: str, *, framing: bool = True
) -> list[tuple[str, str]]:
    """CPI's headers as the client should see them; `framing=False` also drops
    Content-Length, for answers whose body aiohttp sends (and measures) itself."""
    drop = _RESPONSE_DROP if framing else _RESPONSE_DROP_WITH_LENGTH
    if "Connection" in upstream:
        drop = drop | _connection_tokens(upstream)
    out = [(k, v) for k, v in upstream.items() if k.lower() not in drop]
    out.append(("x-correlationid", correlation_id))
    return out


@dataclass(frozen=True)
class Body:
    """The request body: buffered when small enough to send twice, else streamed once."""

    data: bytes | aiohttp.StreamReader | None
    replayable: bool
    held: int = 0  # bytes taken from the replay budget


class ReplayBudget:
    """Bytes that all requests together may hold for replay. Each body is bounded by the replay
    limit, but 1,000 clients times 1 MiB is 1 GiB: beyond the budget a body streams instead (it
    cannot then be re-sent, and a refusal that needs it answers with a hint to retry)."""

    __slots__ = ("free",)

    def __init__(self, total: int) -> None:
        self.free = total

    def take(self, size: int) -> bool:
        if size > self.free:
            return False
        self.free -= size
        return True

    def give(self, size: int) -> None:
        self.free += size


async def client_body(stream: aiohttp.StreamReader, pause: float) -> AsyncIterator[bytes]:
    """The request body as the client sends it. A pause of more than `pause` seconds is a
    408 (nginx's client_body_timeout), a body cut short a 400: the client's failures, never
    to be reported as CPI's. Only waits are timed, so a body already buffered costs no timer."""
    try:
        while True:
            chunk = stream.read_nowait()
            if not chunk:
                if stream.at_eof():
                    return
                async with asyncio.timeout(pause):
                    chunk = await stream.readany()
                if not chunk:
                    return
            yield chunk
    except TimeoutError:
        raise BodyTimeout(
            f"the request body paused for more than {pause:g} s (CPI_PROXY_BODY_TIMEOUT);"
            " send it without long pauses"
        ) from None
    except (ConnectionError, HttpProcessingError) as exc:
        raise BodyBroken(
            f"the request body broke off before its end ({exc.__class__.__name__})"
        ) from None


async def read_body(request: web.Request, limit: int, budget: ReplayBudget, pause: float) -> Body:
    if not request.body_exists:
        return Body(None, replayable=True)
    length = request.content_length
    if length is not None and length <= limit and budget.take(length):
        content = request.content
        try:
            if content.is_eof():  # a small body usually came with the head: no wait, no loop
                return Body(content.read_nowait(), replayable=True, held=length)
            parts = [chunk async for chunk in client_body(content, pause)]
            return Body(b"".join(parts), replayable=True, held=length)
        except BaseException:
            budget.give(length)
            raise
    return Body(request.content, replayable=False)  # chunked, too large, or over the budget


class Forwarder:
    def __init__(
        self,
        pool: up.Pool,
        base_url: str,
        *,
        replay_limit: int,
        replay_budget: int,
        body_pause: float,
        csrf: CsrfStore,
        role_scope: Callable[[str], str] = lambda role: role,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._base = base_url.rstrip("/")
        self._role_scope = role_scope
        self._metrics = metrics or Metrics()
        self._replay_limit = replay_limit
        self.budget = ReplayBudget(replay_budget)
        self._body_pause = body_pause
        self._csrf = csrf

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
        target = f"{path}?{query}" if query else path
        csrf_on = request.method in MODIFYING and route.csrf is not False
        headers = upstream_headers(request, correlation_id=correlation_id, csrf_managed=csrf_on)
        body = await read_body(request, self._replay_limit, self.budget, self._body_pause)
        try:
            token = self._with_role(route, await credentials.get())
            csrf = self._csrf.cached(token) if csrf_on else None
            if csrf_on and csrf is None and route.csrf is True:
                csrf = await self._csrf.fresh(token, self._endpoint(path), correlation_id)
            renewed = refetched = False
            while True:
                answer = await self._send(request, route, target, headers, body, token, csrf)
                if answer.status == 401 and not renewed and credentials.renewable(token):
                    renewed = True
                    await _discard(answer)
                    token = self._with_role(route, await credentials.renew(token))
                    csrf = self._csrf.cached(token) if csrf_on else None
                    if body.replayable:
                        continue
                    raise CpiUnauthorized(
                        "CPI refused the cached CPI token; a new one is in place, but this"
                        f" request's body ({NOT_HELD}) cannot be sent twice: retry it"
                    )
                if csrf_on and not refetched and csrf_required(answer):
                    refetched = True
                    await _discard(answer)
                    endpoint = self._endpoint(path)
                    csrf = await self._csrf.fresh(token, endpoint, correlation_id, stale=csrf)
                    if body.replayable:
                        continue
                    raise CsrfRequired(
                        f"the iFlow is CSRF protected and this request's body ({NOT_HELD})"
                        " cannot be sent twice; a CSRF token is now cached: retry, or set"
                        ' "csrf": true on the route so the token is fetched first'
                    )
                if answer.status in (401, 403):
                    raise await _refusal(answer, route, renewed=renewed)
                return await self._respond(request, answer, correlation_id)
        finally:
            self.budget.give(body.held)

    def _endpoint(self, path: str) -> URL:
        return URL(f"{self._base}{path}", encoded=True)

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
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
        token: CpiToken,
        csrf: CsrfState | None,
    ) -> up.Response:
        attempt = [*headers, ("Authorization", f"Bearer {token.access_token}")]
        if csrf is not None:
            attempt.append(("X-CSRF-Token", csrf.token))
            if csrf.cookie:
                attempt.append(("Cookie", csrf.cookie))
        data: bytes | AsyncIterator[bytes] | None
        if isinstance(body.data, aiohttp.StreamReader):
            data = self._counted(body.data)
        else:
            data = body.data
            self._metrics.bytes_out.inc(len(data or b""))
        started = time.perf_counter()
        try:
            return await self._pool.request(
                request.method,
                target,
                attempt,
                data,
                length=request.content_length,
                read_timeout=route.timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout(
                f"CPI did not answer within the route's timeout of {route.timeout:g} s"
            ) from None
        except up.UploadFailed as exc:
            if isinstance(exc.reason, ProxyError):  # the client's side of the upload failed
                raise exc.reason from None
            raise UpstreamUnreachable(f"the upload to CPI failed ({exc})") from None
        except up.UpstreamError as exc:
            raise UpstreamUnreachable(f"cannot reach the CPI runtime ({exc})") from None
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.timings(self._metrics.upstream_timings, route.name).observe(elapsed)

    async def _counted(self, stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        sent = 0
        try:
            async for chunk in client_body(stream, self._body_pause):
                sent += len(chunk)
                yield chunk
        finally:
            self._metrics.bytes_out.inc(sent)

    async def _respond(
        self, request: web.Request, answer: up.Response, correlation_id: str
    ) -> web.StreamResponse:
        length = answer.content_length
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            # Most iFlow answers are small: one read, then headers and body in one write.
            async with answer:
                try:
                    body = await answer.read()
                except (up.UpstreamError, TimeoutError) as exc:
                    raise UpstreamUnreachable(f"CPI broke off its answer ({exc})") from None
            self._metrics.bytes_in.inc(len(body))
            headers = downstream_headers(answer.headers, correlation_id, framing=False)
            return web.Response(
                body=body, status=answer.status, reason=answer.reason, headers=headers
            )
        async with answer:
            response = web.StreamResponse(
                status=answer.status,
                reason=answer.reason,
                headers=downstream_headers(answer.headers, correlation_id),
            )
            try:
                await response.prepare(request)
            except ConnectionError:  # the client left while CPI was answering
                log.info("client went away before the response started")
                return response
            self._metrics.bytes_in.inc(await _relay(request, answer, response))
        return response


async def _discard(answer: up.Response) -> None:
    """Drop a refusal (small by nature) so its connection can serve the retry."""
    # On an error the connection is closed rather than pooled; the retry takes another.
    async with answer:
        with contextlib.suppress(up.UpstreamError, TimeoutError):
            await answer.read()


async def _refusal(upstream: up.Response, route: Route, *, renewed: bool) -> ProxyError:
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


async def _head(answer: up.Response, limit: int) -> str:
    """At most `limit` bytes of a body, as text, for an error report."""
    data = b""
    try:
        async for chunk in answer.iter_any():
            data += chunk
            if len(data) >= limit:
                break
    except (up.UpstreamError, TimeoutError):
        pass  # what arrived is enough for a hint
    return data[:limit].decode("utf-8", "replace")


async def _relay(request: web.Request, answer: up.Response, response: web.StreamResponse) -> int:
    """Copy the body; if either side breaks, cut the client's connection rather than end the
    response cleanly, so a truncated body never looks complete. Returns the bytes copied."""
    copied = 0
    try:
        async for chunk in answer.iter_any():
            copied += len(chunk)
            try:
                await response.write(chunk)
            except ConnectionError:  # "Connection lost", "Cannot write to closing transport"
                log.info("client went away during the response")
                return copied
    except (up.UpstreamError, TimeoutError, ConnectionError) as exc:
        log.warning("CPI broke off the response body (%s)", exc)
        if request.transport is not None:
            request.transport.close()
    return copied

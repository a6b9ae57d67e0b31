"""An emulated SAP Cloud Integration runtime: the ``/http/*`` endpoints of deployed iFlows.

Why: the proxy is only correct if CPI accepts what it forwards. This runtime checks tokens the
way CPI does (signature, audience, grant type, role), records what reached it, and offers
``/http/_emu/*`` endpoints that make streaming, compression and header handling observable.
Like CPI's HTTPS sender adapter it can demand CSRF tokens (``csrf_protected``, ``csrf_paths``)
and, like CPI after a revocation, refuse tokens still within their lifetime (``revoke``).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.dev.xsuaa import EmulatedXsuaa, Parking

__all__ = [
    "GZIP_BODY",
    "GZIP_PLAINTEXT",
    "EmulatedIflowRuntime",
    "RecordedRequest",
    "cpi_token_of",
]

CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)  # byte i of a download is i % 256
GZIP_PLAINTEXT = b"Hello from the emulated iFlow runtime.\n" * 8
GZIP_BODY = gzip.compress(GZIP_PLAINTEXT, mtime=0)
_MODIFYING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class RecordedRequest:
    """What an authorized request looked like when it reached CPI."""

    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    subject: str
    grant_type: str
    csrf: str = ""  # "fetch", "rejected" or "accepted" where CSRF protection applies, else ""


def cpi_token_of(record: RecordedRequest) -> str:
    """The bearer token a recorded request carried (every recorded request had one)."""
    return record.headers.get("Authorization", "").partition(" ")[2]


@dataclass(frozen=True)
class _CsrfSession:
    token: str
    subject: str


@dataclass(frozen=True)
class _Revocation:
    """Tokens of a subject issued up to ``second``: all earlier ones, and ``jtis`` within it."""

    second: int
    jtis: frozenset[str]


_RECORD = web.RequestKey("cpi_record", RecordedRequest)


class EmulatedIflowRuntime:
    """CPI's iFlow endpoint; trusts tokens signed by ``xsuaa`` for its ``cpi`` client."""

    def __init__(self, xsuaa: EmulatedXsuaa, *, params: Mapping[str, Any] | None = None) -> None:
        self.xsuaa = xsuaa
        self.params: Mapping[str, Any] = params if params is not None else xsuaa.cpi_params
        self.requests: list[RecordedRequest] = []
        self.csrf_protected = False
        self.csrf_paths: tuple[str, ...] = ()
        self.csrf_fetches = 0
        self.csrf_rejections = 0
        self._csrf_sessions: dict[str, _CsrfSession] = {}  # JSESSIONID -> session
        self.revoked_hits = 0
        self._revoked_jtis: set[str] = set()
        self._revoked_subjects: dict[str, _Revocation] = {}
        self.reset_gates()

    def reset_gates(self) -> None:
        """Fresh events for the streaming interlocks and hangs (``app()`` calls this too)."""
        self.first_chunk_received = asyncio.Event()
        self.download_continue = asyncio.Event()
        self.hangs = Parking()

    def release_hangs(self) -> None:
        """Let every request held at ``/http/_emu/hang`` answer (503)."""
        self.hangs.release()

    def app(self) -> web.Application:
        self.reset_gates()
        app = web.Application(middlewares=[self._authorize])
        emu = "/http/_emu"
        app.router.add_get(f"{emu}/download", self._download)
        app.router.add_post(f"{emu}/sink", self._sink)
        app.router.add_get(f"{emu}/hang", self._hang)
        app.router.add_get(f"{emu}/truncated", self._truncated)
        app.router.add_route("*", emu + "/status/{code}", self._status)
        app.router.add_get(f"{emu}/gzip", self._gzip)
        app.router.add_get(f"{emu}/headers", self._headers)
        app.router.add_post(f"{emu}/upload-gate", self._upload_gate)
        app.router.add_get(f"{emu}/download-gate", self._download_gate)
        app.router.add_route("*", "/http/{tail:.*}", self._echo)
        app.on_response_prepare.append(self._tag_response)
        # on_shutdown, not on_cleanup: the runner waits for open handlers before cleanup runs.
        app.on_shutdown.append(self._release_all)
        return app

    async def _release_all(self, _app: web.Application) -> None:
        self.hangs.release(for_good=True)
        self.download_continue.set()

    # --- CSRF and revocation, steered by tests ----------------------------------------------

    def expire_csrf_sessions(self) -> None:
        """Forget every session, as after a runtime restart: cached CSRF tokens go stale."""
        self._csrf_sessions.clear()

    def revoke(self, token: str) -> None:
        """Refuse ``token`` (by its jti) from now on, with 401, although it has not expired."""
        claims = jwt.decode(token, options={"verify_signature": False})
        self._revoked_jtis.add(str(claims["jti"]))

    def revoke_subject_tokens(self, subject: str) -> None:
        """Refuse every token of ``subject`` (user_name, else client_id) issued so far.

        iat has 1 s resolution, so a plain "iat <= now" would also refuse tokens minted later
        in this second; those are told apart by the jtis XSUAA has issued in it already.
        """
        second = int(time.time())
        jtis = self.xsuaa.issued_in_second(subject, second)
        earlier = self._revoked_subjects.get(subject)
        if earlier is not None and earlier.second == second:
            jtis |= earlier.jtis
        self._revoked_subjects[subject] = _Revocation(second, jtis)

    def _is_revoked(self, claims: Mapping[str, Any], subject: str) -> bool:
        jti, iat = claims.get("jti"), claims.get("iat")
        if jti in self._revoked_jtis:
            return True
        revocation = self._revoked_subjects.get(subject)
        if revocation is None:
            return False
        if not isinstance(iat, int):
            return True  # no issue time: cannot prove it came after the revocation
        return iat < revocation.second or (iat == revocation.second and jti in revocation.jtis)

    # --- authorization, as CPI does it ------------------------------------------------------

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/http/"):
            return await handler(request)
        record = self._check(request)
        csrf = self._csrf(request, record.subject)
        request[_RECORD] = record = replace(record, csrf=csrf)
        self.requests.append(record)
        if csrf == "fetch":
            return self._csrf_fetch(record.subject)
        if csrf == "rejected":
            self.csrf_rejections += 1
            return web.Response(
                status=403,
                text="CSRF token validation failed",
                headers={"X-CSRF-Token": "Required"},
            )
        return await handler(request)

    def _csrf_applies(self, request: web.Request) -> bool:
        return self.csrf_protected or request.path.startswith(self.csrf_paths)

    def _csrf(self, request: web.Request, subject: str) -> str:
        """What CSRF protection makes of this request: "fetch", "rejected", "accepted" or ""."""
        if not self._csrf_applies(request):
            return ""
        sent = request.headers.get("X-CSRF-Token", "")
        if request.method in ("GET", "HEAD"):
            return "fetch" if sent.lower() == "fetch" else ""
        if request.method not in _MODIFYING:
            return ""
        session = self._csrf_sessions.get(_cookies(request).get("JSESSIONID", ""))
        valid = (
            session is not None
            and hmac.compare_digest(session.token.encode(), sent.encode())
            and session.subject == subject
        )
        return "accepted" if valid else "rejected"

    def _csrf_fetch(self, subject: str) -> web.Response:
        """A new session and its CSRF token, bound to the subject; the endpoint does not run."""
        self.csrf_fetches += 1
        session_id, token = secrets.token_hex(16).upper(), secrets.token_urlsafe(24)
        self._csrf_sessions[session_id] = _CsrfSession(token, subject)
        response = web.Response(headers={"X-CSRF-Token": token})
        response.headers.add("Set-Cookie", f"JSESSIONID={session_id}; Path=/; Secure; HttpOnly")
        vcap_id = secrets.token_hex(16)
        response.headers.add("Set-Cookie", f"__VCAP_ID__={vcap_id}; Path=/; Secure; HttpOnly")
        return response

    def _check(self, request: web.Request) -> RecordedRequest:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("Unauthorized")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.xsuaa.public_keys().get(kid) if isinstance(kid, str) else None
            if key is None:
                raise _unauthorized("Unauthorized: unknown signing key")
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=["RS256"], options={"verify_aud": False, "require": ["exp"]}
            )
        except jwt.InvalidTokenError:
            raise _unauthorized("Unauthorized: invalid token") from None
        subject = str(claims.get("user_name") or claims.get("client_id"))
        if self._is_revoked(claims, subject):
            self.revoked_hits += 1
            raise _unauthorized("Unauthorized: token revoked")
        cpi = self.xsuaa.cpi
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if cpi.client_id not in audiences and claims.get("cid") != cpi.client_id:
            raise _unauthorized("Unauthorized: token not issued for this tenant")
        grant = claims.get("grant_type")
        if not isinstance(grant, str) or grant not in self.params.get("grant-types", ()):
            raise web.HTTPForbidden(text=f"Forbidden: grant type {grant} not allowed")
        roles = list(self.params.get("roles", ()))
        scope = claims.get("scope")
        scopes = set(scope) if isinstance(scope, list) else set()
        if not any(f"{cpi.xsappname}.{role}" in scopes for role in roles):
            raise web.HTTPForbidden(text=f"Forbidden: user lacks role {' or '.join(roles)}")
        return RecordedRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            subject=subject,
            grant_type=grant,
        )

    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        record = request.get(_RECORD)
        if record is None:
            return
        response.headers["x-cpi-subject"] = record.subject
        response.headers["x-cpi-grant"] = record.grant_type
        response.headers["x-cpi-path"] = record.raw_path
        if "x-correlationid" in request.headers:
            response.headers["x-correlationid"] = request.headers["x-correlationid"]

    # --- handlers ---------------------------------------------------------------------------

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        """Stream the body back chunk by chunk, so memory stays flat for any size."""
        response = web.StreamResponse()
        response.headers["Content-Type"] = request.headers.get(
            "Content-Type", "application/octet-stream"
        )
        if request.content_length is not None:
            response.content_length = request.content_length
        await response.prepare(request)
        async for chunk in request.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = request.query.get("bytes", "")
        if not size.isdigit():
            raise web.HTTPBadRequest(text="bytes must be a non-negative integer")
        remaining = int(size)
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = remaining
        await response.prepare(request)
        while remaining:
            chunk = _PATTERN if remaining >= CHUNK else _PATTERN[:remaining]
            await response.write(chunk)
            remaining -= len(chunk)
        await response.write_eof()
        return response

    async def _sink(self, request: web.Request) -> web.StreamResponse:
        digest, count = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            count += len(chunk)
        return web.json_response({"bytes": count, "sha256": digest.hexdigest()})

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        """Promise 2 x 64 KiB (by Content-Length, or chunked with ?chunked), send half, drop."""
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        if "chunked" not in request.query:
            response.content_length = 2 * CHUNK
        await response.prepare(request)
        await response.write(_PATTERN)  # write() drains: the half is on the wire
        if request.transport is not None:
            request.transport.abort()
        return response

    async def _hang(self, _request: web.Request) -> web.StreamResponse:
        await self.hangs.hold()
        return web.json_response({"released": True}, status=503)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        code = request.match_info["code"]
        if not code.isdigit() or not 200 <= int(code) <= 599:
            raise web.HTTPBadRequest(text="status must be 200..599")
        if int(code) in (204, 304):  # these must not carry a body
            return web.Response(status=int(code))
        return web.json_response({"status": int(code)}, status=int(code))

    async def _gzip(self, _request: web.Request) -> web.StreamResponse:
        headers = {"Content-Encoding": "gzip"}
        return web.Response(body=GZIP_BODY, content_type="text/plain", headers=headers)

    async def _headers(self, request: web.Request) -> web.StreamResponse:
        seen: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            seen.setdefault(name.lower(), []).append(value)
        return web.json_response(seen)

    async def _upload_gate(self, request: web.Request) -> web.StreamResponse:
        """Signal the first chunk so a test can prove the proxy streams instead of buffering."""
        count = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            count += len(chunk)
            self.first_chunk_received.set()
        return web.json_response({"bytes": count})

    async def _download_gate(self, request: web.Request) -> web.StreamResponse:
        """Hold the second chunk until the test saw the first arrive through the proxy."""
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        await response.write(b"first\n")
        await self.download_continue.wait()
        await response.write(b"second\n")
        await response.write_eof()
        return response


def _cookies(request: web.Request) -> dict[str, str]:
    """The request's cookies, from every Cookie header; the first of a repeated name wins."""
    cookies: dict[str, str] = {}
    for header in request.headers.getall("Cookie", ()):
        for pair in header.split(";"):
            name, _, value = pair.strip().partition("=")
            cookies.setdefault(name, value.strip('"'))
    return cookies


def _unauthorized(text: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(text=text, headers={"WWW-Authenticate": "Bearer"})

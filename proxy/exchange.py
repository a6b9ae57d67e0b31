"""Exchange a user token for a CPI token (RFC 7523 jwt-bearer) or get a technical-user token.

CPI tokens are cached in a bounded `TLRUCache`: each entry lives until its own expiry minus a
safety margin (and never past the user token's expiry). Keys are hashes of the user token plus
the CPI client id, so two users can never share an entry. Concurrent requests for the same key
share one in-flight exchange (async-lru's recipe: cache the task, shield the waiters, evict on
failure): failures are not cached, and one cancelled client does not cancel the others.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cachetools import TLRUCache

from proxy.auth import Claims
from proxy.bindings import JWT_BEARER, CpiBinding
from proxy.errors import (
    ExchangeTimeout,
    ExchangeUnavailable,
    InvalidToken,
    TokenExchangeFailed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpiToken:
    access_token: str = field(repr=False)
    scopes: frozenset[str]
    expires_at: float  # on the exchanger's clock
    cache_until: float  # on the exchanger's clock


def _short(text: object, limit: int = 200) -> str:
    """XSUAA's own words, made safe to put in a response: printable and short."""
    clean = "".join(c for c in str(text) if c.isprintable())
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _hint(status: int, error: str, body: str) -> str:
    text = body.lower()
    if "uaa.user" in text or "no scopes" in text:
        return (
            "the user token lacks scope uaa.user, which jwt-bearer needs: add uaa.user to a role"
            " template in the app's xs-security.json and that role to the user's role collection"
        )
    if error == "invalid_client" or (status == 401 and not error):
        return "check the it-rt binding's clientid and clientsecret (re-create the binding)"
    if error == "unauthorized_client":
        return (
            "the CPI client may not use this grant: add it to grant-types in the it-rt instance"
            " parameters (config-cpi.json) and update the service"
        )
    return "check the it-rt binding (tokenurl, client) against the service key in the cockpit"


_ASSERTION_REFUSED = frozenset({"invalid_grant", "invalid_token"})
# Spelled out: the shared session adds no automatic headers (see forward.py).
_TOKEN_REQUEST_HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "identity",
    "Content-Type": "application/x-www-form-urlencoded",
}


class TokenExchanger:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        binding: CpiBinding,
        *,
        cache_size: int,
        timeout: float = 10.0,
        margin: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._binding = binding
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        self._margin = margin
        self._clock = clock
        # Raw id:secret, as @sap/xssec sends it (XSUAA client ids hold "!" and "|").
        basic = base64.b64encode(f"{binding.clientid}:{binding.clientsecret}".encode()).decode()
        self._headers = {**_TOKEN_REQUEST_HEADERS, "Authorization": f"Basic {basic}"}
        self._cache: TLRUCache[bytes, CpiToken] = TLRUCache(
            maxsize=cache_size, ttu=lambda _k, token, _now: token.cache_until, timer=clock
        )
        self._inflight: dict[bytes, asyncio.Future[CpiToken]] = {}
        self.waiting = 0  # callers awaiting an in-flight exchange (observable for tests)
        self._client_id = binding.clientid.encode()
        self._client_key = hashlib.sha256(b"client-credentials\0" + self._client_id).digest()

    @property
    def cached(self) -> int:
        return len(self._cache)

    async def for_user(self, claims: Claims, user_token: str) -> CpiToken:
        """The CPI token carrying this user, from the cache or one shared exchange."""
        key = hashlib.sha256(claims.token_hash + b"\0" + self._client_id).digest()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        form = {
            "grant_type": JWT_BEARER,
            "assertion": user_token,
            "client_id": self._binding.clientid,
            "response_type": "token",
        }
        user_left = claims.expires_at - time.time()
        return await self._get(key, partial(self._request, form, user_left))

    async def for_client(self) -> CpiToken:
        """One technical-user token shared by every request of client-credentials routes."""
        cached = self._cache.get(self._client_key)
        if cached is not None:
            return cached
        form = {"grant_type": "client_credentials", "client_id": self._binding.clientid}
        return await self._get(self._client_key, partial(self._request, form, None))

    async def _get(self, key: bytes, fetch: Callable[[], Awaitable[CpiToken]]) -> CpiToken:
        """Join the in-flight fetch for `key`, or start one (callers checked the cache)."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_store(key, fetch))
            self._inflight[key] = task
            task.add_done_callback(partial(self._forget, key))
        self.waiting += 1
        try:
            return await asyncio.shield(task)
        finally:
            self.waiting -= 1

    def _forget(self, key: bytes, task: asyncio.Future[CpiToken]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have gone away

    async def _fetch_and_store(
        self, key: bytes, fetch: Callable[[], Awaitable[CpiToken]]
    ) -> CpiToken:
        token = await fetch()
        if token.cache_until > self._clock():
            self._cache[key] = token
        return token

    async def _request(self, form: dict[str, str], user_left: float | None) -> CpiToken:
        url = self._binding.tokenurl
        host = urlsplit(url).netloc
        try:
            async with self._session.post(
                url,
                data=form,
                timeout=self._timeout,
                headers=self._headers,
            ) as resp:
                status = resp.status
                body = await resp.text(errors="replace")
        except TimeoutError:
            raise ExchangeTimeout(
                f"XSUAA at {host} did not answer the token request within {self._timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise ExchangeUnavailable(
                f"cannot reach XSUAA at {host} ({exc.__class__.__name__}); retry later"
            ) from None
        grant = form["grant_type"].rsplit(":", 1)[-1]
        if status == 200:
            return self._parse(body, user_left)
        error, description = _error_fields(body)
        said = f"XSUAA answered {status} {error or '(no error code)'}"
        if description:
            said += f" ({description})"
        log.warning("token request (%s) failed: %s", grant, said)
        if status >= 500 or status == 429:
            raise ExchangeUnavailable(f"{said}; retry later")
        if form.get("assertion") and error in _ASSERTION_REFUSED:
            # The user's token, not our setup, is at fault: the caller must get a new one.
            raise InvalidToken(f"XSUAA refused the user token for the exchange: {said}")
        raise TokenExchangeFailed(f"{said}; {_hint(status, error, body)}")

    def _parse(self, body: str, user_left: float | None) -> CpiToken:
        data = _json_object(body)
        access_token = data.get("access_token")
        expires_in = data.get("expires_in")
        if not isinstance(access_token, str) or not access_token:
            raise TokenExchangeFailed("XSUAA answered 200 without an access_token")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise TokenExchangeFailed("XSUAA answered 200 without a numeric expires_in")
        now = self._clock()
        lifetime = float(expires_in) - self._margin
        if user_left is not None:
            lifetime = min(lifetime, user_left)
        scope = data.get("scope")
        return CpiToken(
            access_token=access_token,
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            expires_at=now + float(expires_in),
            cache_until=now + lifetime,
        )


def _json_object(body: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise TokenExchangeFailed("XSUAA's answer is not JSON; is tokenurl right?") from None
    if not isinstance(data, dict):
        raise TokenExchangeFailed("XSUAA's answer is not a JSON object")
    return data


def _error_fields(body: str) -> tuple[str, str]:
    try:
        data = _json_object(body)
    except TokenExchangeFailed:
        return "", ""
    return _short(data.get("error", ""), 60), _short(data.get("error_description", ""))

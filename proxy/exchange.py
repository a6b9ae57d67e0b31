"""Exchange a user token for a CPI token (RFC 7523 jwt-bearer) or get a technical-user token.

CPI tokens are cached in a bounded `TLRUCache`: each entry lives until its own expiry minus a
safety margin (and never past the user token's expiry). Keys are hashes of the user token plus
the CPI client id, so two users can never share an entry. Concurrent requests for the same key
share one in-flight exchange (`SingleFlight`): failures are not cached, and one cancelled
client does not cancel the others. When CPI refuses a cached token, `renew_*` replaces it with
one exchange however many requests saw the refusal. The technical-user (client-credentials)
token is refreshed in the background before it expires, so no request waits for it.

Minting a token is safe to repeat, so a token request that failed in a way that may pass (XSUAA
unreachable, or the connection lost before an answer; XSUAA's 502/503/504 without a
Retry-After) is sent once more after a random 50-250 ms, within what is left of the exchange
timeout. A refusal (4xx, incl. 429), an answer with Retry-After (passed on to the caller),
garbage, a TLS verdict, or a timeout is final. The retry runs inside the shared
flight, so concurrent callers cause one retry, never one each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cachetools import TLRUCache

from proxy.auth import Claims, shared_scopes
from proxy.bindings import JWT_BEARER, CpiBinding
from proxy.errors import (
    ExchangeTimeout,
    ExchangeUnavailable,
    InvalidToken,
    ProxyError,
    TokenExchangeFailed,
)
from proxy.lru import ExpiringLRU
from proxy.metrics import Metrics
from proxy.singleflight import SingleFlight, replace_stale
from proxy.tls import mtls_context

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CpiToken:
    access_token: str = field(repr=False)
    scopes: frozenset[str]
    expires_at: float  # on the exchanger's clock
    cache_until: float  # on the exchanger's clock
    fetched_at: float  # on the exchanger's clock


def _short(text: object, limit: int = 200) -> str:
    """XSUAA's own words, made safe to put in a response: printable and short."""
    clean = "".join(c for c in str(text) if c.isprintable())
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _hint(status: int, error: str, body: str, credential: str) -> str:
    text = body.lower()
    if "uaa.user" in text or "no scopes" in text:
        return (
            "the user token lacks scope uaa.user, which jwt-bearer needs: add uaa.user to a role"
            " template in the app's xs-security.json and that role to the user's role collection"
        )
    if error == "invalid_client" or (status == 401 and not error):
        return f"check the it-rt binding's clientid and {credential} (re-create the binding)"
    if error == "unauthorized_client":
        return (
            "the CPI client may not use this grant: add it to grant-types in the it-rt instance"
            " parameters (config-cpi.json) and update the service"
        )
    return "check the it-rt binding (tokenurl, client) against the service key in the cockpit"


_ASSERTION_REFUSED = frozenset({"invalid_grant", "invalid_token"})
REFUSAL_MEMORY = 60.0  # the validator's leeway: how long an expired token may still arrive
# Spelled out: the shared session adds no automatic headers (see forward.py).
_TOKEN_REQUEST_HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "identity",
    "Content-Type": "application/x-www-form-urlencoded",
}

_RETRIED_STATUSES = frozenset({502, 503, 504})  # a gateway or XSUAA itself briefly unwell
RETRY_PAUSE = (0.05, 0.25)  # seconds, uniformly random: retries of many flights do not align
RETRY_MIN_TIME = 0.5  # seconds the retry must still have after its pause, else it is skipped


def retry_pause(rng: random.Random, remaining: float) -> float | None:
    """The random pause before the one retry, or None when the exchange timeout has too little
    left (`remaining` seconds) for a retry that could still answer in time."""
    pause = rng.uniform(*RETRY_PAUSE)
    return pause if remaining - pause >= RETRY_MIN_TIME else None


class _Transient(Exception):
    """A token request failed in a way the same request may not fail again."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.description)
        self.error = error


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
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._binding = binding
        self._metrics = metrics or Metrics()
        self._timeout_s = timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._margin = margin
        self.now = clock
        self._cache: ExpiringLRU[bytes, CpiToken] = ExpiringLRU(
            cache_size,
            deadline=lambda token: token.cache_until,
            clock=clock,
            on_evict=self._metrics.cache_evictions.inc,
        )
        self._metrics.track_cache_size(lambda: len(self._cache))
        self._flights: SingleFlight[bytes, CpiToken] = SingleFlight()
        self._refused: TLRUCache[bytes, float] = TLRUCache(
            maxsize=cache_size, ttu=lambda _k, until, _now: until, timer=time.time
        )
        self._headers = dict(_TOKEN_REQUEST_HEADERS)
        self._ssl: ssl.SSLContext | bool = True
        self._credential = "certificate and key" if binding.x509 else "clientsecret"
        if binding.certificate is not None and binding.key is not None:
            self._ssl = mtls_context(binding.certificate, binding.key)  # no secret is sent
        else:
            # Raw id:secret, as @sap/xssec sends it (XSUAA client ids hold "!" and "|").
            pair = f"{binding.clientid}:{binding.clientsecret}".encode()
            self._headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        self._client_id = binding.clientid.encode()
        self._client_key = hashlib.sha256(b"client-credentials\0" + self._client_id).digest()
        self._refresh: asyncio.TimerHandle | None = None
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def waiting(self) -> int:
        return self._flights.waiting

    @staticmethod
    def _user_key(claims: Claims) -> bytes:
        # The user token's hash: the cache belongs to this one CPI client, and the
        # client-credentials key below is a hash of another kind of input.
        return claims.token_hash

    async def for_user(self, claims: Claims, user_token: str) -> CpiToken:
        """The CPI token carrying this user, from the cache or one shared exchange."""
        key = self._user_key(claims)
        cached = self._cache.get(key)
        if cached is not None:
            self._metrics.cache_hit.inc()
            return cached
        if key in self._refused:
            raise InvalidToken("XSUAA already refused this token for the exchange; get a new one")
        self._metrics.cache_miss.inc()
        return await self._flights.run(key, partial(self._exchange, key, claims, user_token))

    async def for_client(self) -> CpiToken:
        """One technical-user token shared by every request of client-credentials routes."""
        cached = self._cache.get(self._client_key)
        if cached is not None:
            self._metrics.cache_hit.inc()
            return cached
        self._metrics.cache_miss.inc()
        return await self._flights.run(self._client_key, self._client_credentials)

    async def renew_user(self, claims: Claims, user_token: str, stale: CpiToken) -> CpiToken:
        """A token other than `stale` (which CPI refused): many callers, one exchange."""
        key = self._user_key(claims)
        return await self._renew(key, stale, partial(self._exchange, key, claims, user_token))

    async def renew_client(self, stale: CpiToken) -> CpiToken:
        return await self._renew(self._client_key, stale, self._client_credentials)

    async def _renew(
        self, key: bytes, stale: CpiToken, fetch: Callable[[], Awaitable[CpiToken]]
    ) -> CpiToken:
        return await replace_stale(self._cache, self._flights, key, stale, fetch)

    async def _exchange(self, key: bytes, claims: Claims, user_token: str) -> CpiToken:
        form = {
            "grant_type": JWT_BEARER,
            "assertion": user_token,
            "client_id": self._binding.clientid,
            "response_type": "token",
        }
        try:
            token = await self._request(form, claims.expires_at - time.time())
        except InvalidToken:
            # XSUAA's verdict on this very token will not change: e.g. expired by its clock
            # inside our leeway. Remember it until the token is gone for us too.
            self._refused[key] = claims.expires_at + REFUSAL_MEMORY
            raise
        self._store(key, token)
        return token

    async def _client_credentials(self) -> CpiToken:
        form = {"grant_type": "client_credentials", "client_id": self._binding.clientid}
        token = await self._request(form, None)
        self._store(self._client_key, token)
        if token.cache_until > self.now():  # a token too short-lived to cache is not refreshed
            self._schedule_refresh(token)
        return token

    def _store(self, key: bytes, token: CpiToken) -> None:
        if token.cache_until > self.now():
            self._cache[key] = token

    # --- technical-user token: refreshed ahead of expiry, so no request waits for it ---------

    def _schedule_refresh(self, token: CpiToken, fraction: float = 0.75) -> None:
        """Refresh when `fraction` of the cached life has passed (retries use a later point)."""
        if self._refresh is not None:
            self._refresh.cancel()
        delay = max(0.0, (token.cache_until - self.now()) * fraction)
        loop = asyncio.get_running_loop()
        self._refresh = loop.call_later(delay, self._start_refresh, token)

    def _start_refresh(self, token: CpiToken) -> None:
        self._refresh = None
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_client(token))

    async def _refresh_client(self, current: CpiToken) -> None:
        try:
            await self._flights.run(self._client_key, self._client_credentials)
        except ProxyError as exc:
            # The current token still serves; try again halfway to its end.
            log.warning("background refresh of the technical-user token failed: %s", exc.error)
            if current.cache_until > self.now():
                self._schedule_refresh(current, fraction=0.5)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        await self._flights.close()

    async def _request(self, form: dict[str, str], user_left: float | None) -> CpiToken:
        grant = "jwt-bearer" if form["grant_type"] == JWT_BEARER else "client-credentials"
        started = time.perf_counter()
        outcome = "success"
        try:
            return await self._attempts(form, user_left, grant)
        except ProxyError as exc:
            outcome = exc.error
            raise
        finally:
            self._metrics.exchanges.labels(grant, outcome).inc()
            self._metrics.exchange_seconds.labels(grant).observe(time.perf_counter() - started)

    async def _attempts(
        self, form: dict[str, str], user_left: float | None, grant: str
    ) -> CpiToken:
        """One token request, and one retry if the first failed transiently; both within the
        exchange timeout, so the caller's clear 5xx still comes in time."""
        deadline = time.monotonic() + self._timeout_s
        try:
            return await self._post(form, user_left, self._timeout_s)
        except _Transient as failed:
            first = failed.error
        pause = retry_pause(self._rng, deadline - time.monotonic())
        if pause is None:
            raise first
        log.info("token request (%s) failed, retrying once in %.0f ms", grant, pause * 1000)
        self._metrics.exchange_retries.labels(grant).inc()
        await asyncio.sleep(pause)
        try:
            return await self._post(form, user_left, deadline - time.monotonic())
        except _Transient as failed:
            raise failed.error from None

    async def _post(self, form: dict[str, str], user_left: float | None, budget: float) -> CpiToken:
        url = self._binding.tokenurl
        host = urlsplit(url).netloc
        timeout = aiohttp.ClientTimeout(total=budget)
        try:
            async with self._session.post(
                url, data=form, timeout=timeout, headers=self._headers, ssl=self._ssl
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After", "")
                body = await resp.text(errors="replace")
        except TimeoutError:
            raise ExchangeTimeout(
                f"XSUAA at {host} did not answer the token request within {self._timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            log.debug("token request failed: %r", exc)
            failure: ProxyError
            if self._binding.x509 and _tls_refused(exc):
                failure = TokenExchangeFailed(
                    f"XSUAA's certificate endpoint {host} refused the TLS handshake"
                    f" ({exc.__class__.__name__}): check the it-rt binding's certificate and key"
                    " (expired, or not issued for this binding)"
                )
            else:
                failure = ExchangeUnavailable(
                    f"cannot reach XSUAA at {host} ({exc.__class__.__name__}); retry later"
                )
            # A TLS verdict repeats itself; a refused, reset or dropped connection may not
            # (with x509, a refused certificate also shows as a reset: it fails twice).
            if isinstance(exc, aiohttp.ClientSSLError):
                raise failure from None
            raise _Transient(failure) from None
        grant = form["grant_type"].rsplit(":", 1)[-1]
        if status == 200:
            return self._parse(body, user_left)
        error, description = _error_fields(body)
        said = f"XSUAA answered {status} {error or '(no error code)'}"
        if description:
            said += f" ({description})"
        log.warning("token request (%s) failed: %s", grant, said)
        if status >= 500 or status == 429:
            # XSUAA's own pacing reaches the caller; a number only, never a reflected string.
            pacing = {"Retry-After": retry_after} if retry_after.isdigit() else None
            unavailable = ExchangeUnavailable(f"{said}; retry later", headers=pacing)
            if status in _RETRIED_STATUSES and not retry_after:  # else XSUAA set the pace
                raise _Transient(unavailable)
            raise unavailable
        if form.get("assertion") and error in _ASSERTION_REFUSED:
            # The user's token, not our setup, is at fault: the caller must get a new one.
            raise InvalidToken(f"XSUAA refused the user token for the exchange: {said}")
        raise TokenExchangeFailed(f"{said}; {_hint(status, error, body, self._credential)}")

    def _parse(self, body: str, user_left: float | None) -> CpiToken:
        data = _json_object(body)
        access_token = data.get("access_token")
        expires_in = data.get("expires_in")
        if not isinstance(access_token, str) or not access_token:
            raise TokenExchangeFailed("XSUAA answered 200 without an access_token")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise TokenExchangeFailed("XSUAA answered 200 without a numeric expires_in")
        now = self.now()
        lifetime = float(expires_in) - self._margin
        if user_left is not None:
            lifetime = min(lifetime, user_left)
        return CpiToken(
            access_token=access_token,
            scopes=_scopes(data, access_token),
            expires_at=now + float(expires_in),
            cache_until=now + lifetime,
            fetched_at=now,
        )


@dataclass
class CpiCredentials:
    """The CPI token source of one request: its route's grant, and the caller if any."""

    exchanger: TokenExchanger
    claims: Claims | None = None  # None: client-credentials
    user_token: str = field(default="", repr=False)
    begun: float = 0.0

    def __post_init__(self) -> None:
        self.begun = self.exchanger.now()

    async def get(self) -> CpiToken:
        if self.claims is None:
            return await self.exchanger.for_client()
        return await self.exchanger.for_user(self.claims, self.user_token)

    def renewable(self, token: CpiToken) -> bool:
        """Only a token that came from the cache can be stale; a fresh refusal is final."""
        return token.fetched_at < self.begun

    async def renew(self, stale: CpiToken) -> CpiToken:
        if self.claims is None:
            return await self.exchanger.renew_client(stale)
        return await self.exchanger.renew_user(self.claims, self.user_token, stale)


def _scopes(data: dict[str, Any], access_token: str) -> frozenset[str]:
    """The granted scopes: the token response's `scope`, else the token's own claim."""
    scope = data.get("scope")
    if not isinstance(scope, str):
        try:
            scope = jwt.decode(access_token, options={"verify_signature": False}).get("scope")
        except jwt.PyJWTError:
            scope = None
    if isinstance(scope, list):
        return shared_scopes(s for s in scope if isinstance(s, str))
    return shared_scopes(scope.split() if isinstance(scope, str) else ())


def _tls_refused(exc: aiohttp.ClientError) -> bool:
    """The certificate endpoint refused our client certificate, as opposed to being down.

    With TLS 1.3 the server judges the client certificate after the client's side of the
    handshake is done, so a refusal shows as a reset of a connection that did get established.
    """
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(
        exc, aiohttp.ClientConnectorError
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

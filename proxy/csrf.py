"""CSRF tokens for iFlows whose HTTPS sender adapter is "CSRF Protected".

CPI answers a modifying request without a valid token with `403` and `X-CSRF-Token: Required`.
A token is fetched with a GET carrying `X-CSRF-Token: Fetch`, and it is bound to the session
cookies returned with it. Each token and its cookies are kept per CPI token (so per user) in a
bounded cache keyed by the CPI token's hash; they never meet another user's requests or the
client's own cookies. Concurrent fetches for one user share one request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import aiohttp
from cachetools import TLRUCache
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import CsrfFetchFailed
from proxy.exchange import CpiToken
from proxy.singleflight import SingleFlight, replace_stale

log = logging.getLogger(__name__)

MODIFYING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SESSION_TTL = 20 * 60.0  # CPI's HTTP sessions idle out; a stale token is refetched anyway


@dataclass(frozen=True)
class CsrfState:
    token: str = field(repr=False)
    cookie: str = field(repr=False)  # the session cookies, as one Cookie header value
    until: float


class Answer(Protocol):
    status: int
    headers: CIMultiDictProxy[str]


def required(response: Answer) -> bool:
    """CPI's way of saying "fetch a CSRF token first"."""
    return response.status == 403 and response.headers.get("X-CSRF-Token", "").lower() == "required"


class CsrfStore:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        cache_size: int,
        timeout: aiohttp.ClientTimeout,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._clock = clock
        self._cache: TLRUCache[bytes, CsrfState] = TLRUCache(
            maxsize=cache_size, ttu=lambda _k, state, _now: state.until, timer=clock
        )
        self._flights: SingleFlight[bytes, CsrfState] = SingleFlight()

    async def close(self) -> None:
        await self._flights.close()

    @staticmethod
    def _key(cpi: CpiToken) -> bytes:
        return hashlib.sha256(cpi.access_token.encode()).digest()

    def cached(self, cpi: CpiToken) -> CsrfState | None:
        return self._cache.get(self._key(cpi))

    async def fresh(
        self, cpi: CpiToken, url: URL, correlation_id: str, stale: CsrfState | None = None
    ) -> CsrfState:
        """A state other than `stale`: a newer cached one, else one shared fetch."""
        key = self._key(cpi)
        fetch = partial(self._fetch, key, cpi, url, correlation_id)
        return await replace_stale(self._cache, self._flights, key, stale, fetch)

    async def _fetch(self, key: bytes, cpi: CpiToken, url: URL, correlation_id: str) -> CsrfState:
        headers = {
            "Authorization": f"Bearer {cpi.access_token}",
            "X-CSRF-Token": "Fetch",
            "x-correlationid": correlation_id,
            "Accept-Encoding": "identity",
        }
        try:
            async with self._session.get(url, headers=headers, timeout=self._timeout) as resp:
                await resp.read()
                token = resp.headers.get("X-CSRF-Token", "")
                cookie = "; ".join(f"{m.key}={m.value}" for m in resp.cookies.values())
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CsrfFetchFailed(
                f"fetching a CSRF token from CPI failed ({exc.__class__.__name__})"
            ) from None
        if not 200 <= status < 300 or not token or token.lower() == "required":
            log.warning("CSRF fetch answered %d without a token", status)
            raise CsrfFetchFailed(
                f"CPI answered the CSRF token fetch (GET with X-CSRF-Token: Fetch) with {status}"
                " and no token; check that the iFlow endpoint accepts GET"
            )
        now = self._clock()
        state = CsrfState(token=token, cookie=cookie, until=min(cpi.cache_until, now + SESSION_TTL))
        if state.until > now:
            self._cache[key] = state
        return state

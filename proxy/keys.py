"""XSUAA verification keys: fetched only from the bound uaadomain, cached, refreshed carefully.

- Keys live `ttl` seconds; a stale set is refreshed in the background on next use while the
  stale keys keep serving, so a slow or failing XSUAA never delays or breaks known keys.
- An unknown kid triggers a refresh, but at most one per `min_refresh` seconds, so a flood of
  random kids cannot turn the proxy into a load generator against XSUAA.
- Concurrent callers share one in-flight fetch; a failed fetch is never cached.
- The binding's `verificationkey` is the fallback when no fetched key can be had.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.errors import InvalidToken, KeysUnavailable
from proxy.metrics import Metrics

log = logging.getLogger(__name__)

RSA_ALGORITHMS = ("RS256", "RS384", "RS512")


class KeyFetchError(Exception):
    """The key endpoint could not give us a usable key set."""


def parse_jwks(document: Any) -> dict[str, Any]:
    """kid -> public key, for the RSA signing keys of a JWKS document."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyFetchError("the answer is not a JWKS document")
    keys: dict[str, Any] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("alg", "RS256") not in RSA_ALGORITHMS:
            continue
        try:
            keys[kid] = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError):
            continue
    if not keys:
        raise KeyFetchError("the JWKS holds no usable RSA signing key")
    return keys


def load_pem_key(pem: str) -> rsa.RSAPublicKey | None:
    """The binding's verificationkey as a key; None if it is not an RSA public key.

    Bindings sometimes carry the PEM on one line, so the body is re-wrapped before parsing.
    """
    body = re.sub(r"-----[A-Z ]+-----|\s", "", pem)
    wrapped = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    text = f"-----BEGIN PUBLIC KEY-----\n{wrapped}\n-----END PUBLIC KEY-----\n"
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        key = None
    if not isinstance(key, rsa.RSAPublicKey):
        log.warning("the XSUAA binding's verificationkey is not a usable RSA public key; ignored")
        return None
    return key


class KeyStore:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        fallback_pem: str | None = None,
        ttl: float = 900.0,
        min_refresh: float = 30.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._url = url
        self._metrics = metrics or Metrics()
        self.last_error: str | None = None  # for /readyz
        self._fallback = load_pem_key(fallback_pem) if fallback_pem else None
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    async def get(self, kid: str) -> Any:
        """The key for `kid`; InvalidToken if XSUAA does not know it, KeysUnavailable if unsure."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._ttl
        may_refresh = self._attempted_at is None or now - self._attempted_at >= self._min_refresh
        known = self._keys.get(kid)
        if known is not None:
            if stale and may_refresh and self._inflight is None:
                self._start()  # stale-while-revalidate: a slow XSUAA never delays known keys
            return known
        failure: KeyFetchError | None = None
        if may_refresh or self._inflight is not None:
            try:
                await self.refresh()
            except KeyFetchError as exc:
                failure = exc
        key = self._keys.get(kid)
        if key is not None:
            return key
        if failure is not None or not self._keys:  # XSUAA could not be asked just now
            if self._fallback is not None:
                return self._fallback
            if not self._keys:
                reason = f" ({failure})" if failure else ""
                raise KeysUnavailable(
                    f"cannot fetch verification keys from XSUAA{reason}; retry later"
                )
        shown = kid if len(kid) <= 64 else kid[:64] + "..."
        raise InvalidToken(f"unknown key id {shown!r}: the token was not signed by the bound XSUAA")

    async def refresh(self) -> None:
        """Fetch the key set, sharing one request among all concurrent callers."""
        await asyncio.shield(self._inflight or self._start())

    async def close(self) -> None:
        """Cancel a fetch in flight: `refresh` shields it from its callers' cancellation."""
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start(self) -> asyncio.Task[None]:
        self._attempted_at = self._clock()
        self._inflight = asyncio.ensure_future(self._fetch())
        self._inflight.add_done_callback(self._clear_inflight)
        return self._inflight

    def _clear_inflight(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported as lost

    async def _fetch(self) -> None:
        try:
            await self._fetch_once()
        except KeyFetchError as exc:
            self._metrics.key_fetches.labels("failure").inc()
            self.last_error = str(exc)
            raise
        self._metrics.key_fetches.labels("success").inc()
        self.last_error = None

    async def _fetch_once(self) -> None:
        try:
            async with self._session.get(
                self._url,
                timeout=self._timeout,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as resp:
                if resp.status != 200:
                    raise KeyFetchError(f"{self._url} answered {resp.status}")
                document = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("fetching XSUAA keys failed: %s", exc.__class__.__name__)
            raise KeyFetchError(f"{exc.__class__.__name__} from {self._url}") from None
        self._keys = parse_jwks(document)
        self._fetched_at = self._clock()
        log.info("loaded %d XSUAA verification key(s)", len(self._keys))

"""Authenticate (validate the user's XSUAA JWT) and authorize (the route's scope).

Validation follows @sap/xssec 4: RS256/384/512 only (fixed here, never read from the token),
keys only from the bound XSUAA, exp/nbf with leeway, the binding's zone, and xssec's audience
rule. A token that passed is remembered by its hash until it expires, so the signature is
checked once per token, not once per request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt

from proxy.bindings import XsuaaBinding
from proxy.errors import InsufficientScope, InvalidToken, Unauthorized
from proxy.keys import RSA_ALGORITHMS, KeyStore
from proxy.lru import ExpiringLRU

MAX_TOKEN_BYTES = 16 * 1024  # real XSUAA tokens are 1-4 KiB; bigger ones are refused unread


@dataclass(frozen=True, slots=True)
class Claims:
    """What the pipeline needs from a validated user token: kept per user in the claims cache,
    so only the few fields in use (not the whole payload), in slots, to keep each entry small."""

    token_hash: bytes
    subject: str  # user_name, or client_id for a client-credentials token
    scopes: frozenset[str]
    zone_id: str
    client_id: str
    expires_at: float  # epoch seconds
    origin: str = ""  # the user's identity provider (sap.default, ldap, ...)
    # Stable per user, meaningless outside: for request logs (SAP logs no user names).
    anonymous_id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"{self.zone_id}\0{self.subject}".encode()).hexdigest()
        object.__setattr__(self, "anonymous_id", digest[:16])

    def __repr__(self) -> str:  # short: the raw claims stay out of logs
        return f"Claims(subject={self.subject!r}, client_id={self.client_id!r})"


def bearer_token(header_values: list[str]) -> str:
    """The token from exactly one `Authorization: Bearer` header, else Unauthorized/InvalidToken."""
    if not header_values:
        raise Unauthorized("send the user's XSUAA token as 'Authorization: Bearer <jwt>'")
    if len(header_values) > 1:
        raise InvalidToken("more than one Authorization header")
    scheme, _, token = header_values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <jwt>'")
    return token.strip()


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def audience_matches(claims: Mapping[str, Any], clientid: str, xsappname: str) -> bool:
    """xssec 4: candidates are `aud` (or scope prefixes if it is empty) plus `cid`."""
    aud = claims.get("aud")
    if aud is not None and not isinstance(aud, str | list):
        return False  # a mistyped aud matches nothing
    candidates: list[str] = [aud] if isinstance(aud, str) else list(aud or [])
    if not candidates:
        candidates = [s.split(".", 1)[0] for s in _scopes(claims) if "." in s]
    cid = claims.get("cid")
    if isinstance(cid, str):
        candidates.append(cid)
    for candidate in candidates:
        if not isinstance(candidate, str):
            continue
        for name in (clientid, xsappname):
            if candidate == name or candidate.startswith(name + "."):
                return True
    return False


_SCOPE_SETS: dict[frozenset[str], frozenset[str]] = {}


def shared_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """One frozenset per distinct set of scopes: 100,000 users hold a handful of role
    collections, so cached tokens share a few sets instead of keeping 100,000 copies."""
    fresh = frozenset(sys.intern(s) for s in scopes)
    known = _SCOPE_SETS.get(fresh)
    if known is not None:
        return known
    if len(_SCOPE_SETS) < 4096:  # bounded; beyond it, sets are simply not shared
        _SCOPE_SETS[fresh] = fresh
    return fresh


def _scopes(claims: Mapping[str, Any]) -> Iterable[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    if isinstance(scope, list):
        return [s for s in scope if isinstance(s, str)]
    return []


def _jku_allowed(jku: object, uaadomain: str) -> bool:
    if not isinstance(jku, str):
        return False
    try:
        parts = urlsplit(jku)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    host = (parts.netloc or "").lower()
    domain = uaadomain.lower()
    return parts.scheme == "https" and (host == domain or host.endswith("." + domain))


def _unverified_header(token: str) -> dict[str, Any]:
    """Parsed by hand so each header defect gets its own answer (PyJWT folds several)."""
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError
        padded = parts[0] + "=" * (-len(parts[0]) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise InvalidToken("the token is not a well-formed JWT") from None
    if not isinstance(header, dict):
        raise InvalidToken("the token is not a well-formed JWT")
    return header


class TokenValidator:
    def __init__(
        self, binding: XsuaaBinding, keys: KeyStore, *, leeway: float = 60.0, cache_size: int
    ) -> None:
        self._binding = binding
        self._keys = keys
        self._leeway = leeway
        self._cache: ExpiringLRU[bytes, Claims] = ExpiringLRU(
            cache_size, deadline=self._valid_until, clock=time.time
        )

    def _valid_until(self, claims: Claims) -> float:
        return claims.expires_at + self._leeway

    async def validate(self, token: str) -> Claims:
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken(f"the token is larger than {MAX_TOKEN_BYTES} bytes")
        if not token.isascii():
            raise InvalidToken("the token is not a well-formed JWT (non-ASCII bytes)")
        digest = token_hash(token)
        cached = self._cache.get(digest)
        if cached is not None:
            return cached
        claims = await self._validate(token, digest)
        self._cache[digest] = claims
        return claims

    async def _validate(self, token: str, digest: bytes) -> Claims:
        header = _unverified_header(token)
        alg = header.get("alg")
        if alg not in RSA_ALGORITHMS:
            raise InvalidToken(f"algorithm {alg!r} is not accepted; XSUAA signs with RS256")
        if "crit" in header:
            raise InvalidToken("the token has critical header extensions this proxy does not know")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise InvalidToken("the token header has no usable kid")
        if "jku" in header and not _jku_allowed(header["jku"], self._binding.uaadomain):
            raise InvalidToken("the token's jku is not on the bound XSUAA's domain")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, RecursionError):
            raise InvalidToken("the token is not a well-formed JWT") from None
        zid = unverified.get("zid")
        if zid != self._binding.zone_id:
            raise InvalidToken("the token was issued for another identity zone (zid)")
        key = await self._keys.get(kid)
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(RSA_ALGORITHMS),
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": False, "verify_iss": False},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired; get a fresh one from XSUAA") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the token is invalid: {exc}") from None
        except (ValueError, RecursionError, OverflowError):
            raise InvalidToken("the token is not a well-formed JWT") from None
        binding = self._binding
        if not audience_matches(payload, binding.clientid, binding.xsappname):
            raise InvalidToken(
                f"the token's audience does not include this app ({binding.xsappname}); "
                "it was issued for another XSUAA client"
            )
        subject = payload.get("user_name") or payload.get("client_id") or payload.get("sub")
        try:
            expires_at = float(payload["exp"])
        except (OverflowError, ValueError, TypeError):
            raise InvalidToken("the token's exp is not a usable time") from None
        return Claims(
            token_hash=digest,
            subject=str(subject or ""),
            scopes=shared_scopes(_scopes(payload)),
            zone_id=sys.intern(str(zid)),
            client_id=sys.intern(str(payload.get("client_id") or payload.get("cid") or "")),
            expires_at=expires_at,
            origin=sys.intern(str(payload.get("origin") or "")),
        )


def authorize(claims: Claims, scopes: tuple[str, ...]) -> None:
    """The route's scopes are alternatives: holding any one of them suffices."""
    if scopes and claims.scopes.isdisjoint(scopes):
        needed = " or ".join(scopes)
        raise InsufficientScope(
            f"this route needs scope {needed}; assign the user a role collection that holds it",
            scopes=scopes,
        )

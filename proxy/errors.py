"""One small exception tree; `app.handle` is the only place that turns it into HTTP.

    ConfigError                      start-up: a setting is missing or invalid (one line, exit 2)
    ProxyError                       a request failed; knows its status and OAuth-style error code
     +-- BadRequest           400    path escapes /http/ or is malformed
     |    +-- BodyBroken      400    the request body broke off before its end (closes)
     +-- BodyTimeout          408    the client paused its body longer than allowed (closes)
     +-- NotFound             404    no route matches
     +-- MethodNotAllowed     405    route matches, method does not (carries Allow)
     +-- Unauthorized         401    no bearer token
     +-- InvalidToken         401    the token is bad (signature, exp, audience, zone, ...)
     +-- InsufficientScope    403    valid token without the route's scope
     +-- CsrfRequired         403    CPI wants a CSRF token and the body cannot be replayed
     +-- CpiUnauthorized      401    CPI refused the CPI token (after any renewal); CPI's body kept
     +-- CpiForbidden         403    CPI refused the call (role or CSRF); CPI's body kept
     +-- MissingCpiRole       403    the CPI token lacks the route's cpiRole: CPI is not called
     +-- TokenExchangeFailed  502    XSUAA refused the exchange (4xx) or answered garbage
     +-- KeysUnavailable      503    XSUAA's keys cannot be fetched and none are cached
     +-- ExchangeUnavailable  503    XSUAA answered 5xx or is unreachable
     +-- ExchangeTimeout      504    XSUAA did not answer in time
     +-- UpstreamUnreachable  502    CPI cannot be reached
     +-- CsrfFetchFailed      502    CPI gave no CSRF token when asked for one
     +-- UpstreamTimeout      504    CPI did not answer within the route's timeout

PyJWT's split is kept: "the token is bad" is a 401, "the infrastructure failed" is a 5xx.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it and says what to do."""


class ProxyError(Exception):
    status: ClassVar[int] = 500
    error: ClassVar[str] = "server_error"
    # The client's connection cannot carry another request (its body is in an unknown state).
    closes: ClassVar[bool] = False

    def __init__(
        self,
        description: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.headers: Mapping[str, str] = MappingProxyType(dict(headers or {}))
        self.details: Mapping[str, object] = MappingProxyType(dict(details or {}))


class BadRequest(ProxyError):
    status = 400
    error = "invalid_request"


class BodyBroken(BadRequest):
    closes = True


class BodyTimeout(ProxyError):
    status = 408
    error = "request_timeout"
    closes = True


class NotFound(ProxyError):
    status = 404
    error = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    error = "method_not_allowed"

    def __init__(self, description: str, *, allowed: frozenset[str]) -> None:
        super().__init__(description, headers={"Allow": ", ".join(sorted(allowed))})


class Unauthorized(ProxyError):
    status = 401
    error = "invalid_request"

    def __init__(self, description: str) -> None:
        super().__init__(description, headers={"WWW-Authenticate": 'Bearer realm="cpi-proxy"'})


class InvalidToken(ProxyError):
    status = 401
    error = "invalid_token"

    def __init__(self, description: str) -> None:
        super().__init__(
            description,
            headers={"WWW-Authenticate": 'Bearer realm="cpi-proxy", error="invalid_token"'},
        )


class InsufficientScope(ProxyError):
    status = 403
    error = "insufficient_scope"

    def __init__(self, description: str, *, scopes: tuple[str, ...]) -> None:
        challenge = (
            f'Bearer realm="cpi-proxy", error="insufficient_scope", scope="{" ".join(scopes)}"'
        )
        super().__init__(description, headers={"WWW-Authenticate": challenge})


class CsrfRequired(ProxyError):
    status = 403
    error = "csrf_required"


class CpiUnauthorized(ProxyError):
    status = 401
    error = "cpi_unauthorized"

    def __init__(self, description: str, *, details: Mapping[str, object] | None = None) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="cpi"'}
        super().__init__(description, headers=headers, details=details)


class CpiForbidden(ProxyError):
    status = 403
    error = "cpi_forbidden"


class MissingCpiRole(ProxyError):
    status = 403
    error = "missing_cpi_role"


class CsrfFetchFailed(ProxyError):
    status = 502
    error = "csrf_fetch_failed"


class TokenExchangeFailed(ProxyError):
    status = 502
    error = "token_exchange_failed"


class KeysUnavailable(ProxyError):
    status = 503
    error = "temporarily_unavailable"


class ExchangeUnavailable(ProxyError):
    status = 503
    error = "token_exchange_unavailable"


class ExchangeTimeout(ProxyError):
    status = 504
    error = "token_exchange_timeout"


class UpstreamUnreachable(ProxyError):
    status = 502
    error = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    error = "upstream_timeout"

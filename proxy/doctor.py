"""`cpi-proxy doctor`: live checks of bindings, XSUAA, CPI and routes, printed as a checklist.

Why: a wrong secret, a grant missing from config-cpi.json, an iFlow deployed under another
address and a user without a role collection all look alike from the app (a 4xx or 5xx). The
doctor asks XSUAA and CPI what the proxy would ask, with the proxy's own stages (`KeyStore`,
`TokenValidator`, `TokenExchanger`), and says for each check what is wrong and what to do.
It prints names, counts, scopes and the proxy's error descriptions; never a token, secret,
key or cookie.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal, TextIO
from urllib.parse import urlsplit

import aiohttp

from proxy.auth import Claims, TokenValidator, authorize
from proxy.cli import Config
from proxy.errors import (
    ExchangeTimeout,
    ExchangeUnavailable,
    InsufficientScope,
    InvalidToken,
    KeysUnavailable,
    ProxyError,
)
from proxy.exchange import CpiToken, TokenExchanger
from proxy.keys import KeyFetchError, KeyStore, parse_jwks
from proxy.routes import TARGET_PREFIX, Route
from proxy.tls import client_context

Status = Literal["ok", "warn", "fail", "skip", "info"]
TIMEOUT = 10.0  # seconds per HTTP request
SKEW_OK = 5.0  # seconds; up to the proxy's leeway is a warning, beyond it a failure
FROM_STDIN = "-"
Clock = Callable[[], float]
_NETWORK = (aiohttp.ClientError, TimeoutError)
TLS_FIX = (
    "the server's certificate is not trusted: for a private landscape, add its CA to SSL_CERT_FILE"
)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def render(self) -> str:
        mark = "[FAIL]" if self.status == "fail" else f"[{self.status}]"
        line = f"{mark:<6} {self.name}: {self.detail}"
        return f"{line}\n       fix: {self.fix}" if self.fix else line


async def run_doctor(
    config: Config, *, token: str | None = None, out: TextIO, clock: Clock = time.time
) -> int:
    """Run every check, printing each as it completes; 1 if any failed, else 0.

    `clock` is the local wall clock (tests shift it to provoke clock skew).
    """
    async with _session(config) as session:
        doctor = _Doctor(config, session, out, clock)
        try:
            await doctor.run(token)
        finally:
            await doctor.exchanger.close()
    n = Counter(check.status for check in doctor.checks)
    summary = f"{n['fail']} failed, {n['warn']} warning(s), {n['ok']} ok, {n['skip']} skipped"
    print(summary, file=out)
    return 1 if n["fail"] else 0


def main(config: Config, token_arg: str | None, *, stdin: TextIO | None = None) -> int:
    """The CLI entry; `--token -` reads the token from stdin (out of `ps` and shell history)."""
    token = (stdin or sys.stdin).read() if token_arg == FROM_STDIN else token_arg
    if token is not None:
        token = token.strip().removeprefix("Bearer ").strip()
        if not token:
            print("cpi-proxy: --token: no token given (nothing on stdin?)", file=sys.stderr)
            return 2
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("proxy").setLevel(logging.CRITICAL)  # the checklist says it all
    return asyncio.run(run_doctor(config, token=token, out=sys.stdout))


def _session(config: Config) -> aiohttp.ClientSession:
    """Built like the proxy's: system trust (+ SSL_CERT_FILE), no cookie jar, no decompression."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_context()),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT, sock_connect=config.settings.connect_timeout),
    )


class _Doctor:
    def __init__(
        self, config: Config, session: aiohttp.ClientSession, out: TextIO, clock: Clock
    ) -> None:
        self.settings, self.routes = config.settings, config.routes.routes
        self.xsuaa, self.cpi = config.bindings.xsuaa, config.bindings.cpi
        self.session, self.out, self.clock = session, out, clock
        self.checks: list[Check] = []
        s = self.settings
        self.exchanger = TokenExchanger(
            session, self.cpi, cache_size=16, timeout=s.exchange_timeout, margin=s.token_margin
        )

    def report(self, name: str, status: Status, detail: str, fix: str = "") -> None:
        self.checks.append(check := Check(name, status, detail, fix))
        print(check.render(), file=self.out, flush=True)

    async def run(self, token: str | None) -> None:
        x, c = self.xsuaa, self.cpi
        print(
            f"cpi-proxy doctor: XSUAA {x.name!r} ({x.uaadomain}, zone {x.zone_id}),"
            f" CPI {c.name!r} ({c.url}), {len(self.routes)} route(s)",
            file=self.out,
        )
        await self.xsuaa_keys_and_clock()
        client = await self.client_credentials()
        reachable = await self.runtime()
        for route in self.routes:
            await self.route_target(route, client, reachable)
        if token is not None:
            await self.user(token)

    # --- 1, 2: XSUAA's keys, and its clock from the same answer ------------------------------

    async def xsuaa_keys_and_clock(self) -> None:
        x, url = self.xsuaa, self.xsuaa.jwks_url
        answered: tuple[str | None, float] | None = None  # (Date header, our time meanwhile)
        try:
            sent = self.clock()
            async with self.session.get(url, headers={"Accept": "application/json"}) as resp:
                answered = (resp.headers.get("Date"), (sent + self.clock()) / 2)
                if resp.status != 200:
                    raise KeyFetchError(f"XSUAA answered {resp.status}")
                keys = parse_jwks(await resp.json(content_type=None))
        except (*_NETWORK, ValueError, KeyFetchError) as exc:
            detail = f"cannot load keys from {url}: {_reason(exc)}"
            if x.verificationkey is not None:
                detail += "; the proxy falls back to the binding's verificationkey"
            fix = _tls_fix(exc) or (
                f"check the XSUAA binding's uaadomain ({x.uaadomain}), the network or HTTP proxy"
                f" path to it, and that the XSUAA instance {x.name!r} exists"
            )
            self.report("XSUAA keys", "fail", detail, fix)
        else:
            self.report("XSUAA keys", "ok", f"{len(keys)} key(s) at {url}: kid {_list(keys)}")
        self.clock_skew(answered)

    def clock_skew(self, answered: tuple[str | None, float] | None) -> None:
        name, leeway = "Clock skew", self.settings.leeway
        try:
            date, local = answered or (None, 0.0)
            server = parsedate_to_datetime(date or "").timestamp() + 0.5  # Date has 1 s steps
        except (TypeError, ValueError):
            return self.report(name, "skip", "skipped: XSUAA's answer had no usable Date header")
        skew = server - local
        detail = f"XSUAA's clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} ours"
        fix = "sync the clock of the host running cpi-proxy (NTP)"
        if abs(skew) <= SKEW_OK:
            self.report(name, "ok", detail)
        elif abs(skew) <= leeway:
            self.report(name, "warn", f"{detail} (within the proxy's leeway of {leeway:g} s)", fix)
        else:
            detail += f": beyond the proxy's leeway of {leeway:g} s, tokens will be refused"
            self.report(name, "fail", detail + " as expired or not yet valid", fix)

    # --- 3, 4, 5: the CPI client, the runtime, each route's iFlow ----------------------------

    async def client_credentials(self) -> CpiToken | None:
        name = "CPI client credentials"
        try:
            token = await self.exchanger.for_client()
        except ProxyError as exc:
            self.report(name, "fail", exc.description, self.exchange_fix(exc, "client_credentials"))
            return None
        how = "x509 certificate" if self.cpi.x509 else "clientsecret"
        detail = f"token for {self.cpi.clientid} ({how}); scopes {_list(token.scopes)}"
        self.report(name, "ok", detail)
        return token

    async def runtime(self) -> bool:
        url, started = f"{self.cpi.url}{TARGET_PREFIX}", time.perf_counter()
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                status = resp.status
        except _NETWORK as exc:
            fix = "check the it-rt binding's url, the network or HTTP proxy path, and CPI's status"
            detail = f"no answer from {url}: {_reason(exc)}"
            self.report("CPI runtime", "fail", detail, _tls_fix(exc) or fix)
            return False
        ms = (time.perf_counter() - started) * 1000
        self.report("CPI runtime", "ok", f"{url} answered {status} in {ms:.0f} ms")
        return True

    async def route_target(self, route: Route, client: CpiToken | None, reachable: bool) -> None:
        """Probe the iFlow with a CSRF-token fetch (a GET), so no business message is sent."""
        name, technical = f"Route {route.name} target", route.grant == "client-credentials"
        path, dollar, _ = route.target.partition("$")
        if path == TARGET_PREFIX:
            why = f"{route.target} may reach any iFlow, so there is no single path to probe"
            return self.report(name, "skip", f"skipped: {why}")
        if not reachable:
            return self.report(name, "skip", "skipped: the CPI runtime is unreachable")
        if client is None:
            return self.report(name, "skip", "skipped: no token (see CPI client credentials)")
        where = f"{path} (static prefix of {route.target})" if dollar else path
        headers = {"Authorization": f"Bearer {client.access_token}", "X-CSRF-Token": "Fetch"}
        try:
            url = self.cpi.url + path
            async with self.session.get(url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
        except _NETWORK as exc:
            fix = _tls_fix(exc) or "retry; if it persists, check CPI's status"
            return self.report(name, "fail", f"{where}: {_reason(exc)}", fix)
        role = route.cpi_role
        lacks = role is not None and self.cpi.scope_of(role) not in client.scopes
        needed = f"role {role}" if role else "the iFlow's role"
        if status == 404 and dollar:
            detail = f"{where} answered 404: no iFlow there (expected if its address is longer)"
            self.report(name, "warn", detail)
        elif status == 404:
            fix = "check the iFlow's address in its HTTPS sender adapter and that it is deployed"
            self.report(name, "fail", f"{where}: no iFlow deployed at this path", fix)
        elif status >= 500:
            self.report(name, "warn", f"{where} answered {status}: the iFlow or CPI failed")
        elif status == 401:
            fix = "check that the it-rt instance belongs to this CPI tenant"
            detail = f"{where} answered 401: CPI refused the it-rt client's token"
            self.report(name, "fail" if technical else "warn", detail, fix)
        elif technical and (status == 403 or lacks):
            fix = f"add {needed} to roles in config-cpi.json and update the it-rt service"
            detail = f"{where} answered {status}: the it-rt client lacks {needed}"
            self.report(name, "fail", detail, fix)
        elif status == 403:
            note = "the technical user lacks the iFlow's role, as expected for a jwt-bearer route"
            self.report(name, "ok", f"{where} answered 403: deployed ({note})")
        else:
            self.report(name, "ok", f"{where} answered {status}: deployed")

    # --- 6: a user's token, as the proxy would treat it --------------------------------------

    async def user(self, token: str) -> None:
        s, x = self.settings, self.xsuaa
        keys = KeyStore(
            self.session,
            x.jwks_url,
            fallback_pem=x.verificationkey,
            ttl=s.keys_ttl,
            min_refresh=s.keys_min_refresh,
            timeout=s.exchange_timeout,
        )
        claims: Claims | None = None
        try:
            claims = await TokenValidator(x, keys, leeway=s.leeway, cache_size=1).validate(token)
        except ProxyError as exc:
            self.report("User token", "fail", exc.description, self.token_fix(exc))
        else:
            origin, minutes = (claims.origin or "-"), (claims.expires_at - self.clock()) / 60
            detail = f"user {claims.subject} (origin {origin}), zone {claims.zone_id},"
            detail += f" expires in {minutes:.0f} min; scopes {_list(claims.scopes)}"
            self.report("User token", "ok", detail)
        for route in self.routes:
            self.route_access(route, claims)
        jwt_routes = [r for r in self.routes if r.grant == "jwt-bearer"]
        if jwt_routes:
            cpi_token = await self.exchange(claims, token)
            for route in jwt_routes:
                self.cpi_role(route, cpi_token)

    def route_access(self, route: Route, claims: Claims | None) -> None:
        name = f"Route {route.name} access"
        if route.authentication == "none":
            return self.report(name, "ok", "public (authenticationType none)")
        if claims is None:
            return self.report(name, "skip", "skipped: the user token is not valid")
        try:
            authorize(claims, route.scopes)  # the proxy's own decision
        except InsufficientScope:
            fix = "assign the user a role collection holding the role with that scope"
            return self.report(name, "fail", f"needs scope {' or '.join(route.scopes)}", fix)
        held = sorted(claims.scopes.intersection(route.scopes))
        self.report(name, "ok", f"holds {held[0]}" if held else "any valid user token suffices")

    async def exchange(self, claims: Claims | None, token: str) -> CpiToken | None:
        name = "CPI token exchange"
        if claims is None:
            self.report(name, "skip", "skipped: the user token is not valid")
            return None
        try:
            cpi_token = await self.exchanger.for_user(claims, token)
        except ProxyError as exc:
            self.report(name, "fail", exc.description, self.exchange_fix(exc, "jwt-bearer"))
            return None
        scopes = _list(self._cpi_scopes(cpi_token)) or "none (the user holds no CPI role)"
        self.report(name, "ok", f"jwt-bearer gave a CPI token; CPI scopes {scopes}")
        return cpi_token

    def cpi_role(self, route: Route, cpi_token: CpiToken | None) -> None:
        name = f"Route {route.name} CPI role"
        if cpi_token is None:
            return self.report(name, "skip", "skipped: no CPI token for this user")
        prefix = self.cpi.xsappname + "."
        roles = _list(s.removeprefix(prefix) for s in self._cpi_scopes(cpi_token)) or "none"
        if route.cpi_role is None:
            return self.report(name, "info", f"no cpiRole set; the user holds CPI roles: {roles}")
        if self.cpi.scope_of(route.cpi_role) in cpi_token.scopes:
            return self.report(name, "ok", f"the user holds {route.cpi_role}")
        fix = f"add {route.cpi_role} to a role collection assigned to the user"
        fix += " (role changes take effect at CPI within an hour)"
        self.report(name, "fail", f"user lacks CPI role {route.cpi_role}", fix)

    def _cpi_scopes(self, token: CpiToken) -> list[str]:
        return [s for s in token.scopes if s.startswith(self.cpi.xsappname + ".")]

    # --- what to do about a failure ----------------------------------------------------------

    def exchange_fix(self, exc: ProxyError, grant: str) -> str:
        text, c = exc.description, self.cpi
        if isinstance(exc, InvalidToken):
            return "get a fresh token from the app's own XSUAA instance; see also Clock skew"
        if isinstance(exc, ExchangeUnavailable | ExchangeTimeout):
            if "CertificateError" in text:  # XSUAA's server certificate, not the binding's
                return TLS_FIX
            host = urlsplit(c.tokenurl).netloc
            return f"check the network or HTTP proxy path to {host} and XSUAA's status"
        if "uaa.user" in text:
            return (
                "add uaa.user to a role template of the app's xs-security.json and that role"
                " to the user's role collection"
            )
        if "unauthorized_client" in text:
            return f'add "{grant}" to "grant-types" in config-cpi.json and update {c.name!r}'
        if "invalid_client" in text or "certificate" in text:
            secret = "certificate and key" if c.x509 else "clientsecret"
            return f"re-create the binding or service key of {c.name!r} and use its {secret}"
        return f"check the it-rt binding's tokenurl ({c.tokenurl}) against its service key"

    def token_fix(self, exc: ProxyError) -> str:
        if isinstance(exc, KeysUnavailable):
            return "XSUAA's keys cannot be fetched: see XSUAA keys"
        x = self.xsuaa
        return (
            f"get a fresh token from the app's own XSUAA instance {x.name!r} (xsappname"
            f" {x.xsappname}), e.g. through the approuter bound to it"
        )


def _list(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def _reason(exc: BaseException) -> str:
    """What went wrong on the wire, in a few words rather than aiohttp's long texts."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error.__class__.__name__})"
    if isinstance(exc, aiohttp.ClientError):
        return exc.__class__.__name__
    return str(exc) if isinstance(exc, KeyFetchError) else "the answer is not JSON"


def _tls_fix(exc: BaseException) -> str:
    return TLS_FIX if isinstance(exc, aiohttp.ClientConnectorCertificateError) else ""

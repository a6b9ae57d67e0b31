"""An emulated SAP XSUAA: one identity zone with the app's own client and the CPI (it-rt) client.

Why: the proxy's job is an OAuth exchange with XSUAA, and mocks would prove nothing about it.
This emulator answers where the proxy can tell the difference the way real XSUAA does (token
shapes, error bodies, the 403 for a user without ``uaa.user``) and lets tests inject the
failures real XSUAA shows only on bad days: see ``Fault``. Like XSUAA it also serves a
certificate endpoint (``app_mtls``) where x509 bindings authenticate by TLS client certificate.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote_plus, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import get_default_algorithms

from proxy.dev.ca import DevCA

__all__ = [
    "DEFAULT_CPI_PARAMS",
    "JWT_BEARER",
    "EmulatedXsuaa",
    "Fault",
    "OAuthClient",
    "Parking",
    "answer_fault",
    "cached_rsa_key",
    "load_cpi_params",
]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_CPI_PARAMS: Mapping[str, Any] = {
    "grant-types": ["client_credentials", JWT_BEARER],
    "roles": ["cpitex.Read"],
}
_STANDARD_SCOPES = ("openid", "uaa.user")
_COPIED_USER_CLAIMS = (
    *("user_name", "user_id", "sub", "given_name", "family_name", "email", "origin"),
    *("xs.system.attributes", "xs.user.attributes", "ext_attr", "zid"),
)
_USER_NAMESPACE = uuid.UUID("6f0d7c8e-3b1a-4d5e-9f2a-7c4b8e1d0a93")

Fault: TypeAlias = str
"""One of "unavailable", "garbage", "hang", "reset" or "status:<code>"."""

_RSA_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def cached_rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One RSA key per name for the whole process: keygen is slow and tests make many emulators.

    Emulators name keys by kid, so two emulators in one process share "key-1"; tests that need
    a key no emulator publishes use another name, e.g. ``cached_rsa_key("foreign")``.
    """
    if name not in _RSA_KEYS:
        _RSA_KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_KEYS[name]


def load_cpi_params(path: Path) -> dict[str, Any]:
    """Read it-rt instance parameters (config-cpi.json: grant-types, roles)."""
    params = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return params


@dataclass(frozen=True)
class OAuthClient:
    """An OAuth client of the zone, i.e. one XSUAA service instance binding."""

    client_id: str
    client_secret: str = field(repr=False)
    xsappname: str
    grant_types: frozenset[str]
    authorities: frozenset[str] = frozenset()


class OAuthError(Exception):
    """An OAuth-style error answer; the token endpoint turns it into JSON in one place."""

    def __init__(self, status: int, error: str, description: str, **extra: str) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.body = {"error": error, "error_description": description, **extra}

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": 'Basic realm="UAA/client"'} if self.status == 401 else {}
        return web.json_response(self.body, status=self.status, headers=headers)


class Parking:
    """Requests held on purpose (hangs, gates); tests await a count instead of polling."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        self._release = asyncio.Event()

    async def hold(self, until: asyncio.Event | None = None) -> None:
        """Wait for ``until`` (default: the next ``release``)."""
        self.count += 1
        self._changed.set()
        try:
            await (until or self._release).wait()
        finally:
            self.count -= 1

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            self._changed.clear()
            await self._changed.wait()

    def release(self, *, for_good: bool = False) -> None:
        """Free everything held now; later arrivals are held again unless ``for_good``."""
        self._release.set()
        if not for_good:
            self._release.clear()


async def answer_fault(fault: Fault, request: web.Request, hangs: Parking) -> web.StreamResponse:
    """Answer a request the way a broken upstream would (see ``Fault``)."""
    if fault == "unavailable":
        body = {"error": "temporarily_unavailable", "error_description": "Service unavailable"}
        return web.json_response(body, status=503)
    if fault == "garbage":
        return web.Response(text="<html>oops</html>", content_type="text/html")
    if fault == "hang":
        await hangs.hold()
        body = {"error": "temporarily_unavailable", "error_description": "Released"}
        return web.json_response(body, status=503)
    if fault == "reset":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing can be answered on an aborted connection
    code = fault.removeprefix("status:")
    if code.isdigit() and 200 <= int(code) <= 599:
        body = {"error": "injected", "error_description": f"injected status {code}"}
        return web.json_response(body, status=int(code))
    body = {"error": "server_error", "error_description": "unknown emulator fault"}
    return web.json_response(body, status=500)


@dataclass
class _Key:
    private: rsa.RSAPrivateKey
    published: bool = True


class EmulatedXsuaa:
    """The XSUAA side of the proxy's world; tests steer it through plain attributes."""

    def __init__(
        self,
        *,
        zone_id: str = "0b2f8e5a-7c3d-4e1f-9a6b-3c9d1e7f5a20",
        subdomain: str = "cpitex",
        cpi_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.zone_id = zone_id
        self.subdomain = subdomain
        self.subaccount_id = "5e3c1a9b-2d4f-4a6e-8b7c-9d0e1f2a3b4c"
        self.cpi_params: Mapping[str, Any] = dict(cpi_params or DEFAULT_CPI_PARAMS)
        self.base_url = f"https://{subdomain}.xsuaa.invalid"  # replaced once a server runs
        # The mutual-TLS certificate endpoint; replaced once an app_mtls() server runs.
        self.cert_base_url = f"https://{subdomain}.authentication.cert.xsuaa.invalid"
        self.token_validity = 43199

        self.frontend = OAuthClient(
            client_id="sb-cpitexxsappname!t4711",
            client_secret=secrets.token_urlsafe(24),
            xsappname="cpitexxsappname!t4711",
            grant_types=frozenset({"authorization_code", JWT_BEARER, "client_credentials"}),
        )
        cpi_app = "it-rt-cpitex!b196"
        self.cpi = OAuthClient(
            client_id=f"sb-9f1c2e3d-5a7b-4c8e-9d0f-1a2b3c4d5e6f!b4711|{cpi_app}",
            client_secret=secrets.token_urlsafe(24),
            xsappname=cpi_app,
            grant_types=frozenset(self.cpi_params.get("grant-types", ())),
            authorities=frozenset(f"{cpi_app}.{r}" for r in self.cpi_params.get("roles", ())),
        )
        frontend_scope = f"{self.frontend.xsappname}.texfrontendscope"
        self.role_collections: dict[str, frozenset[str]] = {
            "CpiTexUser": frozenset({frontend_scope, *self.cpi.authorities, "uaa.user"}),
            "FrontendOnly": frozenset({frontend_scope, "uaa.user"}),
            "NoUaaUser": frozenset({frontend_scope, *self.cpi.authorities}),
        }
        self._user_collections: dict[str, tuple[str, ...]] = {}  # user_id -> role collections
        # Subject CN of a client certificate -> the client it authenticates (x509 bindings).
        self.cpi_cert_cn = str(uuid.uuid5(_USER_NAMESPACE, f"x509:{self.cpi.client_id}"))
        self._cert_clients: dict[str, OAuthClient] = {}
        # jtis issued in the current second, per subject: see issued_in_second.
        self._issued: tuple[int, dict[str, set[str]]] = (0, {})

        self._keys: dict[str, _Key] = {"key-1": _Key(cached_rsa_key("key-1"))}
        self._signing_kid = "key-1"

        self.token_requests: collections.Counter[str] = collections.Counter()  # authenticated
        self.token_posts = 0  # every request at a token endpoint, authenticated or not
        self.key_fetches = 0
        self.token_fault: Fault | None = None
        # Faults for the next token requests, one each, ahead of token_fault: a blip, not an outage.
        self.token_faults: collections.deque[Fault] = collections.deque()
        self.keys_fault: Fault | None = None
        self.token_gate: asyncio.Event | None = None
        self.gated = Parking()
        self.hangs = Parking()

    # --- keys -------------------------------------------------------------------------------

    @property
    def signing_kid(self) -> str:
        return self._signing_kid

    def rotate_key(self) -> str:
        """Start signing with a new key; old keys stay published, as during a real rotation."""
        kid = f"key-{len(self._keys) + 1}"
        self._keys[kid] = _Key(cached_rsa_key(kid))
        self._signing_kid = kid
        return kid

    def unpublish_key(self, kid: str) -> None:
        self._keys[kid].published = False

    def public_keys(self) -> dict[str, Any]:
        return {kid: k.private.public_key() for kid, k in self._keys.items() if k.published}

    # --- addresses and bindings -------------------------------------------------------------

    @property
    def uaadomain(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/oauth/token"

    def vcap_credentials_xsuaa(self, *, x509: tuple[str, str] | None = None) -> dict[str, Any]:
        """The app's XSUAA binding; ``x509=(cert_pem, key_pem)`` gives the x509 variant
        (``credential-type: x509``: certificate, key and certurl instead of a client secret)."""
        public = self._keys[self._signing_kid].private.public_key()
        if x509 is None:
            secret: dict[str, str] = {"clientsecret": self.frontend.client_secret}
        else:
            secret = {
                "credential-type": "x509",
                "certificate": x509[0],
                "key": x509[1],
                "certurl": self.cert_base_url,
            }
        return {
            "clientid": self.frontend.client_id,
            **secret,
            "url": self.base_url,
            "uaadomain": self.uaadomain,
            "xsappname": self.frontend.xsappname,
            "identityzone": self.subdomain,
            "identityzoneid": self.zone_id,
            "tenantid": self.zone_id,
            "tenantmode": "dedicated",
            "sburl": self.base_url,
            "verificationkey": _pem(public),
            "apiurl": self.base_url,
        }

    def vcap_credentials_cpi(self, cpi_url: str) -> dict[str, Any]:
        return {
            "oauth": {
                "clientid": self.cpi.client_id,
                "clientsecret": self.cpi.client_secret,
                "tokenurl": self.issuer,
                "url": cpi_url,
            }
        }

    def vcap_credentials_cpi_x509(
        self, cpi_url: str, cert_pem: str, key_pem: str
    ) -> dict[str, Any]:
        """An it-rt binding created with ``{"credential-type": "x509"}``: no secret, and the
        token URL is the certificate endpoint (see ``issue_cpi_client_cert``)."""
        return {
            "oauth": {
                "clientid": self.cpi.client_id,
                "certificate": cert_pem,
                "key": key_pem,
                "tokenurl": f"{self.cert_base_url}/oauth/token",
                "url": cpi_url,
                "credential-type": "x509",
            }
        }

    def vcap_services(self, cpi_url: str, *, x509: tuple[str, str] | None = None) -> dict[str, Any]:
        """Both bindings; ``x509`` makes the XSUAA one an x509 binding."""
        return self._vcap(
            self.vcap_credentials_xsuaa(x509=x509), self.vcap_credentials_cpi(cpi_url)
        )

    def vcap_services_x509(
        self, cpi_url: str, cert_pem: str, key_pem: str, *, x509: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """Like ``vcap_services``, with the it-rt binding an x509 one."""
        return self._vcap(
            self.vcap_credentials_xsuaa(x509=x509),
            self.vcap_credentials_cpi_x509(cpi_url, cert_pem, key_pem),
        )

    @staticmethod
    def _vcap(xsuaa_credentials: dict[str, Any], cpi_credentials: dict[str, Any]) -> dict[str, Any]:
        xsuaa = {"label": "xsuaa", "name": "cpitex-xsuaa", "plan": "application", "tags": ["xsuaa"]}
        it_rt = {"label": "it-rt", "name": "cpitex-cpi", "plan": "integration-flow", "tags": []}
        return {
            "xsuaa": [{**xsuaa, "credentials": xsuaa_credentials}],
            "it-rt": [{**it_rt, "credentials": cpi_credentials}],
        }

    def issue_cpi_client_cert(self, ca: DevCA) -> tuple[str, str]:
        """A client certificate ``(cert_pem, key_pem)`` that authenticates the CPI client at the
        certificate endpoint; its subject CN is ``cpi_cert_cn``, stable for this emulator."""
        self._cert_clients[self.cpi_cert_cn] = self.cpi
        return ca.issue_client_cert(self.cpi_cert_cn)

    # --- tokens -----------------------------------------------------------------------------

    def mint_user_token(
        self,
        user: str = "alice",
        *,
        role_collections: Sequence[str] = ("CpiTexUser",),
        client: OAuthClient | None = None,
        expires_in: int = 3600,
        not_before: int | None = None,
        header: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        kid: str | None = None,
        key: Any | None = None,
        algorithm: str = "RS256",
    ) -> str:
        """A user token as after an authorization_code login; ``not_before`` is seconds from now.

        ``header``/``claims`` are merged over the defaults (None removes a key); ``kid`` signs
        with that emulator key, ``key`` with a foreign one.
        """
        client = client or self.frontend
        unknown = [n for n in role_collections if n not in self.role_collections]
        if unknown:
            raise ValueError(f"unknown role collections: {unknown}")
        user_id = str(uuid.uuid5(_USER_NAMESPACE, user))
        self._user_collections[user_id] = tuple(role_collections)
        granted = set().union(*(self.role_collections[n] for n in role_collections))
        now = int(time.time())
        body: dict[str, Any] = {
            **self._user_claims(user, user_id, role_collections),
            **self._client_claims(client, "authorization_code", _scopes(client, granted, granted)),
            "auth_time": now,
            **self._times(now, expires_in),
        }
        if not_before is not None:
            body["nbf"] = now + not_before
        self._note_issued(_merge(body, claims))
        signing_kid = kid or self._signing_kid
        signer = key if key is not None else self._keys[signing_kid].private
        if algorithm == "none":
            signer = None
        default_header = {"alg": algorithm, "kid": signing_kid, "typ": "JWT", "jku": self._jku}
        return _sign(_merge(default_header, header), _merge(body, claims), signer, algorithm)

    @property
    def _jku(self) -> str:
        return f"{self.base_url}/token_keys"

    def _user_claims(self, user: str, user_id: str, collections: Sequence[str]) -> dict[str, Any]:
        return {
            "ext_attr": self._ext_attr(),
            "xs.system.attributes": {"xs.rolecollections": list(collections)},
            "given_name": user.capitalize(),
            "xs.user.attributes": {},
            "family_name": "Tester",
            "sub": user_id,
            "user_id": user_id,
            "origin": "sap.default",
            "user_name": user,
            "email": f"{user}@example.com",
        }

    def _ext_attr(self) -> dict[str, str]:
        return {"enhancer": "XSUAA", "subaccountid": self.subaccount_id, "zdn": self.subdomain}

    def _client_claims(self, client: OAuthClient, grant: str, scope: list[str]) -> dict[str, Any]:
        return {
            "scope": scope,
            "client_id": client.client_id,
            "cid": client.client_id,
            "azp": client.client_id,
            "grant_type": grant,
            "rev_sig": secrets.token_hex(4),
            "iss": self.issuer,
            "zid": self.zone_id,
            "aud": _audience(client, scope),
        }

    def _times(self, now: int, expires_in: int) -> dict[str, Any]:
        return {"jti": uuid.uuid4().hex, "iat": now, "exp": now + expires_in}

    def issued_in_second(self, subject: str, second: int) -> frozenset[str]:
        """The jtis issued to ``subject`` (user_name, else client_id) with ``iat == second``.

        Why: iat has 1 s resolution, so revoking "every token issued so far" must tell apart
        the tokens of the current second that exist already from those minted after. Only the
        latest second is remembered, which is all that question needs.
        """
        current, issued = self._issued
        return frozenset(issued.get(subject, ())) if second == current else frozenset()

    def _note_issued(self, claims: Mapping[str, Any]) -> None:
        now, jti = int(time.time()), claims.get("jti")
        if claims.get("iat") != now or not isinstance(jti, str):
            return  # a token dated elsewhere by a test's claims override
        if self._issued[0] != now:
            self._issued = (now, {})
        subject = str(claims.get("user_name") or claims.get("client_id"))
        self._issued[1].setdefault(subject, set()).add(jti)

    def _issue(self, claims: dict[str, Any]) -> dict[str, Any]:
        self._note_issued(claims)
        header = {"alg": "RS256", "kid": self._signing_kid, "typ": "JWT", "jku": self._jku}
        token = _sign(header, claims, self._keys[self._signing_kid].private, "RS256")
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.token_validity,
            "scope": " ".join(claims["scope"]),
            "jti": claims["jti"],
        }

    # --- HTTP -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        self.gated, self.hangs = Parking(), Parking()  # their events bind to this app's loop
        app = web.Application()
        app.router.add_get("/token_keys", self._token_keys)
        app.router.add_post("/oauth/token", self._token)
        # on_shutdown, not on_cleanup: the runner waits for open handlers before cleanup runs.
        app.on_shutdown.append(self._release_all)
        return app

    def app_mtls(self) -> web.Application:
        """The certificate endpoint: ``POST /oauth/token`` for clients authenticated by their
        TLS client certificate. Serve it with ``DevCA.mtls_server_context()`` and set
        ``cert_base_url``. Grants, counters, faults and the gate are shared with ``app()``, so
        call ``app()`` first when serving both.
        """
        app = web.Application()
        app.router.add_post("/oauth/token", self._token_mtls)
        app.on_shutdown.append(self._release_all)
        return app

    def release_hangs(self) -> None:
        """Let every request held by a "hang" fault answer (503)."""
        self.hangs.release()

    @property
    def token_waiting(self) -> int:
        return self.gated.count

    async def wait_parked(self, count: int) -> None:
        """Return once ``count`` token requests wait at ``token_gate``."""
        await self.gated.wait_for(count)

    async def _release_all(self, _app: web.Application) -> None:
        self.hangs.release(for_good=True)
        if self.token_gate is not None:
            self.token_gate.set()

    async def _token_keys(self, request: web.Request) -> web.StreamResponse:
        self.key_fetches += 1
        if self.keys_fault is not None:
            return await answer_fault(self.keys_fault, request, self.hangs)
        zid = request.query.get("zid")
        if zid is not None and zid != self.zone_id:
            return OAuthError(400, "invalid_request", "Unknown identity zone").response()
        return web.json_response({"keys": [_jwk(kid, k) for kid, k in self.public_keys().items()]})

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await _form(request)
        return await self._grant(request, form, self._authenticate(request, form))

    async def _token_mtls(self, request: web.Request) -> web.StreamResponse:
        form = await _form(request)
        return await self._grant(request, form, self._authenticate_cert(request, form))

    async def _grant(
        self, request: web.Request, form: Mapping[str, str], client: OAuthClient | OAuthError
    ) -> web.StreamResponse:
        """The token endpoint once the client is (or failed to be) authenticated."""
        grant = form.get("grant_type", "")
        self.token_posts += 1
        if isinstance(client, OAuthClient):
            self.token_requests[grant] += 1
        if self.token_gate is not None:
            await self.gated.hold(self.token_gate)
        fault = self.token_faults.popleft() if self.token_faults else self.token_fault
        if fault is not None:
            return await answer_fault(fault, request, self.hangs)
        try:
            if isinstance(client, OAuthError):
                raise client
            if not grant:
                raise OAuthError(400, "invalid_request", "Missing grant_type")
            if grant not in client.grant_types:
                raise OAuthError(400, "unauthorized_client", f"Unauthorized grant type: {grant}")
            if grant == JWT_BEARER:
                return web.json_response(self._jwt_bearer(client, form))
            if grant == "client_credentials":
                return web.json_response(self._client_credentials(client))
            raise OAuthError(400, "unauthorized_client", f"Unsupported grant type: {grant}")
        except OAuthError as error:
            return error.response()

    def _authenticate(
        self, request: web.Request, form: Mapping[str, str]
    ) -> OAuthClient | OAuthError:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return OAuthError(401, "invalid_client", "Bad credentials")
            client_id, _, secret = decoded.partition(":")
            if client_id not in self._clients():  # RFC 6749 2.3.1 form-encodes both parts
                client_id, secret = unquote_plus(client_id), unquote_plus(secret)
            if form.get("client_id", client_id) != client_id:
                return OAuthError(401, "invalid_client", "Bad credentials")
        elif "client_id" in form:
            client_id, secret = form["client_id"], form.get("client_secret", "")
        else:
            return OAuthError(
                401, "invalid_client", "Full authentication is required to access this resource"
            )
        client = self._clients().get(client_id)
        if client is None or not hmac.compare_digest(
            client.client_secret.encode(), secret.encode()
        ):
            return OAuthError(401, "invalid_client", "Bad credentials")
        return client

    def _authenticate_cert(
        self, request: web.Request, form: Mapping[str, str]
    ) -> OAuthClient | OAuthError:
        """mTLS client authentication: the certificate names the client, the form must agree.

        A secret (Basic or form) is ignored here, as on XSUAA's certificate endpoint.
        """
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        cn = _common_name(peercert)
        if cn is None:
            return OAuthError(401, "invalid_client", "Client certificate required")
        client = self._cert_clients.get(cn)
        if client is None:
            return OAuthError(401, "invalid_client", "Unknown client certificate")
        if form.get("client_id") != client.client_id:
            return OAuthError(401, "invalid_client", "client_id does not match the certificate")
        return client

    def _clients(self) -> dict[str, OAuthClient]:
        return {c.client_id: c for c in (self.frontend, self.cpi)}

    def _jwt_bearer(self, client: OAuthClient, form: Mapping[str, str]) -> dict[str, Any]:
        assertion = form.get("assertion")
        if not assertion:
            raise OAuthError(400, "invalid_request", "Missing assertion")
        user = self._verify(assertion)
        scope = user.get("scope")
        user_scopes = set(scope) if isinstance(scope, list) else set()
        if "uaa.user" not in user_scopes:
            raise OAuthError(
                403, "insufficient_scope", "Insufficient scope for this resource", scope="uaa.user"
            )
        # Like XSUAA, scopes come from the user's current role collections, not the assertion.
        names = self._user_collections.get(str(user.get("user_id")))
        if names is None:
            attributes = user.get("xs.system.attributes")
            listed = attributes.get("xs.rolecollections") if isinstance(attributes, dict) else None
            names = tuple(n for n in listed or () if isinstance(n, str))
        granted = set().union(*(self.role_collections.get(n, frozenset()) for n in names))
        now = int(time.time())
        return self._issue(
            {
                **{k: user[k] for k in _COPIED_USER_CLAIMS if k in user},
                **self._client_claims(client, JWT_BEARER, _scopes(client, granted, user_scopes)),
                **self._times(now, self.token_validity),
            }
        )

    def _client_credentials(self, client: OAuthClient) -> dict[str, Any]:
        scope = sorted(client.authorities | {"uaa.resource"})
        now = int(time.time())
        return self._issue(
            {
                "ext_attr": self._ext_attr(),
                "sub": client.client_id,
                "authorities": scope,
                **self._client_claims(client, "client_credentials", scope),
                **self._times(now, self.token_validity),
            }
        )

    def _verify(self, assertion: str) -> dict[str, Any]:
        """Check an assertion like XSUAA: our signature, unexpired, our zone; never echo it."""
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
        except jwt.InvalidTokenError:
            raise OAuthError(401, "invalid_token", "Malformed assertion") from None
        key = self.public_keys().get(kid) if isinstance(kid, str) else None
        if key is None:
            raise OAuthError(401, "invalid_token", "Unknown signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                issuer=self.issuer,
                options={"verify_aud": False, "require": ["exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise OAuthError(401, "invalid_token", "Assertion expired") from None
        except jwt.InvalidTokenError:
            raise OAuthError(401, "invalid_token", "Invalid assertion") from None
        if claims.get("zid") != self.zone_id:
            raise OAuthError(401, "invalid_token", "Assertion from another identity zone")
        return claims


async def _form(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}


def _common_name(peercert: object) -> str | None:
    """The subject CN of a certificate as ``SSLSocket.getpeercert()`` describes it."""
    subject = peercert.get("subject", ()) if isinstance(peercert, dict) else ()
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName" and isinstance(value, str):
                return value
    return None


def _scopes(client: OAuthClient, granted: Iterable[str], standard: Iterable[str]) -> list[str]:
    """The client's own scopes among ``granted`` plus the standard ones found in ``standard``."""
    own = {s for s in granted if s.startswith(f"{client.xsappname}.")}
    return sorted(own | (set(_STANDARD_SCOPES) & set(standard)))


def _audience(client: OAuthClient, scope: Iterable[str]) -> list[str]:
    """XSUAA's aud: the client id plus the prefix (before the first dot) of each dotted scope."""
    prefixes = {s.split(".", 1)[0] for s in scope if "." in s}
    return [client.client_id, *sorted(prefixes - {client.client_id})]


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = {**base, **(overrides or {})}
    return {k: v for k, v in merged.items() if v is not None}


def _sign(header: Mapping[str, Any], claims: Mapping[str, Any], key: Any, algorithm: str) -> str:
    """Sign by hand so tests can put anything in the header (PyJWT trusts its "alg")."""
    alg = get_default_algorithms()[algorithm]
    signing_input = b".".join(_b64(json.dumps(part).encode()) for part in (header, claims))
    signature = alg.sign(signing_input, alg.prepare_key(key))
    return (signing_input + b"." + _b64(signature)).decode("ascii")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64_int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode("ascii")


def _pem(public: rsa.RSAPublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _jwk(kid: str, public: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = public.public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "use": "sig",
        "n": _b64_int(numbers.n),
        "e": _b64_int(numbers.e),
        "value": _pem(public),
    }

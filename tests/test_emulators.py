"""The emulators behave like XSUAA and CPI where the proxy can tell, over real TLS sockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pytest_aiohttp import AiohttpServer

from proxy.dev import (
    GZIP_PLAINTEXT,
    JWT_BEARER,
    DevCA,
    EmulatedIflowRuntime,
    EmulatedXsuaa,
    OAuthClient,
    cached_rsa_key,
    cpi_token_of,
    load_cpi_params,
    make_dev_ca,
)


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return make_dev_ca()


@pytest.fixture
async def session(ca: DevCA) -> AsyncIterator[aiohttp.ClientSession]:
    """No cookie jar: tests that need cookies (CSRF sessions) send them explicitly."""
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


@pytest.fixture
async def xsuaa(ca: DevCA, aiohttp_server: AiohttpServer) -> EmulatedXsuaa:
    emulator = EmulatedXsuaa()
    server = await aiohttp_server(emulator.app(), ssl=ca.server_context())
    emulator.base_url = str(server.make_url("")).rstrip("/")
    return emulator


@pytest.fixture
async def cpi(
    ca: DevCA, aiohttp_server: AiohttpServer, xsuaa: EmulatedXsuaa
) -> tuple[EmulatedIflowRuntime, str]:
    runtime = EmulatedIflowRuntime(xsuaa)
    server = await aiohttp_server(runtime.app(), ssl=ca.server_context())
    return runtime, str(server.make_url("")).rstrip("/")


async def post_token(
    session: aiohttp.ClientSession,
    xsuaa: EmulatedXsuaa,
    client: OAuthClient,
    form: dict[str, str],
    *,
    secret: str | None = None,
) -> tuple[int, dict[str, Any]]:
    password = client.client_secret if secret is None else secret
    auth = {"Authorization": aiohttp.encode_basic_auth(client.client_id, password)}
    async with session.post(f"{xsuaa.base_url}/oauth/token", data=form, headers=auth) as r:
        return r.status, await r.json()


async def exchange(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, user: str, collection: str
) -> str:
    """The proxy's own move: trade the user's frontend token for a CPI token."""
    assertion = xsuaa.mint_user_token(user, role_collections=[collection])
    form = {"grant_type": JWT_BEARER, "assertion": assertion}
    status, body = await post_token(session, xsuaa, xsuaa.cpi, form)
    assert status == 200, body
    return str(body["access_token"])


async def verify(session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, token: str) -> Any:
    """Decode a token with PyJWT against the emulator's published JWKS."""
    async with session.get(f"{xsuaa.base_url}/token_keys") as r:
        jwks = jwt.PyJWKSet.from_dict(await r.json())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key, algorithms=["RS256"], options={"verify_aud": False})


# --- CA ---------------------------------------------------------------------------------------


def test_dev_ca_hides_the_key_and_writes_a_trust_file(ca: DevCA, tmp_path: Path) -> None:
    assert "key_pem" not in repr(ca)
    assert "PRIVATE" not in repr(ca)
    path = ca.write_ca(tmp_path)
    assert path.read_bytes() == ca.ca_pem
    ssl.create_default_context(cafile=str(path))  # loads as a trust store


def test_client_certificates_are_strict_client_leaves(ca: DevCA) -> None:
    cert_pem, key_pem = ca.issue_client_cert("some-client")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    ca_cert = x509.load_pem_x509_certificate(ca.ca_pem)
    extension = cert.extensions.get_extension_for_class

    assert key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "some-client"
    assert cert.issuer == ca_cert.subject
    assert list(extension(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (extension(x509.BasicConstraints).critical, extension(x509.KeyUsage).critical) == (
        True,
        True,
    )
    assert extension(x509.BasicConstraints).value.ca is False
    assert extension(x509.KeyUsage).value.digital_signature
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert extension(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    cert.verify_directly_issued_by(ca_cert)


def test_a_ca_without_its_key_cannot_issue(ca: DevCA) -> None:
    public_only = DevCA(ca_pem=ca.ca_pem, cert_pem=ca.cert_pem, key_pem=ca.key_pem)
    with pytest.raises(ValueError, match="no CA key"):
        public_only.issue_client_cert("x")


# --- XSUAA ------------------------------------------------------------------------------------


async def test_token_keys_publish_an_rsa_jwks(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    async with session.get(f"{xsuaa.base_url}/token_keys", params={"zid": xsuaa.zone_id}) as r:
        body = await r.json()
    assert r.status == 200
    [key] = body["keys"]
    assert {k: key[k] for k in ("kty", "kid", "alg", "use")} == {
        "kty": "RSA",
        "kid": "key-1",
        "alg": "RS256",
        "use": "sig",
    }
    assert key["value"].startswith("-----BEGIN PUBLIC KEY-----")
    async with session.get(f"{xsuaa.base_url}/token_keys", params={"zid": "other"}) as r:
        assert r.status == 400
    assert xsuaa.key_fetches == 2


async def test_minted_user_token_has_the_xsuaa_shape(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token("alice")
    header = jwt.get_unverified_header(token)
    claims = await verify(session, xsuaa, token)

    assert header == {
        "alg": "RS256",
        "kid": "key-1",
        "typ": "JWT",
        "jku": f"{xsuaa.base_url}/token_keys",
    }
    app = xsuaa.frontend.xsappname
    assert claims["aud"] == [xsuaa.frontend.client_id, app, "uaa"]
    assert claims["scope"] == [f"{app}.texfrontendscope", "uaa.user"]
    assert claims["xs.system.attributes"] == {"xs.rolecollections": ["CpiTexUser"]}
    assert claims["iss"] == f"{xsuaa.base_url}/oauth/token"
    assert (claims["user_name"], claims["email"], claims["given_name"]) == (
        "alice",
        "alice@example.com",
        "Alice",
    )
    assert claims["grant_type"] == "authorization_code"
    assert claims["zid"] == xsuaa.zone_id
    assert claims["sub"] == claims["user_id"]


def test_mint_overrides_and_removes_header_and_claims() -> None:
    xsuaa = EmulatedXsuaa()
    token = xsuaa.mint_user_token(header={"jku": None, "alg": "HS256"}, claims={"zid": None})
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": "key-1", "typ": "JWT"}
    assert "zid" not in jwt.decode(token, options={"verify_signature": False})


async def test_jwt_bearer_grants_the_cpi_role_only_through_the_role_collection(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    cpi_app = xsuaa.cpi.xsappname
    granted = await verify(session, xsuaa, await exchange(session, xsuaa, "alice", "CpiTexUser"))
    frontend_only = await exchange(session, xsuaa, "bob", "FrontendOnly")
    denied = await verify(session, xsuaa, frontend_only)

    assert granted["scope"] == [f"{cpi_app}.cpitex.Read", "uaa.user"]
    assert granted["aud"] == [xsuaa.cpi.client_id, cpi_app, "uaa"]
    assert (granted["grant_type"], granted["cid"], granted["user_name"]) == (
        JWT_BEARER,
        xsuaa.cpi.client_id,
        "alice",
    )
    assert denied["scope"] == ["uaa.user"]
    assert xsuaa.token_requests[JWT_BEARER] == 2


async def test_jwt_bearer_response_has_the_oauth_fields(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.token_validity = 120
    form = {"grant_type": JWT_BEARER, "assertion": xsuaa.mint_user_token()}
    status, body = await post_token(session, xsuaa, xsuaa.cpi, form)
    assert status == 200
    assert (body["token_type"], body["expires_in"]) == ("bearer", 120)
    assert body["scope"] == f"{xsuaa.cpi.xsappname}.cpitex.Read uaa.user"
    assert (
        body["jti"] == jwt.decode(body["access_token"], options={"verify_signature": False})["jti"]
    )


async def test_jwt_bearer_without_uaa_user_is_insufficient_scope(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    assertion = xsuaa.mint_user_token(role_collections=["NoUaaUser"])
    status, body = await post_token(
        session, xsuaa, xsuaa.cpi, {"grant_type": JWT_BEARER, "assertion": assertion}
    )
    assert (status, body) == (
        403,
        {
            "error": "insufficient_scope",
            "error_description": "Insufficient scope for this resource",
            "scope": "uaa.user",
        },
    )


@pytest.mark.parametrize(
    ("mint", "description"),
    [
        ({"key": cached_rsa_key("foreign")}, "Invalid assertion"),
        ({"expires_in": -60}, "Assertion expired"),
        ({"claims": {"zid": "another-zone"}}, "Assertion from another identity zone"),
        ({"kid": "nope"}, "Unknown signing key"),
    ],
)
async def test_jwt_bearer_rejects_bad_assertions(
    session: aiohttp.ClientSession,
    xsuaa: EmulatedXsuaa,
    mint: dict[str, Any],
    description: str,
) -> None:
    if "kid" in mint:
        mint["key"] = cached_rsa_key("key-1")
    assertion = xsuaa.mint_user_token(**mint)
    status, body = await post_token(
        session, xsuaa, xsuaa.cpi, {"grant_type": JWT_BEARER, "assertion": assertion}
    )
    assert (status, body) == (401, {"error": "invalid_token", "error_description": description})


async def test_bad_client_credentials_are_invalid_client(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    form = {"grant_type": "client_credentials"}
    status, body = await post_token(session, xsuaa, xsuaa.cpi, form, secret="wrong")
    async with session.post(f"{xsuaa.base_url}/oauth/token", data=form) as r:
        anonymous = (r.status, (await r.json())["error_description"])

    assert (status, body["error"]) == (401, "invalid_client")
    assert anonymous == (401, "Full authentication is required to access this resource")
    assert xsuaa.token_requests == {}


async def test_client_secret_in_the_form_authenticates(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": xsuaa.cpi.client_id,
        "client_secret": xsuaa.cpi.client_secret,
    }
    async with session.post(f"{xsuaa.base_url}/oauth/token", data=form) as r:
        assert r.status == 200


async def test_client_credentials_token_carries_the_authorities(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    status, body = await post_token(session, xsuaa, xsuaa.cpi, {"grant_type": "client_credentials"})
    claims = await verify(session, xsuaa, body["access_token"])
    assert status == 200
    assert claims["scope"] == [f"{xsuaa.cpi.xsappname}.cpitex.Read", "uaa.resource"]
    assert (claims["sub"], claims["grant_type"]) == (xsuaa.cpi.client_id, "client_credentials")
    assert "user_name" not in claims


async def test_a_grant_the_client_lacks_is_unauthorized_client(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    status, body = await post_token(
        session, xsuaa, xsuaa.cpi, {"grant_type": "authorization_code", "code": "x"}
    )
    assert (status, body["error"]) == (400, "unauthorized_client")


@pytest.mark.parametrize(
    ("fault", "status", "content_type"),
    [
        ("unavailable", 503, "application/json"),
        ("garbage", 200, "text/html"),
        ("status:429", 429, "application/json"),
    ],
)
async def test_token_faults_answer_like_a_broken_upstream(
    session: aiohttp.ClientSession,
    xsuaa: EmulatedXsuaa,
    fault: str,
    status: int,
    content_type: str,
) -> None:
    xsuaa.token_fault = fault
    auth = {
        "Authorization": aiohttp.encode_basic_auth(xsuaa.cpi.client_id, xsuaa.cpi.client_secret)
    }
    form = {"grant_type": "client_credentials"}
    async with session.post(f"{xsuaa.base_url}/oauth/token", data=form, headers=auth) as r:
        assert (r.status, r.content_type) == (status, content_type)
    assert xsuaa.token_requests["client_credentials"] == 1


async def test_reset_fault_drops_the_connection(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.keys_fault = "reset"
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(f"{xsuaa.base_url}/token_keys") as r:
            await r.read()


async def test_hang_fault_waits_until_released(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.keys_fault = "hang"
    request = asyncio.ensure_future(session.get(f"{xsuaa.base_url}/token_keys"))
    await xsuaa.hangs.wait_for(1)
    assert not request.done()
    xsuaa.release_hangs()
    async with await request as r:
        assert r.status == 503


async def test_token_gate_parks_concurrent_requests(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.token_gate = asyncio.Event()
    form = {"grant_type": "client_credentials"}
    calls = [post_token(session, xsuaa, xsuaa.cpi, form) for _ in range(20)]
    pending = asyncio.gather(*calls)
    await xsuaa.wait_parked(20)
    xsuaa.token_gate.set()
    results = await pending
    assert [status for status, _ in results] == [200] * 20
    assert xsuaa.token_waiting == 0


async def test_rotation_keeps_old_keys_published_until_unpublished(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    new_kid = xsuaa.rotate_key()
    token = xsuaa.mint_user_token()
    xsuaa.unpublish_key("key-1")
    async with session.get(f"{xsuaa.base_url}/token_keys") as r:
        kids = [k["kid"] for k in (await r.json())["keys"]]
    assert (new_kid, xsuaa.signing_kid, kids) == ("key-2", "key-2", ["key-2"])
    assert jwt.get_unverified_header(token)["kid"] == "key-2"
    assert (await verify(session, xsuaa, token))["user_name"] == "alice"


def test_vcap_services_look_like_cloud_foundry_bindings() -> None:
    xsuaa = EmulatedXsuaa()
    xsuaa.base_url = "https://127.0.0.1:8443"
    vcap = xsuaa.vcap_services("https://cpi.example")
    credentials = vcap["xsuaa"][0]["credentials"]
    assert credentials["uaadomain"] == "127.0.0.1:8443"
    assert credentials["clientid"] == xsuaa.frontend.client_id
    assert credentials["verificationkey"].startswith("-----BEGIN PUBLIC KEY-----")
    assert vcap["it-rt"][0]["plan"] == "integration-flow"
    assert vcap["it-rt"][0]["credentials"]["oauth"] == {
        "clientid": xsuaa.cpi.client_id,
        "clientsecret": xsuaa.cpi.client_secret,
        "tokenurl": "https://127.0.0.1:8443/oauth/token",
        "url": "https://cpi.example",
    }
    assert xsuaa.cpi.client_secret not in repr(xsuaa.cpi)


def test_cpi_params_shape_the_cpi_client(tmp_path: Path) -> None:
    path = tmp_path / "config-cpi.json"
    path.write_text(json.dumps({"grant-types": ["client_credentials"], "roles": ["a", "b"]}))
    xsuaa = EmulatedXsuaa(cpi_params=load_cpi_params(path))
    app = xsuaa.cpi.xsappname
    assert xsuaa.cpi.grant_types == {"client_credentials"}
    assert xsuaa.cpi.authorities == {f"{app}.a", f"{app}.b"}


def test_x509_bindings_carry_certificate_and_key_instead_of_a_secret() -> None:
    xsuaa = EmulatedXsuaa()
    xsuaa.base_url, xsuaa.cert_base_url = "https://127.0.0.1:8443", "https://127.0.0.1:8444"
    vcap = xsuaa.vcap_services_x509("https://cpi.example", "CERT", "KEY", x509=("XC", "XK"))
    assert vcap["it-rt"][0]["credentials"]["oauth"] == {
        "clientid": xsuaa.cpi.client_id,
        "certificate": "CERT",
        "key": "KEY",
        "tokenurl": "https://127.0.0.1:8444/oauth/token",
        "url": "https://cpi.example",
        "credential-type": "x509",
    }
    credentials = vcap["xsuaa"][0]["credentials"]
    assert "clientsecret" not in credentials
    assert {k: credentials[k] for k in ("credential-type", "certificate", "key", "certurl")} == {
        "credential-type": "x509",
        "certificate": "XC",
        "key": "XK",
        "certurl": "https://127.0.0.1:8444",
    }
    assert credentials["url"] == "https://127.0.0.1:8443"
    plain = xsuaa.vcap_services("https://cpi.example", x509=("XC", "XK"))
    assert plain["xsuaa"][0]["credentials"] == credentials
    assert "clientsecret" in plain["it-rt"][0]["credentials"]["oauth"]


# --- XSUAA certificate endpoint (mutual TLS) --------------------------------------------------


@pytest.fixture
async def mtls(ca: DevCA, aiohttp_server: AiohttpServer, xsuaa: EmulatedXsuaa) -> EmulatedXsuaa:
    """The xsuaa fixture, also serving its certificate endpoint."""
    server = await aiohttp_server(xsuaa.app_mtls(), ssl=ca.mtls_server_context())
    xsuaa.cert_base_url = str(server.make_url("")).rstrip("/")
    return xsuaa


async def post_cert_token(
    ca: DevCA,
    tmp_path: Path,
    xsuaa: EmulatedXsuaa,
    cert: tuple[str, str] | None,
    form: dict[str, str],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST to the certificate endpoint presenting ``cert`` (None: no client certificate)."""
    ctx = ca.client_context()
    if cert is not None:
        cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
        cert_file.write_text(cert[0])
        key_file.write_text(cert[1])
        ctx.load_cert_chain(cert_file, key_file)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.post(f"{xsuaa.cert_base_url}/oauth/token", data=form, headers=headers) as r,
    ):
        return r.status, await r.json()


async def test_the_registered_certificate_gets_cpi_tokens(
    ca: DevCA, tmp_path: Path, session: aiohttp.ClientSession, mtls: EmulatedXsuaa
) -> None:
    cert = mtls.issue_cpi_client_cert(ca)
    client_id = mtls.cpi.client_id
    assertion = mtls.mint_user_token("alice")
    jwt_bearer = {"grant_type": JWT_BEARER, "assertion": assertion, "client_id": client_id}
    technical = {"grant_type": "client_credentials", "client_id": client_id}
    wrong_secret = {"Authorization": aiohttp.encode_basic_auth(client_id, "ignored")}

    user = await post_cert_token(ca, tmp_path, mtls, cert, jwt_bearer)
    tech = await post_cert_token(ca, tmp_path, mtls, cert, technical, wrong_secret)

    assert (user[0], tech[0]) == (200, 200)
    claims = await verify(session, mtls, user[1]["access_token"])
    assert (claims["user_name"], claims["cid"], claims["grant_type"]) == (
        "alice",
        client_id,
        JWT_BEARER,
    )
    assert claims["iss"] == mtls.issuer  # the issuer is the zone's, not the cert endpoint's
    claims = await verify(session, mtls, tech[1]["access_token"])
    assert (claims["sub"], claims["grant_type"]) == (client_id, "client_credentials")
    assert mtls.token_requests == {JWT_BEARER: 1, "client_credentials": 1}
    subject = x509.load_pem_x509_certificate(cert[0].encode()).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == mtls.cpi_cert_cn


async def test_the_certificate_endpoint_shares_faults_with_the_secret_one(
    ca: DevCA, tmp_path: Path, mtls: EmulatedXsuaa
) -> None:
    cert = mtls.issue_cpi_client_cert(ca)
    mtls.token_fault = "status:429"
    form = {"grant_type": "client_credentials", "client_id": mtls.cpi.client_id}
    status, _ = await post_cert_token(ca, tmp_path, mtls, cert, form)
    assert (status, mtls.token_requests["client_credentials"]) == (429, 1)


@pytest.mark.parametrize("presented", ["none", "foreign CA"])
async def test_the_certificate_endpoint_refuses_the_handshake(
    ca: DevCA, tmp_path: Path, mtls: EmulatedXsuaa, presented: str
) -> None:
    mtls.issue_cpi_client_cert(ca)
    foreign = make_dev_ca()
    # The right CN, even the same CA name, but not signed by the CA the endpoint trusts.
    cert = ca.issue_client_cert(mtls.cpi_cert_cn, ca=foreign) if presented != "none" else None
    form = {"grant_type": "client_credentials", "client_id": mtls.cpi.client_id}
    # TLS 1.3: the client finishes first and learns of the refusal as a reset or alert; either
    # way aiohttp reports a connection error (ClientOSError, ClientConnectorError, ...).
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_cert_token(ca, tmp_path, mtls, cert, form)
    assert mtls.token_requests == {}


@pytest.mark.parametrize(
    ("cn", "client_id", "description"),
    [
        (None, "sb-cpitexxsappname!t4711", "client_id does not match the certificate"),
        (None, None, "client_id does not match the certificate"),
        ("someone-else", None, "Unknown client certificate"),
    ],
)
async def test_the_certificate_must_match_a_client_and_the_client_id(
    ca: DevCA,
    tmp_path: Path,
    mtls: EmulatedXsuaa,
    cn: str | None,
    client_id: str | None,
    description: str,
) -> None:
    cert = mtls.issue_cpi_client_cert(ca) if cn is None else ca.issue_client_cert(cn)
    form = {"grant_type": "client_credentials"}
    if client_id is not None:
        form["client_id"] = client_id
    elif cn is not None:
        form["client_id"] = mtls.cpi.client_id
    status, body = await post_cert_token(ca, tmp_path, mtls, cert, form)
    assert (status, body) == (401, {"error": "invalid_client", "error_description": description})
    assert mtls.token_requests == {}


# --- iFlow runtime ----------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_iflow_requires_a_bearer_token(
    session: aiohttp.ClientSession, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    async with session.post(f"{url}/http/orders", data=b"x") as r:
        assert (r.status, r.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert runtime.requests == []


async def test_iflow_rejects_the_frontend_token_as_wrong_audience(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    _, url = cpi
    async with session.get(f"{url}/http/orders", headers=bearer(xsuaa.mint_user_token())) as r:
        assert r.status == 401


async def test_iflow_forbids_a_user_without_the_cpi_role(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    _, url = cpi
    token = await exchange(session, xsuaa, "bob", "FrontendOnly")
    async with session.get(f"{url}/http/orders", headers=bearer(token)) as r:
        assert (r.status, await r.text()) == (403, "Forbidden: user lacks role cpitex.Read")


async def test_iflow_echoes_for_a_user_with_the_cpi_role(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    headers = {
        **bearer(await exchange(session, xsuaa, "alice", "CpiTexUser")),
        "Content-Type": "application/xml",
        "x-correlationid": "c-1",
    }
    async with session.put(f"{url}/http/orders/7?a=1&b=%20", data=b"<o/>", headers=headers) as r:
        body = await r.read()
    assert (r.status, body, r.content_type) == (200, b"<o/>", "application/xml")
    assert {k: r.headers[k] for k in ("x-cpi-subject", "x-cpi-grant", "x-cpi-path")} == {
        "x-cpi-subject": "alice",
        "x-cpi-grant": JWT_BEARER,
        "x-cpi-path": "/http/orders/7?a=1&b=%20",
    }
    assert (r.headers["x-correlationid"], r.content_length) == ("c-1", 4)
    [seen] = runtime.requests
    assert (seen.method, seen.subject, seen.headers["x-correlationid"]) == ("PUT", "alice", "c-1")


async def test_iflow_accepts_client_credentials_tokens(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    _, url = cpi
    _, body = await post_token(session, xsuaa, xsuaa.cpi, {"grant_type": "client_credentials"})
    async with session.get(f"{url}/http/ping", headers=bearer(body["access_token"])) as r:
        assert (r.status, r.headers["x-cpi-subject"]) == (200, xsuaa.cpi.client_id)


async def test_iflow_emu_endpoints(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    _, url = cpi
    auth = bearer(await exchange(session, xsuaa, "alice", "CpiTexUser"))
    payload = bytes(range(256)) * 1000

    async with session.get(f"{url}/http/_emu/download?bytes=200000", headers=auth) as r:
        downloaded = await r.read()
    async with session.post(f"{url}/http/_emu/sink", data=payload, headers=auth) as r:
        sunk = await r.json()
    async with session.get(f"{url}/http/_emu/gzip", headers=auth, auto_decompress=False) as r:
        compressed = (r.headers["Content-Encoding"], await r.read())
    async with session.get(f"{url}/http/_emu/headers", headers={**auth, "X-A": "1"}) as r:
        seen = await r.json()
    async with session.delete(f"{url}/http/_emu/status/418", headers=auth) as r:
        teapot = (r.status, await r.json())

    assert (len(downloaded), downloaded[:3], downloaded[256:258]) == (200000, b"\0\1\2", b"\0\1")
    assert sunk == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert (compressed[0], gzip.decompress(compressed[1])) == ("gzip", GZIP_PLAINTEXT)
    assert seen["x-a"] == ["1"]
    assert teapot == (418, {"status": 418})


async def test_iflow_stream_gates_interlock_with_the_test(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    auth = bearer(await exchange(session, xsuaa, "alice", "CpiTexUser"))
    more = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 10
        await more.wait()  # only continues once the runtime saw the first chunk
        yield b"b" * 5

    upload = asyncio.ensure_future(
        session.post(f"{url}/http/_emu/upload-gate", data=body(), headers=auth)
    )
    await runtime.first_chunk_received.wait()
    more.set()
    async with await upload as r:
        assert await r.json() == {"bytes": 15}

    async with session.get(f"{url}/http/_emu/download-gate", headers=auth) as r:
        assert await r.content.readline() == b"first\n"
        runtime.download_continue.set()
        assert await r.content.read() == b"second\n"


async def test_iflow_hang_is_released_on_demand(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    auth = bearer(await exchange(session, xsuaa, "alice", "CpiTexUser"))
    request = asyncio.ensure_future(session.get(f"{url}/http/_emu/hang", headers=auth))
    await runtime.hangs.wait_for(1)
    runtime.release_hangs()
    async with await request as r:
        assert r.status == 503


# --- iFlow runtime: CSRF protection -----------------------------------------------------------


async def fetch_csrf(
    session: aiohttp.ClientSession, url: str, token: str, *, method: str = "GET"
) -> tuple[str, str]:
    """The CSRF token and the Cookie header value a client sends back with it."""
    headers = {**bearer(token), "X-CSRF-Token": "fetch"}
    async with session.request(method, f"{url}/http/orders", headers=headers) as r:
        assert (r.status, await r.read()) == (200, b"")
        return r.headers["X-CSRF-Token"], "; ".join(
            f"{name}={morsel.value}" for name, morsel in r.cookies.items()
        )


async def post_with(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    extra: dict[str, str],
    path: str = "orders",
) -> tuple[int, str, str | None]:
    headers = {**bearer(token), **extra}
    async with session.post(f"{url}/http/{path}", data=b"<o/>", headers=headers) as r:
        return r.status, await r.text(), r.headers.get("X-CSRF-Token")


REJECTED = (403, "CSRF token validation failed", "Required")


async def test_csrf_fetch_opens_a_session_without_running_the_iflow(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    runtime.csrf_protected = True
    alice = await exchange(session, xsuaa, "alice", "CpiTexUser")
    headers = {**bearer(alice), "X-CSRF-Token": "Fetch"}
    async with session.get(f"{url}/http/orders", headers=headers) as r:
        fetched = (r.status, await r.read())
        cookies, csrf = r.headers.getall("Set-Cookie"), r.headers["X-CSRF-Token"]
    head_token, _ = await fetch_csrf(session, url, alice, method="HEAD")
    async with session.get(f"{url}/http/_emu/status/202", headers=bearer(alice)) as r:
        plain_get = r.status  # GET without the Fetch header runs the iFlow

    assert (fetched, plain_get) == ((200, b""), 202)
    session_id = cookies[0].removeprefix("JSESSIONID=").partition(";")[0]
    assert cookies[0] == f"JSESSIONID={session_id}; Path=/; Secure; HttpOnly"
    assert cookies[1].startswith("__VCAP_ID__=") and session_id
    assert len({csrf, head_token, "Fetch"}) == 3
    assert runtime.csrf_fetches == 2
    assert [(q.method, q.csrf) for q in runtime.requests] == [
        ("GET", "fetch"),
        ("HEAD", "fetch"),
        ("GET", ""),
    ]


async def test_csrf_protected_post_needs_token_and_session(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    runtime.csrf_protected = True
    alice = await exchange(session, xsuaa, "alice", "CpiTexUser")
    csrf, cookie = await fetch_csrf(session, url, alice)
    other_csrf, other_cookie = await fetch_csrf(session, url, alice)

    without = await post_with(session, url, alice, {})
    token_only = await post_with(session, url, alice, {"X-CSRF-Token": csrf})
    crossed = await post_with(session, url, alice, {"X-CSRF-Token": csrf, "Cookie": other_cookie})
    accepted = await post_with(session, url, alice, {"X-CSRF-Token": csrf, "Cookie": cookie})
    also = await post_with(
        session, url, alice, {"X-CSRF-Token": other_csrf, "Cookie": other_cookie}
    )

    assert without == token_only == crossed == REJECTED
    assert accepted == also == (200, "<o/>", None)
    assert runtime.csrf_rejections == 3
    seen = runtime.requests[-2]
    assert (seen.csrf, seen.headers["X-CSRF-Token"], seen.headers["Cookie"]) == (
        "accepted",
        csrf,
        cookie,
    )
    assert [q.csrf for q in runtime.requests[2:]] == ["rejected"] * 3 + ["accepted"] * 2


async def test_csrf_session_of_one_user_does_not_serve_another(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    runtime.csrf_protected = True
    alice = await exchange(session, xsuaa, "alice", "CpiTexUser")
    bob = await exchange(session, xsuaa, "bob", "CpiTexUser")
    csrf, cookie = await fetch_csrf(session, url, alice)
    assert await post_with(session, url, bob, {"X-CSRF-Token": csrf, "Cookie": cookie}) == REJECTED
    assert (runtime.requests[-1].subject, runtime.requests[-1].csrf) == ("bob", "rejected")


async def test_expired_csrf_sessions_need_a_new_fetch(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    runtime.csrf_protected = True
    alice = await exchange(session, xsuaa, "alice", "CpiTexUser")
    csrf, cookie = await fetch_csrf(session, url, alice)
    runtime.expire_csrf_sessions()
    stale = await post_with(session, url, alice, {"X-CSRF-Token": csrf, "Cookie": cookie})
    csrf, cookie = await fetch_csrf(session, url, alice)
    fresh = await post_with(session, url, alice, {"X-CSRF-Token": csrf, "Cookie": cookie})
    assert (stale, fresh[0]) == (REJECTED, 200)


async def test_csrf_paths_protect_only_their_prefixes(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    runtime.csrf_paths = ("/http/csrf/",)
    alice = await exchange(session, xsuaa, "alice", "CpiTexUser")
    fetch = {**bearer(alice), "X-CSRF-Token": "Fetch"}
    async with session.get(f"{url}/http/csrf/orders", headers=fetch) as r:
        csrf, protected_fetch = r.headers.get("X-CSRF-Token"), await r.read()
        cookie = f"JSESSIONID={r.cookies['JSESSIONID'].value}"
    async with session.get(f"{url}/http/_emu/headers", headers=fetch) as r:
        unprotected_fetch = (
            r.status,
            "X-CSRF-Token" in r.headers,
            (await r.json())["x-csrf-token"],
        )

    assert (csrf is not None, protected_fetch) == (True, b"")
    assert unprotected_fetch == (200, False, ["Fetch"])  # the iFlow ran; no session was opened
    assert await post_with(session, url, alice, {}, path="csrf/orders") == REJECTED
    assert (await post_with(session, url, alice, {}, path="orders"))[0] == 200
    ok = await post_with(
        session, url, alice, {"X-CSRF-Token": str(csrf), "Cookie": cookie}, path="csrf/orders"
    )
    assert ok[0] == 200
    assert [q.csrf for q in runtime.requests] == ["fetch", "", "rejected", "", "accepted"]
    assert (runtime.csrf_fetches, runtime.csrf_rejections) == (1, 1)


# --- iFlow runtime: revoked tokens ------------------------------------------------------------


async def get_status(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, str]:
    async with session.get(f"{url}/http/ping", headers=bearer(token)) as r:
        return r.status, await r.text()


async def test_a_revoked_token_is_refused_and_a_fresh_one_accepted(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    first = await exchange(session, xsuaa, "alice", "CpiTexUser")
    assert (await get_status(session, url, first))[0] == 200
    assert cpi_token_of(runtime.requests[-1]) == first

    runtime.revoke(first)
    async with session.get(f"{url}/http/ping", headers=bearer(first)) as r:
        refused = (r.status, r.headers["WWW-Authenticate"], await r.text())
    second = await exchange(session, xsuaa, "alice", "CpiTexUser")

    assert refused == (401, "Bearer", "Unauthorized: token revoked")
    assert (await get_status(session, url, second))[0] == 200
    assert (runtime.revoked_hits, len(runtime.requests)) == (1, 2)


async def test_revoking_a_subject_spares_later_tokens_and_other_subjects(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    alice = await exchange(session, xsuaa, "alice", "CpiTexUser")
    unseen = await exchange(session, xsuaa, "alice", "CpiTexUser")  # never reached CPI
    bob = await exchange(session, xsuaa, "bob", "CpiTexUser")
    assert (await get_status(session, url, alice))[0] == 200

    runtime.revoke_subject_tokens("alice")
    later = await exchange(session, xsuaa, "alice", "CpiTexUser")  # most likely the same second

    assert await get_status(session, url, alice) == (401, "Unauthorized: token revoked")
    assert (await get_status(session, url, unseen))[0] == 401
    assert [(await get_status(session, url, t))[0] for t in (later, bob)] == [200, 200]
    assert runtime.revoked_hits == 2


async def test_revoking_a_subject_refuses_tokens_of_earlier_seconds(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, cpi: tuple[EmulatedIflowRuntime, str]
) -> None:
    runtime, url = cpi
    issued = jwt.decode(
        await exchange(session, xsuaa, "alice", "CpiTexUser"), options={"verify_signature": False}
    )["iat"]
    # A CPI token XSUAA no longer remembers issuing: dated well before the revocation.
    old = xsuaa.mint_user_token(
        client=xsuaa.cpi, claims={"grant_type": JWT_BEARER, "iat": issued - 60}
    )
    assert (await get_status(session, url, old))[0] == 200
    runtime.revoke_subject_tokens("alice")
    assert (await get_status(session, url, old))[0] == 401

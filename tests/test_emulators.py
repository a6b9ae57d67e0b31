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
from pytest_aiohttp import AiohttpServer

from proxy.dev import (
    GZIP_PLAINTEXT,
    JWT_BEARER,
    DevCA,
    EmulatedIflowRuntime,
    EmulatedXsuaa,
    OAuthClient,
    cached_rsa_key,
    load_cpi_params,
    make_dev_ca,
)


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return make_dev_ca()


@pytest.fixture
async def session(ca: DevCA) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with aiohttp.ClientSession(connector=connector) as s:
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
    path = ca.write_ca(tmp_path)
    assert path.read_bytes() == ca.ca_pem
    ssl.create_default_context(cafile=str(path))  # loads as a trust store


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

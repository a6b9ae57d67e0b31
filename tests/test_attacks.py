"""The attack list from SECURITY.md: each case is refused, and refused without side effects."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_aiohttp.plugin import AiohttpServer

from proxy.dev import EmulatedXsuaa, cached_rsa_key
from proxy.state import PIPELINE
from tests.conftest import Iflow, MakeProxy, bearer, until

Client = TestClient[web.Request, web.Application]


def b64(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def status_of(proxy: Client, headers: dict[str, str], path: str = "/cpi/echo") -> int:
    async with proxy.get(path, headers=headers) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
async def attacker(aiohttp_server: AiohttpServer) -> tuple[str, list[str]]:
    """A server the attacker controls; any request reaching it is a failure."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), hits


@pytest.mark.parametrize(
    "alg", ["none", "None", "NONE", "nOnE", "HS256", "HS512", "ES256", "PS256"]
)
async def test_algorithms_other_than_rs_are_refused(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow, alg: str
) -> None:
    claims = jwt.decode(xsuaa.mint_user_token(), options={"verify_signature": False})
    token = f"{b64({'alg': alg, 'kid': 'key-1', 'typ': 'JWT'})}.{b64(claims)}.{b64(b'sig')}"
    assert await status_of(proxy, bearer(token)) == 401
    assert iflow.runtime.requests == []


@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_key_urls_in_the_token_are_never_fetched(
    proxy: Client, xsuaa: EmulatedXsuaa, attacker: tuple[str, list[str]], header: str
) -> None:
    url, hits = attacker
    foreign = cached_rsa_key("attacker")
    token = xsuaa.mint_user_token(key=foreign, header={header: f"{url}/keys", "kid": "evil"})
    assert await status_of(proxy, bearer(token)) == 401
    assert hits == []


async def test_embedded_keys_are_ignored(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    """A token carrying its own key (jwk / x5c) is checked against XSUAA's key all the same."""
    foreign: rsa.RSAPrivateKey = cached_rsa_key("attacker")
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(foreign.public_key()))
    for extra in ({"jwk": public}, {"x5c": ["MIIBIjANBgkq"]}):
        token = xsuaa.mint_user_token(key=foreign, header=extra)
        assert await status_of(proxy, bearer(token)) == 401


@pytest.mark.parametrize(
    "kid", ["../../etc/passwd", "' OR '1'='1", "key-1\x00", "%2e%2e/", "a" * 300]
)
async def test_hostile_kids_are_refused_without_fetch_floods(
    proxy: Client, xsuaa: EmulatedXsuaa, kid: str
) -> None:
    assert await status_of(proxy, bearer(xsuaa.mint_user_token())) == 200
    fetches = xsuaa.key_fetches
    for _ in range(20):
        assert await status_of(proxy, bearer(xsuaa.mint_user_token(header={"kid": kid}))) == 401
    assert xsuaa.key_fetches == fetches  # inside the 30 s window: no fetch at all


async def test_a_flood_of_random_kids_costs_at_most_one_fetch_per_interval(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    proxy = await make_proxy(keys_min_refresh=3600)
    assert await status_of(proxy, bearer(xsuaa.mint_user_token())) == 200
    fetches = xsuaa.key_fetches
    statuses = await asyncio.gather(
        *(
            status_of(proxy, bearer(xsuaa.mint_user_token(header={"kid": f"r{i}"})))
            for i in range(100)
        )
    )
    assert set(statuses) == {401}
    assert xsuaa.key_fetches == fetches


@pytest.mark.parametrize(
    "claims",
    [
        {"zid": None},
        {"aud": ["cpitexxsappname!t4711evil"], "cid": "x"},
        {"aud": ["evil.cpitexxsappname!t4711"], "cid": "x"},
        {"aud": [], "scope": ["evil.read"], "cid": "x"},
        {"exp": None},
        {"exp": "tomorrow"},
    ],
)
async def test_claim_tricks_are_refused(
    proxy: Client, xsuaa: EmulatedXsuaa, claims: dict[str, Any]
) -> None:
    assert await status_of(proxy, bearer(xsuaa.mint_user_token(claims=claims))) == 401


@pytest.mark.parametrize("leaving", ["mid-upload", "mid-download"])
async def test_clients_leaving_mid_stream_leave_no_connections_or_tasks_behind(
    proxy: Client, xsuaa: EmulatedXsuaa, leaving: str
) -> None:
    token = xsuaa.mint_user_token()
    async with proxy.post("/cpi/echo", data=b"warm", headers=bearer(token)) as resp:
        assert resp.status == 200
    pool = proxy.app[PIPELINE].pool
    baseline = len(asyncio.all_tasks())
    for _ in range(5):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        if leaving == "mid-upload":  # a body over the replay limit streams to CPI as it comes
            head = b"POST /cpi/_emu/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n"
            writer.write(head + b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
            writer.write(bytes(4 * 1024 * 1024))
            await writer.drain()
            await until(lambda: pool.open_connections > pool.idle_connections)  # under way
        else:
            writer.write(
                b"GET /cpi/_emu/download?bytes=67108864 HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readexactly(1024 * 1024)
        writer.transport.abort()  # gone, without a goodbye
    await until(lambda: pool.open_connections == pool.idle_connections)  # none left busy
    await until(lambda: len(asyncio.all_tasks()) <= baseline)
    async with proxy.post("/cpi/echo", data=b"after", headers=bearer(token)) as resp:
        assert (resp.status, await resp.read()) == (200, b"after")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b.c",
        "!!!.???.###",
        f"{b64([1, 2])}.{b64({})}.x",
        f"{b64({'alg': 'RS256'})}.e30",
        "a.b.c.d.e",
    ],
)
async def test_malformed_tokens_are_401(proxy: Client, token: str) -> None:
    assert await status_of(proxy, {"Authorization": f"Bearer {token}"}) == 401


async def test_oversized_token_is_refused_before_any_key_fetch(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.keys_fault = "hang"  # any fetch would hang the request
    proxy = await make_proxy()
    big = xsuaa.mint_user_token(claims={"padding": "x" * 20_000})
    async with asyncio.timeout(5):
        assert await status_of(proxy, bearer(big)) == 401


async def test_token_in_the_query_string_is_not_accepted(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    token = xsuaa.mint_user_token()
    for query in (f"access_token={token}", f"token={token}"):
        async with proxy.get(f"/cpi/echo?{query}") as resp:
            assert resp.status == 401
    assert iflow.runtime.requests == []


async def test_two_authorization_headers_are_refused(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    token = xsuaa.mint_user_token()
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    async with proxy.get("/cpi/echo", headers=headers) as resp:
        assert resp.status == 401


async def raw_request(proxy: Client, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(65536)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "shape",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # CL.TE
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",  # TE.TE
        b"Content-Length: 5\r\nContent-Length: 6\r\n",  # conflicting lengths
        b"X-Folded: a\r\n b\r\n",  # obs-fold
        b"X-Bad: a\rb\r\n",  # bare CR
    ],
)
async def test_request_smuggling_shapes_are_rejected(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow, shape: bytes
) -> None:
    token = xsuaa.mint_user_token().encode()
    request = (
        b"POST /cpi/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n"
        + shape + b"\r\n0\r\n\r\n"
    )  # fmt: skip
    answer = await raw_request(proxy, request)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert iflow.runtime.requests == []


async def test_faults_leave_no_connections_or_tasks_behind(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    token = bearer(xsuaa.mint_user_token())
    async with proxy.get("/cpi/echo", headers=token) as resp:
        assert resp.status == 200
    baseline = len(asyncio.all_tasks())
    for path in ("/cpi/_emu/truncated", "/cpi/_emu/truncated?chunked", "/cpi/_emu/status/500"):
        async with proxy.get(path, headers=token) as resp:
            with contextlib.suppress(aiohttp.ClientPayloadError):  # the truncation is the point
                await resp.read()
    xsuaa.token_fault = "reset"
    async with proxy.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token("other"))) as resp:
        assert resp.status == 503
    pool = proxy.app[PIPELINE].pool
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) <= baseline
    assert pool.open_connections == pool.idle_connections  # none left busy


@pytest.mark.parametrize(
    "token",
    [
        b64(b"[" * 3000) + ".e30.x",  # nesting deep enough to exhaust the JSON parser
        b64({"alg": "RS256", "kid": "key-1", "jku": "https://["}) + ".e30.x",  # unparsable URL
        b64({"alg": "RS256", "kid": "key-1", "jku": "https://a\uff03b/"}) + ".e30.x",
    ],
)
async def test_pathological_tokens_are_401_not_500(proxy: Client, token: str) -> None:
    """Found by tests/test_fuzz.py: each of these once raised past the validator."""
    assert await status_of(proxy, {"Authorization": f"Bearer {token}"}) == 401


async def test_raw_non_ascii_bytes_in_the_token_are_401(proxy: Client) -> None:
    header = b64({"alg": "RS256", "kid": "key-1"}).encode()
    request = b"GET /cpi/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + header
    answer = await raw_request(proxy, request + b".\xff.x\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 401 Unauthorized")


@pytest.mark.parametrize(
    "claims", [{"aud": 5}, {"aud": {"sb-cpitexxsappname!t4711": 1}}, {"exp": 10**400}]
)
async def test_mistyped_signed_claims_are_401(
    proxy: Client, xsuaa: EmulatedXsuaa, claims: dict[str, Any]
) -> None:
    token = xsuaa.mint_user_token(claims={**claims, "cid": "someone-else"})
    assert await status_of(proxy, bearer(token)) == 401


async def test_a_route_group_cannot_climb_into_another_routes_prefix(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    routes = {
        "routes": [
            {"name": "admin", "source": "^/admin/(.*)$", "target": "/http/admin/$1",
             "scope": "$XSAPPNAME.admin"},
            {"name": "orders", "source": "^/orders(.*)$", "target": "/http/orders/$1"},
        ]
    }  # fmt: skip
    proxy = await make_proxy(routes=routes)
    for path in ("/orders../admin/x", "/orders..", "/orders./x"):
        assert await status_of(proxy, bearer(xsuaa.mint_user_token()), path) == 400
    assert iflow.runtime.requests == []

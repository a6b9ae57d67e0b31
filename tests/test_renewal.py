"""CPI refusing a cached token (revoked, rotated, roles changed): renew once, replay, no stampede.
And the technical-user token is refreshed before it expires, in the background."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpServer

from proxy.bindings import JWT_BEARER
from proxy.dev import EmulatedXsuaa
from proxy.dev.iflow import cpi_token_of
from proxy.state import PIPELINE
from tests.conftest import Iflow, MakeProxy, bearer, until

Client = TestClient[web.Request, web.Application]


def jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def warm(proxy: Client, token: str, iflow: Iflow) -> str:
    """One successful call; returns the CPI token the proxy now holds for this user."""
    async with proxy.post("/cpi/echo", data=b"warm", headers=bearer(token)) as resp:
        assert resp.status == 200
    return cpi_token_of(iflow.runtime.requests[-1])


async def test_revoked_cached_token_is_renewed_and_the_request_replayed(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    token = xsuaa.mint_user_token()
    iflow.runtime.revoke(await warm(proxy, token, iflow))
    async with proxy.post("/cpi/echo", data=b"again", headers=bearer(token)) as resp:
        assert (resp.status, await resp.read()) == (200, b"again")
    assert xsuaa.token_requests[JWT_BEARER] == 2
    assert iflow.runtime.revoked_hits == 1


async def test_unreplayable_body_gets_a_401_hint_and_the_next_call_works(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    token = xsuaa.mint_user_token()
    iflow.runtime.revoke(await warm(proxy, token, iflow))

    async def chunked() -> AsyncIterator[bytes]:
        yield b"streamed body"

    async with proxy.post("/cpi/echo", data=chunked(), headers=bearer(token)) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"] == "cpi_unauthorized"
    assert "retry" in body["error_description"]
    async with proxy.post("/cpi/echo", data=chunked(), headers=bearer(token)) as resp:
        assert (resp.status, await resp.read()) == (200, b"streamed body")
    assert xsuaa.token_requests[JWT_BEARER] == 2


async def test_large_body_is_not_buffered_for_replay(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    proxy = await make_proxy(replay_limit=8)
    token = xsuaa.mint_user_token()
    iflow.runtime.revoke(await warm(proxy, token, iflow))
    async with proxy.post("/cpi/echo", data=b"nine byte", headers=bearer(token)) as resp:
        assert resp.status == 401
    async with proxy.post("/cpi/echo", data=b"eight by", headers=bearer(token)) as resp:
        assert resp.status == 200


async def test_concurrent_refusals_cause_one_re_exchange(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    token = xsuaa.mint_user_token()
    iflow.runtime.revoke(await warm(proxy, token, iflow))
    xsuaa.token_gate = asyncio.Event()
    calls = [
        asyncio.ensure_future(proxy.post("/cpi/echo", data=b"%d" % i, headers=bearer(token)))
        for i in range(20)
    ]
    await xsuaa.wait_parked(1)
    await until(lambda: proxy.app[PIPELINE].exchanger.waiting == 20)
    xsuaa.token_gate.set()
    responses = await asyncio.gather(*calls)
    assert [(r.status, await r.read()) for r in responses] == [(200, b"%d" % i) for i in range(20)]
    for r in responses:
        r.release()
    assert xsuaa.token_requests[JWT_BEARER] == 2
    assert iflow.runtime.revoked_hits == 20


@pytest.fixture
async def refusing_cpi(aiohttp_server: AiohttpServer) -> str:
    """A runtime that refuses every token: a fresh token's 401 must not loop."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, text="Unauthorized")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_refusal_of_a_fresh_token_is_final(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, refusing_cpi: str
) -> None:
    proxy = await make_proxy(cpi_url=refusing_cpi)
    async with proxy.post("/cpi/echo", data=b"x", headers=bearer(xsuaa.mint_user_token())) as r:
        assert r.status == 401
        body = await r.json()
    assert body["error"] == "cpi_unauthorized"
    assert "just issued" in body["error_description"]
    assert xsuaa.token_requests[JWT_BEARER] == 1


async def test_technical_token_is_refreshed_before_it_expires(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    xsuaa.token_validity = 3  # cached for 3 - 1 s; refreshed at 75 % of that, 1.5 s in
    proxy = await make_proxy(token_margin=1)
    user = bearer(xsuaa.mint_user_token())
    async with proxy.get("/tech/echo", headers=user) as resp:
        assert resp.status == 200
    first = cpi_token_of(iflow.runtime.requests[-1])
    await until(lambda: xsuaa.token_requests["client_credentials"] == 2)
    async with proxy.get("/tech/echo", headers=user) as resp:
        assert resp.status == 200
    assert xsuaa.token_requests["client_credentials"] == 2  # the request did not wait for one
    assert jti(cpi_token_of(iflow.runtime.requests[-1])) != jti(first)


async def test_failed_background_refresh_keeps_the_current_token(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    xsuaa.token_validity = 3
    proxy = await make_proxy(token_margin=1)
    user = bearer(xsuaa.mint_user_token())
    async with proxy.get("/tech/echo", headers=user) as resp:
        assert resp.status == 200
    xsuaa.token_fault = "unavailable"
    await until(lambda: xsuaa.token_requests["client_credentials"] == 2)
    xsuaa.token_fault = None
    async with proxy.get("/tech/echo", headers=user) as resp:
        assert resp.status == 200  # still served by the first token


async def test_refresh_timer_is_cancelled_on_shutdown(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    proxy = await make_proxy()
    async with proxy.get("/tech/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 200
    exchanger = proxy.app[PIPELINE].exchanger
    await proxy.close()
    assert exchanger._refresh is None or exchanger._refresh.cancelled()

"""CSRF-protected iFlows: apps call them unchanged; the proxy holds each user's CSRF session."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpServer

from proxy.dev import EmulatedXsuaa
from proxy.state import PIPELINE
from tests.conftest import Iflow, MakeProxy, bearer

Client = TestClient[web.Request, web.Application]


def routes(csrf: Any) -> dict[str, Any]:
    return {"routes": [{"source": "^/cpi/(.*)$", "target": "/http/$1", "csrf": csrf}]}


@pytest.fixture
def protected(iflow: Iflow) -> Iflow:
    iflow.runtime.csrf_protected = True
    return iflow


async def post(proxy: Client, token: str, body: bytes = b"payload") -> tuple[int, bytes]:
    async with proxy.post("/cpi/echo", data=body, headers=bearer(token)) as resp:
        return resp.status, await resp.read()


def trail(iflow: Iflow, since: int = 0) -> list[str]:
    return [r.csrf for r in iflow.runtime.requests[since:]]


async def test_auto_fetches_on_required_replays_and_then_costs_one_call(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes("auto"))
    token = xsuaa.mint_user_token()
    assert await post(proxy, token, b"first") == (200, b"first")
    assert trail(protected) == ["rejected", "fetch", "accepted"]
    seen = len(protected.runtime.requests)
    for i in range(5):
        assert await post(proxy, token, b"%d" % i) == (200, b"%d" % i)
    assert trail(protected, seen) == ["accepted"] * 5  # warm: one CPI request per call


async def test_true_fetches_before_the_first_modifying_request(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes(True))
    token = xsuaa.mint_user_token()
    assert await post(proxy, token) == (200, b"payload")
    assert await post(proxy, token) == (200, b"payload")
    assert trail(protected) == ["fetch", "accepted", "accepted"]


async def test_false_never_fetches_and_passes_cpis_403(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes(False))
    async with proxy.post("/cpi/echo", data=b"x", headers=bearer(xsuaa.mint_user_token())) as r:
        assert (r.status, r.headers["X-CSRF-Token"]) == (403, "Required")
        body = await r.json()
    assert (body["cause"], body["cpi_status"]) == ("csrf", 403)
    assert body["cpi_body"] == "CSRF token validation failed"
    assert trail(protected) == ["rejected"]


async def test_reads_need_no_csrf_token(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes(True))
    async with proxy.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 200
    assert trail(protected) == [""]


async def test_stale_token_is_refetched_once(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes("auto"))
    token = xsuaa.mint_user_token()
    await post(proxy, token)
    protected.runtime.expire_csrf_sessions()
    seen = len(protected.runtime.requests)
    assert await post(proxy, token, b"after") == (200, b"after")
    assert trail(protected, seen) == ["rejected", "fetch", "accepted"]


async def test_a_token_refused_again_after_refetch_returns_the_403(
    make_proxy: MakeProxy,
    xsuaa: EmulatedXsuaa,
    aiohttp_server: AiohttpServer,
) -> None:
    calls: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append(request.method)
        if request.method == "GET":
            return web.Response(headers={"X-CSRF-Token": "t", "Set-Cookie": "JSESSIONID=s"})
        return web.Response(status=403, text="no", headers={"X-CSRF-Token": "Required"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    proxy = await make_proxy(routes=routes(True), cpi_url=str(server.make_url("")).rstrip("/"))
    assert (await post(proxy, xsuaa.mint_user_token()))[0] == 403
    assert calls == ["GET", "POST", "GET", "POST"]


async def test_unreplayable_body_gets_csrf_required_and_the_retry_works(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes("auto"))
    token = xsuaa.mint_user_token()

    async def chunked() -> AsyncIterator[bytes]:
        yield b"streamed"

    async with proxy.post("/cpi/echo", data=chunked(), headers=bearer(token)) as resp:
        assert resp.status == 403
        body = await resp.json()
    assert body["error"] == "csrf_required"
    assert '"csrf": true' in body["error_description"]
    async with proxy.post("/cpi/echo", data=chunked(), headers=bearer(token)) as resp:
        assert (resp.status, await resp.read()) == (200, b"streamed")


async def test_bodies_are_held_for_replay_only_within_the_replay_budget(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes("auto"), replay_budget=10)
    forwarder = proxy.app[PIPELINE].forwarder
    token = xsuaa.mint_user_token()
    # 11 bytes do not fit the budget of 10: streamed, so CPI's demand for a token cannot be met
    # by re-sending; the client hears why, and its retry (a token is now cached) succeeds.
    status, body = await post(proxy, token, b"eleven byte")
    assert status == 403 and b"replay budget" in body
    assert await post(proxy, token, b"eleven byte") == (200, b"eleven byte")
    other = xsuaa.mint_user_token("other")
    assert await post(proxy, other, b"ten bytes!") == (200, b"ten bytes!")  # fits: replayed
    assert trail(protected)[-3:] == ["rejected", "fetch", "accepted"]
    assert forwarder.budget.free == 10  # every byte given back


async def test_client_cookies_and_csrf_token_never_reach_cpi(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    proxy = await make_proxy(routes=routes(True))
    headers = {
        **bearer(xsuaa.mint_user_token()),
        "Cookie": "JSESSIONID=attacker",
        "X-CSRF-Token": "attacker",
    }
    async with proxy.post("/cpi/echo", data=b"x", headers=headers) as resp:
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers
    accepted = protected.runtime.requests[-1]
    assert "attacker" not in accepted.headers["Cookie"]
    assert accepted.headers["X-CSRF-Token"] != "attacker"


async def test_each_user_keeps_their_own_csrf_session_under_concurrency(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, protected: Iflow
) -> None:
    """The runtime binds each session to its user: any mix-up would be a 403."""
    proxy = await make_proxy(routes=routes("auto"))
    users = [f"user{i}" for i in range(20)]
    tokens = {u: xsuaa.mint_user_token(u) for u in users}
    calls = [u for u in users for _ in range(4)]
    random.Random(3).shuffle(calls)
    results = await asyncio.gather(*(post(proxy, tokens[u], u.encode()) for u in calls))
    assert results == [(200, u.encode()) for u in calls]
    assert protected.runtime.csrf_fetches == len(users)
    by_session: dict[str, set[str]] = {}
    for record in protected.runtime.requests:
        if record.csrf == "accepted":
            by_session.setdefault(record.headers["Cookie"], set()).add(record.subject)
    assert all(len(subjects) == 1 for subjects in by_session.values())
    assert len(by_session) == len(users)

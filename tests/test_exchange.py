"""The jwt-bearer exchange and its cache: one exchange per user token, never a mix-up."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpServer

from proxy.auth import Claims, token_hash
from proxy.bindings import JWT_BEARER, load_bindings
from proxy.dev import EmulatedXsuaa
from proxy.errors import ExchangeUnavailable
from proxy.exchange import TokenExchanger
from proxy.state import PIPELINE
from tests.conftest import FakeClock, Iflow, MakeProxy, bearer, until

Client = TestClient[web.Request, web.Application]


async def post(
    proxy: Client, token: str, body: bytes = b"x", path: str = "/cpi/echo"
) -> tuple[int, bytes, str]:
    async with proxy.post(path, data=body, headers=bearer(token)) as resp:
        return resp.status, await resp.read(), resp.headers.get("x-cpi-subject", "")


async def error_of(proxy: Client, token: str) -> tuple[int, dict[str, str]]:
    async with proxy.post("/cpi/echo", data=b"x", headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def test_sequential_requests_exchange_once(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    token = xsuaa.mint_user_token()
    for _ in range(10):
        assert (await post(proxy, token))[0] == 200
    assert xsuaa.token_requests[JWT_BEARER] == 1


async def test_concurrent_cold_requests_share_one_exchange(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token()
    await post(proxy, xsuaa.mint_user_token("warm-keys"))  # keys loaded; not the subject here
    xsuaa.token_gate = asyncio.Event()
    exchanger = proxy.app[PIPELINE].exchanger
    connector = aiohttp.TCPConnector(limit=0)  # the default pool of 100 would serialise them
    async with aiohttp.ClientSession(base_url=proxy.make_url(""), connector=connector) as client:

        async def call(i: int) -> tuple[int, bytes]:
            async with client.post("/cpi/echo", data=b"%d" % i, headers=bearer(token)) as resp:
                return resp.status, await resp.read()

        requests = [asyncio.ensure_future(call(i)) for i in range(200)]
        await xsuaa.wait_parked(1)
        await until(lambda: exchanger.waiting == 200)
        xsuaa.token_gate.set()
        results = await asyncio.gather(*requests)
    assert results == [(200, b"%d" % i) for i in range(200)]
    assert xsuaa.token_requests[JWT_BEARER] == 2  # warm-keys user + this one


async def test_interleaved_users_each_get_their_own_identity(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    users = [f"user{i}" for i in range(40)]
    tokens = {u: xsuaa.mint_user_token(u) for u in users}
    calls = [u for u in users for _ in range(5)]
    random.Random(7).shuffle(calls)
    results = await asyncio.gather(*(post(proxy, tokens[u], u.encode()) for u in calls))
    assert [(status, body.decode(), subject) for status, body, subject in results] == [
        (200, u, u) for u in calls
    ]
    assert xsuaa.token_requests[JWT_BEARER] == len(users)


async def test_failed_exchange_is_not_cached(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    token = xsuaa.mint_user_token()
    xsuaa.token_fault = "unavailable"
    status, body = await error_of(proxy, token)
    assert (status, body["error"]) == (503, "token_exchange_unavailable")
    xsuaa.token_fault = None
    assert (await post(proxy, token))[0] == 200
    assert xsuaa.token_requests[JWT_BEARER] == 3  # the failed exchange tried twice


@pytest.mark.parametrize(
    ("fault", "status", "error", "words"),
    [
        ("unavailable", 503, "token_exchange_unavailable", "XSUAA answered 503"),
        ("status:429", 503, "token_exchange_unavailable", "XSUAA answered 429"),
        ("garbage", 502, "token_exchange_failed", "not JSON"),
        ("reset", 503, "token_exchange_unavailable", "cannot reach XSUAA"),
        ("status:400", 502, "token_exchange_failed", "XSUAA answered 400"),
    ],
)
async def test_token_endpoint_faults_are_clear_5xx(
    proxy: Client,
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    fault: str,
    status: int,
    error: str,
    words: str,
) -> None:
    xsuaa.token_fault = fault
    got_status, body = await error_of(proxy, xsuaa.mint_user_token())
    assert (got_status, body["error"]) == (status, error)
    assert words in body["error_description"]
    assert iflow.runtime.requests == []


async def test_slow_token_endpoint_is_504(make_proxy: MakeProxy, xsuaa: EmulatedXsuaa) -> None:
    proxy = await make_proxy(exchange_timeout=0.3)
    await post(proxy, xsuaa.mint_user_token("warm-keys"))
    xsuaa.token_fault = "hang"
    status, body = await error_of(proxy, xsuaa.mint_user_token())
    assert (status, body["error"]) == (504, "token_exchange_timeout")
    assert "within 0.3 s" in body["error_description"]


async def test_unreachable_token_endpoint_is_503(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, unused_tcp_port: int
) -> None:
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["tokenurl"] = (
        f"https://localhost:{unused_tcp_port}/oauth/token"
    )
    proxy = await make_proxy(vcap=vcap)
    status, body = await error_of(proxy, xsuaa.mint_user_token())
    assert (status, body["error"]) == (503, "token_exchange_unavailable")


async def test_wrong_client_secret_is_502_with_a_hint(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["clientsecret"] = "wrong"
    proxy = await make_proxy(vcap=vcap)
    status, body = await error_of(proxy, xsuaa.mint_user_token())
    assert (status, body["error"]) == (502, "token_exchange_failed")
    assert "401 invalid_client" in body["error_description"]
    assert "clientsecret" in body["error_description"]
    assert "wrong" not in json.dumps(body)


async def test_user_without_uaa_user_gets_the_uaa_user_hint(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token("nouaa", role_collections=("NoUaaUser",))
    status, body = await error_of(proxy, token)
    assert (status, body["error"]) == (502, "token_exchange_failed")
    assert "uaa.user" in body["error_description"]


async def test_user_without_the_cpi_role_gets_cpis_403(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    token = xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",))
    status, _, _ = await post(proxy, token)
    assert status == 403
    assert xsuaa.token_requests[JWT_BEARER] == 1


async def test_client_credentials_route_shares_one_technical_token(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    for user in ("alice", "bob", "carol"):
        status, _, subject = await post(proxy, xsuaa.mint_user_token(user), path="/tech/echo")
        assert (status, subject) == (200, xsuaa.cpi.client_id)
    assert xsuaa.token_requests == {"client_credentials": 1}
    assert {r.grant_type for r in iflow.runtime.requests} == {"client_credentials"}


# --- the exchanger on its own, with a clock the test controls -------------------------------


def exchanger_for(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow, clock: FakeClock
) -> TokenExchanger:
    binding = load_bindings({"VCAP_SERVICES": json.dumps(xsuaa.vcap_services(iflow.url))}).cpi
    return TokenExchanger(session, binding, cache_size=100, margin=60, clock=clock)


def claims_for(token: str, expires_in: float) -> Claims:
    return Claims(
        token_hash=token_hash(token),
        subject="alice",
        scopes=frozenset(),
        zone_id="z",
        client_id="c",
        expires_at=time.time() + expires_in,
    )


async def test_cached_token_expires_with_its_own_lifetime_minus_margin(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    clock = FakeClock()
    exchanger = exchanger_for(session, xsuaa, iflow, clock)
    xsuaa.token_validity = 600
    token = xsuaa.mint_user_token()
    claims = claims_for(token, 3600)
    first = await exchanger.for_user(claims, token)
    clock.advance(539)
    assert await exchanger.for_user(claims, token) is first
    clock.advance(2)  # 541 s: inside the 60 s safety margin of the 600 s token
    assert await exchanger.for_user(claims, token) is not first
    assert xsuaa.token_requests[JWT_BEARER] == 2


async def test_cached_token_never_outlives_the_user_token(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    clock = FakeClock()
    exchanger = exchanger_for(session, xsuaa, iflow, clock)
    token = xsuaa.mint_user_token(expires_in=3600)
    claims = claims_for(token, 100)  # the proxy believes the user token ends in 100 s
    await exchanger.for_user(claims, token)
    clock.advance(101)
    await exchanger.for_user(claims, token)
    assert xsuaa.token_requests[JWT_BEARER] == 2


async def test_a_cancelled_waiter_does_not_cancel_the_others(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    exchanger = exchanger_for(session, xsuaa, iflow, FakeClock())
    token = xsuaa.mint_user_token()
    claims = claims_for(token, 3600)
    xsuaa.token_gate = asyncio.Event()
    leaving = asyncio.ensure_future(exchanger.for_user(claims, token))
    staying = asyncio.ensure_future(exchanger.for_user(claims, token))
    await xsuaa.wait_parked(1)
    leaving.cancel()
    xsuaa.token_gate.set()
    assert (await staying).access_token
    assert leaving.cancelled()
    assert xsuaa.token_requests[JWT_BEARER] == 1


async def test_failure_reaches_every_waiter_and_is_forgotten(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    exchanger = exchanger_for(session, xsuaa, iflow, FakeClock())
    token = xsuaa.mint_user_token()
    claims = claims_for(token, 3600)
    xsuaa.token_fault = "unavailable"
    results = await asyncio.gather(
        *(exchanger.for_user(claims, token) for _ in range(5)), return_exceptions=True
    )
    assert [type(r) for r in results] == [ExchangeUnavailable] * 5
    assert xsuaa.token_requests[JWT_BEARER] == 2  # one flight: its request and one retry
    xsuaa.token_fault = None
    assert (await exchanger.for_user(claims, token)).access_token
    assert exchanger.cached == 1


async def test_xsuaa_rate_limit_passes_its_retry_after_on(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, aiohttp_server: AiohttpServer
) -> None:
    async def busy(request: web.Request) -> web.Response:
        body = {"error": "too_many_requests", "error_description": "slow down"}
        return web.json_response(body, status=429, headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_post("/oauth/token", busy)
    server = await aiohttp_server(app)
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["tokenurl"] = str(server.make_url("/oauth/token"))
    proxy = await make_proxy(vcap=vcap)
    async with proxy.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (503, "7")
        assert "429" in (await resp.json())["error_description"]

"""The token request's one retry: only for failures that may pass, once per shared flight,
after a random pause, and always within the exchange timeout."""

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

from proxy.bindings import JWT_BEARER, load_bindings
from proxy.dev import EmulatedXsuaa
from proxy.exchange import RETRY_MIN_TIME, RETRY_PAUSE, TokenExchanger, retry_pause
from proxy.state import METRICS, PIPELINE
from tests.conftest import FakeClock, Iflow, MakeProxy, bearer, until
from tests.test_exchange import claims_for
from tests.test_ops import metric

Client = TestClient[web.Request, web.Application]


async def call(proxy: Client, token: str, path: str = "/cpi/echo") -> tuple[int, bytes]:
    async with proxy.post(path, data=b"x", headers=bearer(token)) as resp:
        return resp.status, await resp.read()


async def error_of(proxy: Client, token: str) -> tuple[int, str]:
    async with proxy.post("/cpi/echo", data=b"x", headers=bearer(token)) as resp:
        return resp.status, (await resp.json())["error"]


class RecordingRandom(random.Random):
    """Draws the pause the test chooses and records what the exchanger asked for."""

    def __init__(self, pause: float) -> None:
        super().__init__(0)
        self.pause = pause
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return self.pause


def exchanger_for(
    session: aiohttp.ClientSession,
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    rng: random.Random,
    timeout: float = 10.0,
) -> TokenExchanger:
    binding = load_bindings({"VCAP_SERVICES": json.dumps(xsuaa.vcap_services(iflow.url))}).cpi
    return TokenExchanger(
        session, binding, cache_size=100, timeout=timeout, clock=FakeClock(), rng=rng
    )


# --- what is retried ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["reset", "unavailable", "status:502", "status:504"])
async def test_one_transient_failure_is_retried_once_and_the_caller_never_sees_it(
    proxy: Client, xsuaa: EmulatedXsuaa, fault: str
) -> None:
    xsuaa.token_faults.append(fault)
    assert await call(proxy, xsuaa.mint_user_token()) == (200, b"x")
    assert xsuaa.token_requests[JWT_BEARER] == 2
    text = (await (await proxy.get("/metrics")).read()).decode()
    assert metric(text, "cpi_proxy_token_exchange_retries_total", grant="jwt-bearer") == 1
    outcome = {"grant": "jwt-bearer", "outcome": "success"}
    assert metric(text, "cpi_proxy_token_exchanges_total", **outcome) == 1


async def test_connections_reset_before_any_answer_are_tried_twice_then_503(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    """A listener that drops every connection at once counts the attempts."""
    attempts = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.transport.abort()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["tokenurl"] = f"https://localhost:{port}/oauth/token"
    proxy = await make_proxy(vcap=vcap)
    try:
        assert await error_of(proxy, xsuaa.mint_user_token()) == (
            503,
            "token_exchange_unavailable",
        )
    finally:
        server.close()
        await server.wait_closed()
    assert attempts == 2


async def test_a_refused_connection_is_retried_once_then_503(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, unused_tcp_port: int
) -> None:
    """Nothing listens, so nothing counts the attempts: the retry counter does."""
    vcap = xsuaa.vcap_services(iflow.url)
    tokenurl = f"https://localhost:{unused_tcp_port}/oauth/token"
    vcap["it-rt"][0]["credentials"]["oauth"]["tokenurl"] = tokenurl
    proxy = await make_proxy(vcap=vcap)
    assert await error_of(proxy, xsuaa.mint_user_token()) == (503, "token_exchange_unavailable")
    text = proxy.app[METRICS].render().decode()
    assert metric(text, "cpi_proxy_token_exchange_retries_total", grant="jwt-bearer") == 1


async def test_persistent_503_is_tried_twice_then_answered_503(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    xsuaa.token_fault = "unavailable"
    async with proxy.post("/cpi/echo", data=b"x", headers=bearer(xsuaa.mint_user_token())) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (503, "token_exchange_unavailable")
    assert "XSUAA answered 503" in body["error_description"]
    assert xsuaa.token_requests[JWT_BEARER] == 2
    assert iflow.runtime.requests == []


async def test_client_credentials_requests_are_retried_too(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.token_faults.append("reset")
    assert await call(proxy, xsuaa.mint_user_token(), "/tech/echo") == (200, b"x")
    assert xsuaa.token_requests["client_credentials"] == 2


# --- what is not ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [
        ("status:429", 503, "token_exchange_unavailable"),  # XSUAA asks us to slow down
        ("status:400", 502, "token_exchange_failed"),
        ("status:403", 502, "token_exchange_failed"),
        ("status:500", 503, "token_exchange_unavailable"),  # a bug at XSUAA, not a blip
        ("garbage", 502, "token_exchange_failed"),  # a wrong tokenurl answers the same again
    ],
)
async def test_refusals_and_garbage_are_final_after_one_request(
    proxy: Client, xsuaa: EmulatedXsuaa, fault: str, status: int, error: str
) -> None:
    xsuaa.token_fault = fault
    assert await error_of(proxy, xsuaa.mint_user_token()) == (status, error)
    assert xsuaa.token_posts == 1


async def test_invalid_client_is_final_after_one_request(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["clientsecret"] = "wrong"
    proxy = await make_proxy(vcap=vcap)
    assert await error_of(proxy, xsuaa.mint_user_token()) == (502, "token_exchange_failed")
    assert xsuaa.token_posts == 1


async def test_a_refused_assertion_is_final_after_one_request(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token(expires_in=-30)  # inside our leeway, expired for XSUAA
    assert await error_of(proxy, token) == (401, "invalid_token")
    assert xsuaa.token_posts == 1


@pytest.mark.parametrize(("status", "pacing"), [(429, "7"), (503, "30")])
async def test_an_answer_with_retry_after_is_final_and_its_pace_reaches_the_caller(
    make_proxy: MakeProxy,
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    aiohttp_server: AiohttpServer,
    status: int,
    pacing: str,
) -> None:
    attempts = 0

    async def busy(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        body = {"error": "too_many_requests", "error_description": "slow down"}
        return web.json_response(body, status=status, headers={"Retry-After": pacing})

    app = web.Application()
    app.router.add_post("/oauth/token", busy)
    server = await aiohttp_server(app)
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["tokenurl"] = str(server.make_url("/oauth/token"))
    proxy = await make_proxy(vcap=vcap)
    async with proxy.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (503, pacing)
    assert attempts == 1


async def test_a_timeout_spends_the_budget_and_is_not_retried(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    proxy = await make_proxy(exchange_timeout=0.3)
    xsuaa.token_fault = "hang"
    assert await error_of(proxy, xsuaa.mint_user_token()) == (504, "token_exchange_timeout")
    assert xsuaa.token_posts == 1


async def test_the_retry_stays_within_the_exchange_timeout(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    """The first request is reset, the retry hangs: the 504 comes when the whole exchange's
    budget ends, not one timeout per request later."""
    timeout = 1.0
    proxy = await make_proxy(exchange_timeout=timeout)
    xsuaa.token_faults.extend(["reset", "hang"])
    started = time.monotonic()
    assert await error_of(proxy, xsuaa.mint_user_token()) == (504, "token_exchange_timeout")
    elapsed = time.monotonic() - started
    assert xsuaa.token_posts == 2
    assert timeout * 0.9 <= elapsed < timeout + 0.5


# --- one retry per flight, after a random pause ------------------------------------------------


async def test_concurrent_callers_share_one_flight_and_its_one_retry(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token()
    await call(proxy, xsuaa.mint_user_token("warm-keys"))  # keys loaded; not the subject here
    exchanger = proxy.app[PIPELINE].exchanger
    xsuaa.token_gate = asyncio.Event()
    xsuaa.token_faults.append("reset")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url=proxy.make_url(""), connector=connector) as client:

        async def one(i: int) -> tuple[int, bytes]:
            async with client.post("/cpi/echo", data=b"%d" % i, headers=bearer(token)) as resp:
                return resp.status, await resp.read()

        callers = [asyncio.ensure_future(one(i)) for i in range(50)]
        await xsuaa.wait_parked(1)
        await until(lambda: exchanger.waiting == 50)
        xsuaa.token_gate.set()  # the parked request is reset now; its flight retries once
        results = await asyncio.gather(*callers)
    assert results == [(200, b"%d" % i) for i in range(50)]
    assert xsuaa.token_requests[JWT_BEARER] == 1 + 2  # warm-keys, then this user's two
    text = proxy.app[METRICS].render().decode()
    assert metric(text, "cpi_proxy_token_exchange_retries_total", grant="jwt-bearer") == 1


async def test_the_pause_comes_from_the_random_source_once_per_flight(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    rng = RecordingRandom(pause=RETRY_PAUSE[0])
    exchanger = exchanger_for(session, xsuaa, iflow, rng)
    token = xsuaa.mint_user_token()
    claims = claims_for(token, 3600)
    xsuaa.token_faults.append("unavailable")
    started = time.monotonic()
    tokens = await asyncio.gather(*(exchanger.for_user(claims, token) for _ in range(10)))
    assert len({t.access_token for t in tokens}) == 1
    assert time.monotonic() - started >= RETRY_PAUSE[0]
    assert rng.asked == [RETRY_PAUSE]
    assert xsuaa.token_requests[JWT_BEARER] == 2


async def test_no_retry_when_the_budget_cannot_hold_one(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    """A timeout shorter than the pause plus RETRY_MIN_TIME: the first failure is the answer."""
    rng = RecordingRandom(pause=RETRY_PAUSE[1])
    exchanger = exchanger_for(session, xsuaa, iflow, rng, timeout=RETRY_MIN_TIME)
    token = xsuaa.mint_user_token()
    xsuaa.token_faults.append("unavailable")
    with pytest.raises(Exception, match="XSUAA answered 503"):
        await exchanger.for_user(claims_for(token, 3600), token)
    assert xsuaa.token_requests[JWT_BEARER] == 1


def test_the_pause_is_random_within_its_bounds() -> None:
    rng = random.Random(6)
    pauses = [retry_pause(rng, remaining=10.0) for _ in range(2000)]
    drawn = [p for p in pauses if p is not None]
    assert len(drawn) == 2000
    low, high = RETRY_PAUSE
    assert all(low <= p <= high for p in drawn)
    assert min(drawn) < low + 0.01 and max(drawn) > high - 0.01  # spread over the range
    assert len(set(drawn)) == 2000


def test_the_pause_never_reaches_past_the_budget() -> None:
    rng = random.Random(6)
    low, high = RETRY_PAUSE
    assert retry_pause(rng, remaining=high + RETRY_MIN_TIME) is not None
    assert retry_pause(rng, remaining=low + RETRY_MIN_TIME - 0.001) is None
    assert retry_pause(rng, remaining=0.0) is None
    for _ in range(1000):
        remaining = rng.uniform(0, 2)
        pause = retry_pause(rng, remaining)
        assert pause is None or pause + RETRY_MIN_TIME <= remaining

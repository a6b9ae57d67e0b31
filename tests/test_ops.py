"""Operating it: metrics, readiness, JSON request logs, cpiRole, CPI refusal hints, debug page."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient, AiohttpServer

from proxy.app import create_app
from proxy.bindings import load_bindings
from proxy.dev import EmulatedXsuaa
from proxy.errors import ConfigError
from proxy.logs import configure
from proxy.metrics import Metrics
from proxy.ops import AccessLogger
from proxy.routes import parse_routes
from proxy.settings import Settings
from tests.conftest import ROUTES, Iflow, MakeProxy, bearer

Client = TestClient[web.Request, web.Application]

ROLE_ROUTE = {
    "name": "role",
    "source": "^/role/(.*)$",
    "target": "/http/$1",
    "cpiRole": "cpitex.Read",
}
WITH_ROLE = {"routes": [ROLE_ROUTE, *ROUTES["routes"]]}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, sample_labels = sample.partition("{")
        got = ",".join(sorted(sample_labels.rstrip("}").split(","))) if sample_labels else ""
        if sample_name == name and got == wanted:
            return float(value)
    return 0.0


async def scrape(client: Client) -> str:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_metrics_count_requests_exchanges_cache_and_bytes(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    token = bearer(xsuaa.mint_user_token("alice"))
    for _ in range(3):
        async with proxy.post("/cpi/echo", data=b"12345", headers=token) as resp:
            assert resp.status == 200
    async with proxy.get("/nowhere/x", headers=token) as resp:
        assert resp.status == 404
    text = await scrape(proxy)
    assert (
        metric(text, "cpi_proxy_requests_total", route="cpi", method="POST", status_class="2xx")
        == 3
    )
    assert (
        metric(text, "cpi_proxy_requests_total", route="-", method="GET", status_class="4xx") == 1
    )
    assert (
        metric(text, "cpi_proxy_token_exchanges_total", grant="jwt-bearer", outcome="success") == 1
    )
    assert metric(text, "cpi_proxy_token_cache_lookups_total", result="miss") == 1
    assert metric(text, "cpi_proxy_token_cache_lookups_total", result="hit") == 2
    assert metric(text, "cpi_proxy_token_cache_size") == 1
    assert metric(text, "cpi_proxy_key_fetches_total", outcome="success") == 1
    assert metric(text, "cpi_proxy_upstream_bytes_total", direction="out") == 15
    assert metric(text, "cpi_proxy_upstream_bytes_total", direction="in") == 15
    assert metric(text, "cpi_proxy_request_duration_seconds_count", route="cpi") == 3
    assert metric(text, "cpi_proxy_upstream_duration_seconds_count", route="cpi") == 3
    assert metric(text, "cpi_proxy_requests_in_flight") == 1  # the scrape itself
    assert metric(text, "process_resident_memory_bytes") > 1024 * 1024
    assert metric(text, "process_open_fds") > 3
    assert "alice" not in text and "/cpi/echo" not in text and "nowhere" not in text


async def test_the_task_gauge_counts_the_tasks_alive_at_scrape_time() -> None:
    metrics = Metrics()

    def tasks() -> float:
        return metric(metrics.render().decode(), "cpi_proxy_asyncio_tasks")

    before = tasks()
    extra = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(3)]
    assert tasks() == before + 3
    for task in extra:
        task.cancel()
    await asyncio.gather(*extra, return_exceptions=True)
    assert tasks() == before


def test_metrics_render_outside_an_event_loop_without_the_task_gauge() -> None:
    text = Metrics().render().decode()
    assert "cpi_proxy_asyncio_tasks" not in text
    assert "cpi_proxy_requests_in_flight 0.0" in text


async def test_failed_exchanges_are_counted_by_error(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    xsuaa.token_fault = "unavailable"
    async with proxy.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 503
    text = await scrape(proxy)
    outcome = "token_exchange_unavailable"
    assert metric(text, "cpi_proxy_token_exchanges_total", grant="jwt-bearer", outcome=outcome) == 1


async def test_metrics_can_live_on_their_own_port(
    make_proxy: MakeProxy, unused_tcp_port: int
) -> None:
    proxy = await make_proxy(metrics_port=unused_tcp_port, host="127.0.0.1")
    async with proxy.get("/metrics") as resp:
        assert resp.status == 404  # not on the public port
    side = f"http://127.0.0.1:{unused_tcp_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(side) as resp:
        assert resp.status == 200
        assert "cpi_proxy_requests_in_flight" in await resp.text()


async def test_readyz_waits_for_keys(make_proxy: MakeProxy, xsuaa: EmulatedXsuaa) -> None:
    xsuaa.keys_fault = "unavailable"
    proxy = await make_proxy(keys_min_refresh=0.001)
    async with proxy.get("/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["error"] == "not_ready"
    assert "verification keys" in body["error_description"]
    async with proxy.get("/healthz") as resp:
        assert resp.status == 200  # alive all the same
    xsuaa.keys_fault = None
    async with proxy.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 200
    async with proxy.get("/readyz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "READY"})


async def test_operator_endpoints_answer_get_and_head_only(proxy: Client, iflow: Iflow) -> None:
    async with proxy.head("/healthz") as resp:
        assert resp.status == 200
    async with proxy.post("/healthz", data=b"x") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
        assert (await resp.json())["error"] == "method_not_allowed"
    async with proxy.get("/healthz/") as resp:  # not the endpoint: a path for the route table
        assert resp.status == 404
    assert iflow.runtime.requests == []


async def test_missing_cpi_role_is_403_before_cpi_is_called(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    proxy = await make_proxy(routes=WITH_ROLE)
    bob = bearer(xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",)))
    async with proxy.get("/role/echo", headers=bob) as resp:
        assert resp.status == 403
        body = await resp.json()
    assert body["error"] == "missing_cpi_role"
    assert body["error_description"] == (
        "user lacks CPI role cpitex.Read; add it to a role collection assigned to the user"
        " (CPI applies role changes within an hour)"
    )
    assert iflow.runtime.requests == []
    async with proxy.get("/role/echo", headers=bearer(xsuaa.mint_user_token("alice"))) as resp:
        assert resp.status == 200


async def test_cpis_403_gets_a_hint_and_keeps_cpis_status_and_body(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    bob = bearer(xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",)))
    async with proxy.post("/cpi/echo", data=b"x", headers=bob) as resp:
        assert resp.status == 403
        body = await resp.json()
    assert (body["error"], body["cause"], body["cpi_status"]) == ("cpi_forbidden", "role", 403)
    assert "cpitex.Read" in body["cpi_body"]
    assert "role collection" in body["error_description"]
    assert body["correlation_id"] == resp.headers["x-correlationid"]


async def test_debug_page_is_off_by_default(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    async with proxy.get("/_debug/tokens", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 404


async def test_debug_page_compares_claims_without_showing_tokens(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    proxy = await make_proxy(debug=True)
    token = xsuaa.mint_user_token("alice")
    async with proxy.get("/_debug/tokens") as resp:
        assert resp.status == 401
    async with proxy.get("/_debug/tokens", headers=bearer(token)) as resp:
        assert (resp.status, resp.content_type) == (200, "text/html")
        page = await resp.text()
    assert "alice" in page and "cpitex.Read" in page
    assert "urn:ietf:params:oauth:grant-type:jwt-bearer" in page
    assert token not in page and token.split(".")[2] not in page
    assert "eyJ" not in page  # no JWT segment of any token


async def test_debug_page_requires_the_debug_scope_when_set(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    proxy = await make_proxy(debug=True, debug_scope="$XSAPPNAME.debug")
    async with proxy.get("/_debug/tokens", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 403
        assert f"{xsuaa.frontend.xsappname}.debug" in (await resp.json())["error_description"]


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """JSON logs into a buffer, at DEBUG; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    vcap_app = {"application_name": "cpi-proxy-test", "space_name": "dev"}
    configure({"LOG_LEVEL": "DEBUG", "VCAP_APPLICATION": json.dumps(vcap_app)}, stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_request_log_is_json_in_saps_shape_and_free_of_secrets(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    ca_file: Any,
    captured_logs: io.StringIO,
) -> None:
    iflow.runtime.csrf_paths = ("/http/csrf/",)
    vcap = xsuaa.vcap_services(iflow.url)
    app = create_app(
        Settings(), load_bindings({"VCAP_SERVICES": json.dumps(vcap)}), parse_routes(ROUTES)
    )
    server = await aiohttp_server(app, access_log_class=AccessLogger)
    client: TestClient[web.Request, None] = await aiohttp_client(server)
    user_token = xsuaa.mint_user_token("alice")
    headers = {**bearer(user_token), "x-correlationid": "corr-1", "Cookie": "mine=secret-cookie"}
    async with client.post("/cpi/csrf/echo", data=b"x", headers=headers) as resp:
        assert resp.status == 200
    async with client.get("/cpi/echo", headers=bearer(xsuaa.mint_user_token(expires_in=-999))) as r:
        assert r.status == 401
    await client.close()
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    requests = [line for line in lines if line["type"] == "request"]
    first = requests[0]
    assert (first["method"], first["request"], first["status_code"]) == (
        "POST",
        "/cpi/csrf/echo",
        200,
    )
    assert (first["route"], first["correlation_id"]) == ("cpi", "corr-1")
    assert first["component_name"] == "cpi-proxy-test"
    assert len(first["user"]) == 16 and "alice" not in json.dumps(first)
    assert {"written_at", "level", "msg", "logger", "response_time_ms", "response_size_b"} <= set(
        first
    )
    text = captured_logs.getvalue()
    cpi_tokens = [r.headers["Authorization"].split()[1] for r in iflow.runtime.requests]
    cookies = [
        r.headers.get("Cookie", "") for r in iflow.runtime.requests if r.headers.get("Cookie")
    ]
    secrets = [
        user_token,
        *cpi_tokens,
        *(c.split("=", 1)[1].split(";")[0] for c in cookies),
        "secret-cookie",
        vcap["xsuaa"][0]["credentials"]["clientsecret"],
        vcap["it-rt"][0]["credentials"]["oauth"]["clientsecret"],
    ]
    assert cookies, "the CSRF session cookie must have been used"
    assert [s[:8] for s in secrets if s in text] == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "environ", "json_lines"),
    [
        (io.StringIO(), {}, True),
        (_Terminal(), {}, False),
        (_Terminal(), {"CPI_PROXY_LOG_FORMAT": "json"}, True),
        (io.StringIO(), {"CPI_PROXY_LOG_FORMAT": "text"}, False),
    ],
)
def test_logs_are_json_unless_a_person_is_watching(
    stream: io.StringIO, environ: dict[str, str], json_lines: bool
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure(environ, stream)
        logging.getLogger("proxy.test").warning("hello %s", "there")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = stream.getvalue().strip()
    if json_lines:
        assert json.loads(line)["msg"] == "hello there"
    else:
        assert line.endswith("proxy.test: hello there") and not line.startswith("{")


def test_bad_log_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="CPI_PROXY_LOG_FORMAT='xml' is not json or text"):
        configure({"CPI_PROXY_LOG_FORMAT": "xml"}, io.StringIO())
    with pytest.raises(ConfigError, match="LOG_LEVEL='LOUD'"):
        configure({"LOG_LEVEL": "loud"}, io.StringIO())


def test_lock_free_histograms_follow_prometheus_bucket_rules() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.0011, 100.0):  # on a bound, just above it, beyond the last
        metrics.observe("cpi", "POST", 200, seconds)
    metrics.observe("cpi", "BREW", 503, 0.5)
    text = metrics.render().decode()
    assert metric(text, "cpi_proxy_request_duration_seconds_bucket", route="cpi", le="0.001") == 1
    assert metric(text, "cpi_proxy_request_duration_seconds_bucket", route="cpi", le="0.0025") == 2
    assert metric(text, "cpi_proxy_request_duration_seconds_bucket", route="cpi", le="60.0") == 3
    assert metric(text, "cpi_proxy_request_duration_seconds_bucket", route="cpi", le="+Inf") == 4
    assert metric(text, "cpi_proxy_request_duration_seconds_count", route="cpi") == 4
    assert metric(text, "cpi_proxy_request_duration_seconds_sum", route="cpi") == 100.5021
    labels = {"route": "cpi", "method": "other", "status_class": "5xx"}
    assert metric(text, "cpi_proxy_requests_total", **labels) == 1

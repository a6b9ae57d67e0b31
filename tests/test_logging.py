"""Nothing secret ever reaches the log, at any level, on success or failure; a hostile client
cannot flood it with tracebacks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpClient

from proxy.app import create_app
from proxy.bindings import load_bindings
from proxy.dev import EmulatedXsuaa
from proxy.logs import ParseErrors, configure
from proxy.routes import parse_routes
from proxy.serve import start
from proxy.settings import Settings
from tests.conftest import ROUTES, Iflow, MakeProxy, bearer
from tests.test_limits import Conn


async def test_no_token_or_secret_in_logs_at_debug(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    vcap = xsuaa.vcap_services(iflow.url)
    good = await make_proxy()
    bad_secret = xsuaa.vcap_services(iflow.url)
    bad_secret["it-rt"][0]["credentials"]["oauth"]["clientsecret"] = "wrong-secret-value"
    broken = await make_proxy(vcap=bad_secret)
    tokens = [
        xsuaa.mint_user_token("alice"),
        xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",)),
        xsuaa.mint_user_token("nouaa", role_collections=("NoUaaUser",)),
        xsuaa.mint_user_token(header={"kid": "unknown"}),
        xsuaa.mint_user_token(expires_in=-3600),
    ]
    for client in (good, broken):
        for token in tokens:
            for path in ("/cpi/echo", "/tech/echo"):
                async with client.post(path, data=b"x", headers=bearer(token)) as resp:
                    await resp.read()
    cpi_tokens = [
        t for t in (r.headers.get("Authorization", "") for r in iflow.runtime.requests) if t
    ]
    assert cpi_tokens, "the flows above must have reached CPI"
    secrets = [
        *tokens,
        *(t.removeprefix("Bearer ") for t in cpi_tokens),
        vcap["xsuaa"][0]["credentials"]["clientsecret"],
        vcap["it-rt"][0]["credentials"]["oauth"]["clientsecret"],
        "wrong-secret-value",
    ]
    logged = caplog.text
    assert "token request" in logged  # the failures were logged ...
    leaked = [s[:12] for s in secrets if s in logged or s.split(".")[-1] in logged]
    assert leaked == []  # ... without a token, signature or secret


# --- request heads aiohttp's parser refuses: one INFO line each, no traceback -----------------

SECRET = "s3cr3t-" + "Q" * 40  # stands for a token in a head the parser refuses


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Logging set up by `logs.configure`, as `serve` runs it, into a buffer; restored after."""
    root, server = logging.getLogger(), logging.getLogger(ParseErrors.LOGGER)
    handlers, level, filters = root.handlers[:], root.level, server.filters[:]
    stream = io.StringIO()
    configure({"LOG_LEVEL": "INFO", "CPI_PROXY_LOG_FORMAT": "json"}, stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    server.filters[:] = filters


def lines(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines()]


@pytest.fixture
async def served_port(xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path) -> AsyncIterator[int]:
    """The proxy as `cpi-proxy serve` serves it (`proxy.serve.start`); its port."""
    settings = Settings(host="127.0.0.1", port=0)
    bindings = load_bindings({"VCAP_SERVICES": json.dumps(xsuaa.vcap_services(iflow.url))})
    runner, site = await start(create_app(settings, bindings, parse_routes(ROUTES)), settings)
    yield site.port
    await runner.cleanup()


@pytest.mark.parametrize(
    ("head", "logged"),
    [
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x01\r\n\r\n",
            "BadHttpMessage: Invalid header value char: '...'",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s"
            + b"Q" * (33 * 1024)
            + b"\r\n\r\n",
            "LineTooLong: Got more than 32768 bytes when reading: '...'.",
        ),
        (
            b"GET /healthz?%s HTTP/9.9\r\nHost: x\r\n\r\n",
            "BadStatusLine: Bad status line: Invalid HTTP version: '...'",
        ),
    ],
    ids=["malformed", "line-too-long", "bad-version"],
)
async def test_a_head_the_parser_refuses_is_one_info_line_without_a_traceback(
    served_port: int, json_log: io.StringIO, head: bytes, logged: str
) -> None:
    conn = Conn(*await asyncio.open_connection("127.0.0.1", served_port))
    await conn.send(head % SECRET.encode())
    assert b" 400 Bad Request" in await conn.until_closed()  # aiohttp logs before it answers
    conn.close()
    server_lines = [line for line in lines(json_log) if line["logger"] == "aiohttp.server"]
    assert [(line["level"], line["msg"]) for line in server_lines] == [
        ("INFO", f"bad request from 127.0.0.1: {logged}")
    ]
    loud = [line for line in lines(json_log) if "stacktrace" in line or line["level"] == "ERROR"]
    assert loud == []
    assert SECRET[:12] not in json_log.getvalue()


async def test_an_error_in_a_handler_still_logs_at_error_with_its_traceback(
    aiohttp_client: AiohttpClient, json_log: io.StringIO
) -> None:
    """The proxy's own `handle` catches everything and logs it on `proxy.app`; a handler that
    lets an exception out (here a bare aiohttp app's) is what aiohttp.server logs at ERROR."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a handler")

    app = web.Application()
    app.router.add_get("/", broken)
    client = await aiohttp_client(app)
    async with client.get("/") as resp:
        assert resp.status == 500
    [line] = [line for line in lines(json_log) if line["logger"] == "aiohttp.server"]
    assert (line["level"], line["msg"].startswith("Error handling request")) == ("ERROR", True)
    assert line["stacktrace"][-1] == "RuntimeError: a bug in a handler"

"""Shared fixtures. Every test starts from a clean environment (httpx's habit)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient, AiohttpServer

from proxy.app import create_app
from proxy.bindings import load_bindings
from proxy.dev import DevCA, EmulatedIflowRuntime, EmulatedXsuaa, make_dev_ca
from proxy.routes import load_routes, parse_routes
from proxy.settings import Settings
from proxy.tls import client_context

_OURS = ("VCAP_SERVICES", "VCAP_APPLICATION", "PORT", "LOG_LEVEL", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name in _OURS or name.startswith("CPI_PROXY_"):
            monkeypatch.delenv(name)


# --- the real counterparts on loopback: emulated XSUAA and iFlow runtime over HTTPS -----------

ROUTES: dict[str, Any] = {
    "routes": [
        {
            "name": "cpi",
            "source": "^/cpi/(.*)$",
            "target": "/http/$1",
            "scope": "$XSAPPNAME.texfrontendscope",
            "timeout": 5,
        },
        {
            "name": "technical",
            "source": "^/tech/(.*)$",
            "target": "/http/$1",
            "scope": "$XSAPPNAME.texfrontendscope",
            "grant": "client-credentials",
        },
        {"name": "read-only", "source": "^/ro/(.*)$", "target": "/http/$1", "methods": ["GET"]},
        {"name": "dots", "source": "^/dots(.*)$", "target": "/http/$1"},
        {
            "name": "admin",
            "source": "^/admin/(.*)$",
            "target": "/http/admin/$1",
            "scope": "$XSAPPNAME.admin",
        },
    ]
}


@pytest.fixture(scope="session")
def dev_ca() -> DevCA:
    return make_dev_ca()


@pytest.fixture
def ca_file(dev_ca: DevCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The proxy trusts the test CA the way a private landscape would: SSL_CERT_FILE."""
    path = dev_ca.write_ca(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return path


@pytest.fixture
async def xsuaa(aiohttp_server: AiohttpServer, dev_ca: DevCA) -> EmulatedXsuaa:
    emulator = EmulatedXsuaa()
    server = await aiohttp_server(emulator.app(), ssl=dev_ca.server_context())
    emulator.base_url = f"https://localhost:{server.port}"
    return emulator


@pytest.fixture
async def iflow(aiohttp_server: AiohttpServer, dev_ca: DevCA, xsuaa: EmulatedXsuaa) -> Iflow:
    runtime = EmulatedIflowRuntime(xsuaa)
    server = await aiohttp_server(runtime.app(), ssl=dev_ca.server_context())
    return Iflow(runtime, f"https://localhost:{server.port}")


@dataclass
class Iflow:
    runtime: EmulatedIflowRuntime
    url: str


MakeProxy = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def session(ca_file: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session trusting the test CA, like the proxy's own (for stage-level tests)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_context())
    ) as session:
        yield session


@pytest.fixture
def make_proxy(
    aiohttp_client: AiohttpClient, xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path
) -> MakeProxy:
    """A proxy bound to the emulators, with settings and routes overridable per test."""

    async def make(
        routes: dict[str, Any] | None = None,
        cpi_url: str | None = None,
        vcap: dict[str, Any] | None = None,
        routes_file: Path | None = None,
        live_reload: bool = False,
        **settings: Any,
    ) -> TestClient[web.Request, web.Application]:
        services = vcap or xsuaa.vcap_services(cpi_url or iflow.url)
        bindings = load_bindings({"VCAP_SERVICES": json.dumps(services)})
        table = load_routes(routes_file) if routes_file else parse_routes(routes or ROUTES)
        app = create_app(
            Settings(**settings),
            bindings,
            table,
            routes_file=routes_file,
            live_reload=live_reload,
        )
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> TestClient[web.Request, web.Application]:
    return await make_proxy()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class FakeClock:
    """A clock the test moves by hand, so expiry is tested without waiting."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait for a state the test cannot be notified of; fails (not hangs) after `within` s."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.001)

"""Live route reload and public routes: operators change mappings without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from proxy.dev import EmulatedXsuaa
from proxy.errors import ConfigError
from proxy.routes import parse_routes
from proxy.state import ROUTES
from tests.conftest import ROUTES as TEST_ROUTES
from tests.conftest import Iflow, MakeProxy, bearer, until


def route(name: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": f"^/{prefix}/(.*)$", "target": "/http/$1", **extra}


def write(path: Path, *routes: dict[str, Any], **top: Any) -> None:
    path.write_text(json.dumps({"routes": list(routes), **top}))


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.json"
    write(path, route("old", "old"))
    return path


async def test_sighup_reloads_the_route_file(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, routes_file: Path
) -> None:
    proxy = await make_proxy(routes_file=routes_file, live_reload=True, reload_interval=0)
    token = bearer(xsuaa.mint_user_token())
    async with proxy.get("/new/echo", headers=token) as resp:
        assert resp.status == 404
    write(routes_file, route("new", "new"))
    os.kill(os.getpid(), signal.SIGHUP)
    await until(lambda: proxy.app[ROUTES].table.routes[0].name == "new")
    async with proxy.get("/new/echo", headers=token) as resp:
        assert resp.status == 200
    async with proxy.get("/old/echo", headers=token) as resp:
        assert resp.status == 404


async def test_a_changed_file_is_picked_up_without_a_signal(
    make_proxy: MakeProxy, routes_file: Path
) -> None:
    proxy = await make_proxy(routes_file=routes_file, live_reload=True, reload_interval=0.02)
    write(routes_file, route("new", "new"), route("other", "other"))
    await until(lambda: len(proxy.app[ROUTES].table.routes) == 2)
    assert [r.name for r in proxy.app[ROUTES].table.routes] == ["new", "other"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"routes": [{"source": "^/x$", "target": "/api"}]}), "target must be"),
        (json.dumps({"routes": [route("x", "x")], "cpi": {"service": "other"}}), "restart"),
    ],
)
async def test_a_bad_file_is_rejected_and_the_old_table_stays(
    make_proxy: MakeProxy,
    xsuaa: EmulatedXsuaa,
    routes_file: Path,
    caplog: pytest.LogCaptureFixture,
    content: str,
    message: str,
) -> None:
    proxy = await make_proxy(routes_file=routes_file)
    state = proxy.app[ROUTES]
    before = state.table
    routes_file.write_text(content)
    assert state.reload() is False
    assert state.table is before
    assert message in caplog.text and "previous routes stay in force" in caplog.text
    async with proxy.get("/old/echo", headers=bearer(xsuaa.mint_user_token())) as resp:
        assert resp.status == 200


async def test_requests_in_flight_finish_on_the_table_they_started_with(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, routes_file: Path
) -> None:
    proxy = await make_proxy(routes_file=routes_file)
    token = bearer(xsuaa.mint_user_token())
    async with proxy.get("/old/_emu/download-gate", headers=token) as resp:
        assert await resp.content.readline() == b"first\n"
        write(routes_file, route("new", "new"))
        assert proxy.app[ROUTES].reload() is True
        iflow.runtime.download_continue.set()
        assert (resp.status, await resp.content.read()) == (200, b"second\n")
    async with proxy.get("/old/echo", headers=token) as resp:
        assert resp.status == 404


async def test_public_route_needs_no_token_and_is_logged_at_start(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, caplog: pytest.LogCaptureFixture
) -> None:
    public = route("public", "pub", grant="client-credentials", authenticationType="none")
    proxy = await make_proxy(routes={"routes": [public, *TEST_ROUTES["routes"]]})
    assert "route 'public' is public" in caplog.text
    async with proxy.post("/pub/echo", data=b"anyone") as resp:
        assert (resp.status, await resp.read()) == (200, b"anyone")
        assert resp.headers["x-cpi-subject"] == xsuaa.cpi.client_id
    async with proxy.post("/cpi/echo", data=b"x") as resp:  # others still need a token
        assert resp.status == 401


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"authenticationType": "none"}, 'needs grant "client-credentials" and no scope'),
        (
            {"authenticationType": "none", "grant": "client-credentials", "scope": "a.b"},
            'needs grant "client-credentials" and no scope',
        ),
        ({"authenticationType": "basic"}, 'authenticationType must be "xsuaa" or "none"'),
        ({"csrf": "sometimes"}, 'csrf must be "auto", true or false'),
    ],
)
def test_bad_new_route_keys_are_start_up_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes({"routes": [route("r", "r", **extra)]})
    assert message in str(info.value)


async def test_reload_signal_handler_is_removed_on_cleanup(
    make_proxy: MakeProxy, routes_file: Path
) -> None:
    proxy = await make_proxy(routes_file=routes_file, live_reload=True, reload_interval=0)
    await proxy.close()
    loop = asyncio.get_running_loop()
    assert loop.remove_signal_handler(signal.SIGHUP) is False

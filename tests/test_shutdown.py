"""SIGTERM (Cloud Foundry's stop): stop accepting, let in-flight requests finish, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.auth import Claims, token_hash
from proxy.bindings import load_bindings
from proxy.dev import EmulatedXsuaa
from proxy.exchange import TokenExchanger
from tests.conftest import ROUTES, Iflow, MakeProxy, bearer


async def wait_until_serving(url: str, process: asyncio.subprocess.Process) -> None:
    """Poll /healthz while the process starts (bounded: fails, never hangs)."""
    async with asyncio.timeout(30), aiohttp.ClientSession() as session:
        while True:
            assert process.returncode is None, "the proxy exited during start-up"
            try:
                async with session.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def serve(
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    tmp_path: Path,
    port: int,
    settings: dict[str, str],
    *,
    capture: bool = False,
) -> asyncio.subprocess.Process:
    """`cpi-proxy serve` in its own process, bound to the emulators. Its stdout is piped only
    when the test reads it afterwards (an unread pipe would fill and stall the proxy)."""
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(ROUTES))
    env = {
        **os.environ,
        "VCAP_SERVICES": json.dumps(xsuaa.vcap_services(iflow.url)),
        "CPI_PROXY_CONFIG": str(routes),
        "PORT": str(port),
        **settings,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1",
        env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_sigterm_lets_an_in_flight_stream_finish_and_exits_0(
    xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path, tmp_path: Path, unused_tcp_port: int
) -> None:
    process = await serve(
        xsuaa, iflow, tmp_path, unused_tcp_port, {"CPI_PROXY_SHUTDOWN_GRACE": "20"}
    )
    url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        await wait_until_serving(url, process)
        async with aiohttp.ClientSession() as session:
            headers = bearer(xsuaa.mint_user_token())
            async with session.get(f"{url}/cpi/_emu/download-gate", headers=headers) as resp:
                assert await resp.content.readline() == b"first\n"
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(10):  # new connections are refused meanwhile
                    while True:
                        try:
                            async with aiohttp.ClientSession() as other:
                                await other.get(f"{url}/healthz")
                        except aiohttp.ClientConnectionError:
                            break
                        await asyncio.sleep(0.05)
                iflow.runtime.download_continue.set()
                assert (resp.status, await resp.content.read()) == (200, b"second\n")
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_workers_share_the_port_and_stop_together(
    xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path, tmp_path: Path, unused_tcp_port: int
) -> None:
    settings = {"LOG_LEVEL": "INFO", "CPI_PROXY_LOG_FORMAT": "json", "CPI_PROXY_WORKERS": "2"}
    process = await serve(xsuaa, iflow, tmp_path, unused_tcp_port, settings, capture=True)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        await wait_until_serving(url, process)
        connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over workers
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with session.get(
                    f"{url}/cpi/echo", headers=bearer(xsuaa.mint_user_token())
                ) as r:
                    assert r.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert process.stdout is not None
        lines = [json.loads(line) for line in (await process.stdout.read()).splitlines()]
        starts = {line["msg"].split("pid ")[1] for line in lines if "Running on" in line["msg"]}
        assert len(starts) == 2  # two processes served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def proxy_tasks() -> list[asyncio.Task[Any]]:
    """Unfinished tasks running the proxy's own code (not the emulators', not the test's)."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        name = code.co_filename if code is not None else ""
        if not task.done() and "/proxy/" in name and "/proxy/dev/" not in name:
            found.append(task)
    return found


async def test_closing_the_app_stops_a_key_fetch_still_in_flight(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    """The start-up key fetch is shielded from its caller; closing must still end it, or it
    holds a connection to XSUAA past the app's life (CI saw it as an unclosed transport)."""
    xsuaa.keys_fault = "hang"
    proxy = await make_proxy()
    await xsuaa.hangs.wait_for(1)  # the warm-up fetch is at XSUAA now
    assert proxy_tasks()
    await proxy.close()
    assert proxy_tasks() == []


async def test_closing_the_exchanger_stops_a_flight_its_caller_left(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    binding = load_bindings({"VCAP_SERVICES": json.dumps(xsuaa.vcap_services(iflow.url))}).cpi
    exchanger = TokenExchanger(session, binding, cache_size=10, margin=60)
    token = xsuaa.mint_user_token()
    claims = Claims(
        token_hash=token_hash(token), subject="alice", scopes=frozenset(), zone_id="z",
        client_id="c", expires_at=time.time() + 600,
    )  # fmt: skip
    xsuaa.token_fault = "hang"
    caller = asyncio.ensure_future(exchanger.for_user(claims, token))
    await xsuaa.hangs.wait_for(1)
    caller.cancel()  # the flight outlives its only caller, by design
    await asyncio.gather(caller, return_exceptions=True)
    assert proxy_tasks()
    await exchanger.close()
    assert proxy_tasks() == []

"""`cpi-proxy dev`: the proxy plus an emulated XSUAA and iFlow runtime, all on loopback.

The emulators speak HTTPS with a throw-away CA, which the proxy trusts through SSL_CERT_FILE
exactly as a private landscape would; so dev mode exercises the same code as production.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import create_app
from proxy.bindings import load_bindings
from proxy.dev.ca import make_dev_ca
from proxy.dev.iflow import EmulatedIflowRuntime
from proxy.dev.xsuaa import DEFAULT_CPI_PARAMS, EmulatedXsuaa, load_cpi_params
from proxy.errors import ConfigError
from proxy.ops import AccessLogger
from proxy.routes import RouteTable, load_routes
from proxy.settings import Settings

CPI_PARAMS_FILE = Path("config-cpi.json")


async def serve_dev(
    settings: Settings, routes: RouteTable, params: Mapping[str, Any], stop: asyncio.Event
) -> None:
    ca = make_dev_ca()
    with tempfile.TemporaryDirectory(prefix="cpi-proxy-dev-") as tmp:
        os.environ["SSL_CERT_FILE"] = str(ca.write_ca(Path(tmp)))
        xsuaa = EmulatedXsuaa(cpi_params=params)
        iflow = EmulatedIflowRuntime(xsuaa)
        iflow.csrf_paths = ("/http/csrf/",)  # like an iFlow with "CSRF Protected" on
        runners: list[web.AppRunner] = []
        try:
            tls = ca.server_context()
            for emulator in (xsuaa, iflow):
                runner = web.AppRunner(emulator.app(), access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
                await site.start()
                runners.append(runner)
            xsuaa_port = runners[0].addresses[0][1]
            iflow_port = runners[1].addresses[0][1]
            xsuaa.base_url = f"https://localhost:{xsuaa_port}"
            cpi_url = f"https://localhost:{iflow_port}"
            bindings = load_bindings({"VCAP_SERVICES": json.dumps(xsuaa.vcap_services(cpi_url))})
            proxy = web.AppRunner(
                create_app(settings, bindings, routes), access_log_class=AccessLogger
            )
            await proxy.setup()
            runners.append(proxy)
            site = web.TCPSite(proxy, settings.host, settings.port)
            await site.start()
            port = proxy.addresses[0][1]
            _banner(xsuaa, f"http://{settings.host}:{port}", cpi_url)
            await stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


def _banner(xsuaa: EmulatedXsuaa, proxy_url: str, cpi_url: str) -> None:
    alice = xsuaa.mint_user_token("alice", role_collections=("CpiTexUser",))
    bob = xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",))
    curl = (
        f"curl -sS -H {shlex.quote('Authorization: Bearer ' + alice)}"
        f" -H 'Content-Type: text/plain' --data 'Hello, iFlow' {proxy_url}/cpi/cpitex"
    )
    print(
        f"cpi-proxy dev: proxy {proxy_url} -> emulated CPI runtime {cpi_url},"
        f" emulated XSUAA {xsuaa.base_url}\n"
        "\nUser token for alice (role collection CpiTexUser: may call the iFlow), valid 1 h:\n"
        f"{alice}\n"
        "\nUser token for bob (role collection FrontendOnly: lacks cpitex.Read, CPI answers 403):\n"
        f"{bob}\n"
        "\nTry the whole path (validate -> exchange -> forward -> echo):\n"
        f"{curl}\n"
        f"\nPaths under {proxy_url}/cpi/csrf/ are CSRF protected; the proxy fetches the token.\n",
        flush=True,
    )


def run_dev(settings: Settings) -> int:
    try:
        routes = load_routes(settings.routes_file)
    except ConfigError as exc:
        print(f"cpi-proxy: {exc}", file=sys.stderr)
        return 2
    params = load_cpi_params(CPI_PARAMS_FILE) if CPI_PARAMS_FILE.is_file() else DEFAULT_CPI_PARAMS

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_dev(settings, routes, params, stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        print(f"cpi-proxy: cannot listen on {where} ({exc.strerror})", file=sys.stderr)
        return 2
    return 0

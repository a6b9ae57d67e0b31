"""`cpi-proxy serve`: one process, or N with SO_REUSEPORT to use every core.

Each worker is a full proxy with its own caches, so a user token may be exchanged once per
worker (up to N times); the kernel spreads connections across workers. uvloop is used when
installed (`pip install 'cpi-proxy[fast]'`), unless CPI_PROXY_LOOP says otherwise.

`start` serves an app as `web.run_app` would (same keep-alive timeout, access log, handlers not
cancelled when a client leaves), but listens through `limits.LimitedSite`: a deadline and a size
cap for each request head and a cap on client connections, per process. Tests serve through it
too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from types import FrameType

from aiohttp import web

from proxy.app import create_app, request_handler
from proxy.bindings import Bindings
from proxy.errors import ConfigError
from proxy.limits import LimitedSite, fd_budget
from proxy.ops import AccessLogger
from proxy.routes import RouteTable
from proxy.settings import Settings
from proxy.state import METRICS

log = logging.getLogger(__name__)
KEEPALIVE_TIMEOUT = 75.0  # web.run_app's: idle keep-alive connections close after this


def new_loop(choice: str) -> asyncio.AbstractEventLoop:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(
                    "CPI_PROXY_LOOP=uvloop, but uvloop is not installed:"
                    " pip install 'cpi-proxy[fast]'"
                ) from None
        else:
            fast: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return fast
    return asyncio.new_event_loop()


async def start(
    app: web.Application, settings: Settings, *, reuse_port: bool = False
) -> tuple[web.AppRunner, LimitedSite]:
    """Serve `app` on settings.host:port; the caller stops it with `runner.cleanup()`, which
    stops accepting and gives requests in flight `shutdown_grace` seconds."""
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        shutdown_timeout=settings.shutdown_grace,
    )
    await runner.setup()
    assert runner.server is not None
    runner.server.request_handler = request_handler(app)  # past the router: see app.handle
    site = LimitedSite(
        runner,
        settings.host,
        settings.port,
        header_timeout=settings.header_timeout,
        max_clients=settings.max_clients,
        max_head_bytes=settings.max_head_bytes,
        metrics=app[METRICS],
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def _serve_until_stopped(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runner, site = await start(app, settings, reuse_port=reuse_port)
    try:
        log.info("Running on %s (pid %d, %s loop)", site.name, os.getpid(), type(loop).__module__)
        await stopping.wait()
    finally:
        await runner.cleanup()  # SIGTERM: in-flight requests may finish


def serve_one(
    settings: Settings, bindings: Bindings, routes: RouteTable, *, reuse_port: bool
) -> None:
    fd_budget(settings.max_clients, settings.max_connections)
    app = create_app(settings, bindings, routes, routes_file=settings.routes_file, live_reload=True)
    with asyncio.Runner(loop_factory=lambda: new_loop(settings.loop)) as runner:
        runner.run(_serve_until_stopped(app, settings, reuse_port))


def serve(settings: Settings, bindings: Bindings, routes: RouteTable) -> int:
    if settings.workers == 1:
        serve_one(settings, bindings, routes, reuse_port=False)
        return 0
    workers: list[int] = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve, then leave without running the parent's cleanup
            code = 0
            try:
                serve_one(settings, bindings, routes, reuse_port=True)
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        workers.append(pid)

    def relay(signum: int, _frame: FrameType | None) -> None:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, relay)
    failed = 0
    for worker in workers:
        _, status = os.waitpid(worker, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    return 1 if failed else 0

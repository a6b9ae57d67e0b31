"""`cpi-proxy serve`: one process, or N with SO_REUSEPORT to use every core.

Each worker is a full proxy with its own caches, so a user token may be exchanged once per
worker (up to N times); the kernel spreads connections across workers. uvloop is used when
installed (`pip install 'cpi-proxy[fast]'`), unless CPI_PROXY_LOOP says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from types import FrameType

from aiohttp import web

from proxy.app import create_app
from proxy.bindings import Bindings
from proxy.errors import ConfigError
from proxy.ops import AccessLogger
from proxy.routes import RouteTable
from proxy.settings import Settings

log = logging.getLogger(__name__)


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


def serve_one(
    settings: Settings, bindings: Bindings, routes: RouteTable, *, reuse_port: bool
) -> None:
    loop = new_loop(settings.loop)
    app = create_app(settings, bindings, routes, routes_file=settings.routes_file, live_reload=True)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port or None,
        loop=loop,
        access_log_class=AccessLogger,
        shutdown_timeout=settings.shutdown_grace,  # SIGTERM: in-flight requests may finish
        print=lambda line: log.info(
            "%s (pid %d, %s loop)", line, os.getpid(), type(loop).__module__
        ),
    )


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

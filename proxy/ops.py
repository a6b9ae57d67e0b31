"""Operator endpoints and the request log: /healthz, /readyz, /metrics, AccessLogger."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.logs import correlation
from proxy.metrics import CONTENT_TYPE
from proxy.state import CORRELATION_ID, METRICS, PIPELINE, ROUTE_NAME, SETTINGS, USER

log = logging.getLogger(__name__)


async def healthz(app: web.Application, request: web.Request) -> web.Response:
    """Liveness only: the process answers. Readiness is /readyz."""
    return web.json_response({"status": "UP"})


async def readyz(app: web.Application, request: web.Request) -> web.Response:
    """Ready once XSUAA's keys are loaded, i.e. tokens can be validated."""
    pipeline = app.get(PIPELINE)
    if pipeline is not None and pipeline.keys.loaded:
        return web.json_response({"status": "READY"})
    reason = "XSUAA's verification keys are not loaded yet"
    if pipeline is not None and pipeline.keys.last_error:
        reason += f" (last attempt: {pipeline.keys.last_error})"
    body = {"error": "not_ready", "error_description": reason}
    return web.json_response(body, status=503)


async def metrics(app: web.Application, request: web.Request) -> web.Response:
    body = app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def metrics_site(app: web.Application) -> AsyncIterator[None]:
    """/metrics on its own port (CPI_PROXY_METRICS_PORT), away from the app's public route."""
    settings = app[SETTINGS]
    side = web.Application()
    side[METRICS] = app[METRICS]
    side.router.add_get("/metrics", _side_metrics)
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.metrics_port).start()
    log.info("metrics on port %d", settings.metrics_port)
    try:
        yield
    finally:
        await runner.cleanup()


async def _side_metrics(request: web.Request) -> web.Response:
    return await metrics(request.app, request)


class AccessLogger(AbstractAccessLogger):
    """One request log line (SAP's `type: request` fields); the path without its query."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # at WARNING, costs nothing per request

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        token = correlation.set(request.get(CORRELATION_ID, "-"))
        try:
            self.logger.info(
                "%s %s %d",
                request.method,
                request.path,
                response.status,
                extra={
                    "type": "request",
                    "method": request.method,
                    "request": request.path,
                    "status_code": response.status,
                    "response_time_ms": round(time * 1000, 2),
                    "response_size_b": response.body_length,
                    "route": request.get(ROUTE_NAME, "-"),
                    "user": request.get(USER, "-"),
                    "remote_ip": request.remote,
                },
            )
        finally:
            correlation.reset(token)

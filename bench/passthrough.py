"""The floor of any aiohttp proxy: one shared session, streams both ways, swaps Authorization.

No validation, no cache, no routes: what cpi-proxy is compared against in `make bench`.
Run: UPSTREAM=https://127.0.0.1:8443 PORT=9000 python bench/passthrough.py
"""

from __future__ import annotations

import os
import ssl

import aiohttp
from aiohttp import web

HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"})
UPSTREAM = os.environ["UPSTREAM"].rstrip("/")
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def handle(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = "Bearer passthrough"
    async with request.app[SESSION].request(
        request.method,
        UPSTREAM + request.raw_path,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP:
                response.headers.add(name, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(), limit=0)
    app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    yield
    await app[SESSION].close()


def main() -> None:
    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), access_log=None, print=None)


if __name__ == "__main__":
    main()

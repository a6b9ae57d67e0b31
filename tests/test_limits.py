"""Client limits under `serve`: a deadline for request heads (slowloris), a bound on pauses in a
request body, a cap on connections, and the head size caps (per line, in total). Raw sockets on
loopback against the proxy served as `serve` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.auth import MAX_TOKEN_BYTES
from proxy.bindings import load_bindings
from proxy.dev import EmulatedXsuaa
from proxy.limits import FD_RESERVE, LINGERING_REFUSALS, LimitedSite, fd_budget
from proxy.metrics import Metrics
from proxy.routes import parse_routes
from proxy.serve import start
from proxy.settings import Settings
from proxy.state import METRICS, PIPELINE
from proxy.upstream import Pool
from tests.conftest import ROUTES, Iflow, until
from tests.test_ops import metric
from tests.test_shutdown import serve, wait_until_serving

HEADER_TIMEOUT = 0.3
GENEROUS = 5.0  # a bound for "promptly" that a loaded machine still meets; never waited out
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
MAX_HEAD = Settings().max_head_bytes


@dataclass
class Served:
    port: int
    site: LimitedSite | None = None
    app_metrics: Metrics | None = None
    pool: Pool | None = None

    @property
    def open(self) -> int:
        assert self.site is not None and self.site.clients is not None
        return self.site.clients.open

    def metrics(self) -> str:
        assert self.app_metrics is not None
        return self.app_metrics.render().decode()


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve_proxy(xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path) -> AsyncIterator[Serve]:
    """The proxy served by `proxy.serve.start`, as `cpi-proxy serve` serves it."""
    runners = []

    async def make(**overrides: Any) -> Served:
        settings = Settings(
            **{"host": "127.0.0.1", "port": 0, "header_timeout": HEADER_TIMEOUT, **overrides}
        )
        vcap = xsuaa.vcap_services(iflow.url)
        bindings = load_bindings({"VCAP_SERVICES": json.dumps(vcap)})
        app = create_app(settings, bindings, parse_routes(ROUTES))
        runner, site = await start(app, settings)
        runners.append(runner)
        return Served(site.port, site, app[METRICS], app[PIPELINE].pool)

    yield make
    for runner in runners:
        await runner.cleanup()


Connect = Callable[[Served], Awaitable["Conn"]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Raw client connections, all closed at the end."""
    conns: list[Conn] = []

    async def open_one(served: Served) -> Conn:
        conns.append(Conn(*await asyncio.open_connection("127.0.0.1", served.port)))
        return conns[-1]

    yield open_one
    for conn in conns:
        conn.close()
        with contextlib.suppress(ConnectionError):
            await conn.writer.wait_closed()


class Conn:
    """A raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """One response with a Content-Length body (all the proxy's own answers have one)."""
        async with asyncio.timeout(GENEROUS):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines if line)
            headers = {k.lower(): v for k, v in headers.items()}
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def until_closed(self) -> bytes:
        """Everything the proxy sends until it closes (a reset counts as closed)."""
        received = b""
        async with asyncio.timeout(GENEROUS):
            try:
                while chunk := await self.reader.read(65536):
                    received += chunk
            except ConnectionResetError:
                pass
        return received

    def close(self) -> None:
        self.writer.close()


async def dribble(conn: Conn, data: bytes, every: float) -> None:
    """Send `data` a byte at a time until it is all sent or the proxy hangs up."""
    try:
        for i in range(len(data)):
            await conn.send(data[i : i + 1])
            await asyncio.sleep(every)
    except ConnectionError:
        pass


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


# --- the head deadline ---------------------------------------------------------------------


async def test_a_client_dribbling_its_head_is_cut_after_the_header_timeout(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    started = time.monotonic()
    sender = asyncio.ensure_future(dribble(conn, HEALTHZ[:-2] + b"X-Slow: 1\r\n" * 100, 0.02))
    received = await conn.until_closed()
    elapsed = time.monotonic() - started
    await sender
    assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + GENEROUS
    assert received == b"" or received.startswith(b"HTTP/1.1 408 ")  # a reset may eat it
    assert metric(served.metrics(), "cpi_proxy_request_head_timeouts_total") == 1
    await until(lambda: served.open == 0)


async def test_a_head_that_stops_halfway_gets_a_408_json_answer(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    started = time.monotonic()
    await conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
    received = await conn.until_closed()
    elapsed = time.monotonic() - started
    status, headers, body = parse(received)
    assert (status, headers["connection"], body) == (
        408,
        "close",
        {
            "error": "request_timeout",
            "error_description": "the request head did not arrive within 0.3 s",
        },
    )
    assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + GENEROUS


async def test_a_slow_body_is_not_cut_by_the_header_timeout(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    body = b"0123456789"
    token = xsuaa.mint_user_token().encode()
    await conn.send(
        b"POST /cpi/echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n" % (len(body), token)
    )
    await dribble(conn, body, HEADER_TIMEOUT / 3)  # 10 bytes over ~1 s, 3+ header timeouts
    status, _, echoed = await conn.answer()
    assert (status, echoed) == (200, body)
    await conn.send(HEALTHZ)  # and the connection lives on
    assert (await conn.answer())[0] == 200
    conn.close()


# --- the body pause ------------------------------------------------------------------------
BODY_TIMEOUT = 0.3


def post_head(path: str, token: str, framing: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n%s\r\n"
        b"Authorization: Bearer %s\r\n\r\n" % (path.encode(), framing, token.encode())
    )


async def test_a_held_body_that_stops_gets_a_408_before_any_token_or_cpi_call(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    served = await serve_proxy(body_timeout=BODY_TIMEOUT)
    conn = await connect(served)
    started = time.monotonic()
    await conn.send(post_head("/cpi/echo", xsuaa.mint_user_token(), b"Content-Length: 100"))
    await conn.send(b"x" * 10)  # and then nothing: the body is a tenth there
    status, headers, raw = await conn.answer()
    elapsed = time.monotonic() - started
    body = json.loads(raw)
    assert (status, headers["connection"], body["error"]) == (408, "close", "request_timeout")
    assert "paused for more than 0.3 s (CPI_PROXY_BODY_TIMEOUT)" in body["error_description"]
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + GENEROUS
    assert await conn.until_closed() == b""  # at once, not after aiohttp's 10 s of lingering
    assert (xsuaa.token_posts, iflow.runtime.requests) == (0, [])


async def test_a_streamed_body_that_stops_gets_a_408_and_frees_its_cpi_connection(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa
) -> None:
    served = await serve_proxy(body_timeout=BODY_TIMEOUT)
    assert served.pool is not None
    conn = await connect(served)
    started = time.monotonic()
    token = xsuaa.mint_user_token()
    await conn.send(post_head("/cpi/_emu/sink", token, b"Transfer-Encoding: chunked"))
    await conn.send(b"5\r\nhello\r\n")  # streams to CPI at once; then the client stalls
    status, headers, raw = await conn.answer()
    elapsed = time.monotonic() - started
    body = json.loads(raw)
    assert (status, headers["connection"], body["error"]) == (408, "close", "request_timeout")
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + GENEROUS
    assert await conn.until_closed() == b""
    assert served.pool.open_connections == served.pool.idle_connections  # none left busy
    text = served.metrics()
    labels = {"route": "cpi", "method": "POST", "status_class": "4xx"}
    assert metric(text, "cpi_proxy_requests_total", **labels) == 1


@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
async def test_pauses_shorter_than_the_body_timeout_add_up_to_more_and_are_served(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa, framing: str
) -> None:
    served = await serve_proxy(body_timeout=BODY_TIMEOUT)
    conn = await connect(served)
    parts = [b"part%d;" % i for i in range(6)]
    token = xsuaa.mint_user_token()
    if framing == "chunked":
        head = post_head("/cpi/_emu/sink", token, b"Transfer-Encoding: chunked")
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]
    else:
        length = b"Content-Length: %d" % len(b"".join(parts))
        head, pieces = post_head("/cpi/_emu/sink", token, length), parts
    started = time.monotonic()
    await conn.send(head)
    for piece in pieces:
        await asyncio.sleep(BODY_TIMEOUT / 3)  # the client's pace, not a wait for the test
        await conn.send(piece)
    status, _, sunk = await conn.answer()
    whole = b"".join(parts)
    expected = {"bytes": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}
    assert (status, json.loads(sunk)) == (200, expected)
    assert time.monotonic() - started > BODY_TIMEOUT * 2


@pytest.mark.parametrize(
    "how", ["client leaves a held body", "client leaves a stream", "bad chunk"]
)
async def test_a_body_that_breaks_off_is_the_clients_400_not_an_upstream_failure(
    serve_proxy: Serve,
    connect: Connect,
    xsuaa: EmulatedXsuaa,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = await serve_proxy(body_timeout=GENEROUS * 2)  # so it cannot be what answers
    assert served.pool is not None
    pool = served.pool
    conn = await connect(served)
    token = xsuaa.mint_user_token()
    caplog.set_level(logging.INFO)
    if how == "bad chunk":  # a malformed chunk size, once the body streams to CPI
        await conn.send(post_head("/cpi/_emu/sink", token, b"Transfer-Encoding: chunked"))
        await conn.send(b"5\r\nhello\r\n")
        await until(lambda: pool.open_connections > pool.idle_connections)
        await conn.send(b"zz\r\n")
        status, headers, raw = await conn.answer()
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(raw)["error_description"] == (
            "the request body broke off before its end (BadHttpMessage)"
        )
    elif how == "client leaves a stream":  # over the replay limit: streams as it comes
        await conn.send(post_head("/cpi/_emu/sink", token, b"Content-Length: 10000000"))
        await conn.send(b"x" * 10)
        await until(lambda: pool.open_connections > pool.idle_connections)
        conn.writer.transport.abort()
    else:  # a tenth of a body held for replay, then gone
        await conn.send(post_head("/cpi/echo", token, b"Content-Length: 100") + b"x" * 10)
        conn.writer.transport.abort()
    await until(lambda: "-> 400 invalid_request" in caplog.text, within=GENEROUS)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    text = served.metrics()
    labels = {"route": "cpi", "method": "POST", "status_class": "4xx"}
    assert metric(text, "cpi_proxy_requests_total", **labels) == 1
    await until(lambda: pool.open_connections == pool.idle_connections)  # none left busy


async def test_each_request_on_a_keep_alive_connection_gets_its_own_header_window(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    await conn.send(HEALTHZ)
    assert (await conn.answer())[0] == 200
    await asyncio.sleep(HEADER_TIMEOUT * 2)  # idle between requests: not the head's time
    for _ in range(2):  # each head in two halves, together within their own window
        await conn.send(HEALTHZ[:10])
        await asyncio.sleep(HEADER_TIMEOUT / 2)
        await conn.send(HEALTHZ[10:])
        assert (await conn.answer())[0] == 200
    started = time.monotonic()
    await conn.send(HEALTHZ[:10])  # a third head never completes: its own window ends it
    assert (await conn.until_closed()).startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT <= time.monotonic() - started < HEADER_TIMEOUT + GENEROUS


async def test_pipelined_requests_are_all_answered(serve_proxy: Serve, connect: Connect) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    await conn.send(HEALTHZ * 3)
    assert [(await conn.answer())[0] for _ in range(3)] == [200, 200, 200]
    conn.close()


# --- the connection cap -------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_refused_and_a_freed_slot_is_reused(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy(max_clients=3)
    held = [await connect(served) for _ in range(3)]
    for conn in held:  # answered, so surely accepted and counted
        await conn.send(HEALTHZ)
        assert (await conn.answer())[0] == 200
    assert served.open == 3

    asking, silent = await connect(served), await connect(served)
    started = time.monotonic()
    await asking.send(HEALTHZ)
    refusals = [parse(await c.until_closed()) for c in (asking, silent)]
    assert time.monotonic() - started < 1.0  # at once: no waiting for a slot, no linger
    for status, headers, body in refusals:
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        assert body["error"] == "too_many_connections"
        assert "3 connections at most" in body["error_description"]
    assert metric(served.metrics(), "cpi_proxy_client_connections_refused_total") == 2

    held.pop().close()
    await until(lambda: served.open == 2)
    again = await connect(served)
    await again.send(HEALTHZ)
    assert (await again.answer())[0] == 200
    assert metric(served.metrics(), "cpi_proxy_client_connections") == 3
    for conn in (*held, again):
        conn.close()
    await until(lambda: served.open == 0)


async def test_a_slowloris_swarm_cannot_hold_more_than_the_cap_for_longer_than_the_timeout(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy(max_clients=20)
    swarm = [await connect(served) for _ in range(20)]
    for conn in swarm:
        await conn.send(b"GET / HTTP/1.1\r\n")
    await until(lambda: served.open == 20)
    late = await connect(served)
    assert parse(await late.until_closed())[0] == 503  # full: refused, not left waiting
    closed = await asyncio.gather(*(conn.until_closed() for conn in swarm))
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in closed)
    await until(lambda: served.open == 0)
    again = await connect(served)
    await again.send(HEALTHZ)
    assert (await again.answer())[0] == 200
    again.close()


# --- the header size cap (aiohttp's parser, 32 KiB per line) -------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEALTHZ[:-2] + b"X-Big: " + b"a" * (33 * 1024) + b"\r\n\r\n",  # one header too long
        b"GET /healthz?" + b"q" * (33 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line
        HEALTHZ[:-2] + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",  # too many
        b"POST /cpi/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",  # smuggling shape
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",  # obs-fold
        b"POST /cpi/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",  # a bad chunk in the head's own read
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    ],
    ids=[
        "long-header",
        "long-request-line",
        "too-many-fields",
        "content-length-and-chunked",
        "obs-fold",
        "bad-chunk",
        "nul",
    ],
)
async def test_a_request_the_parser_refuses_gets_a_json_400_and_a_close(
    serve_proxy: Serve, connect: Connect, request_bytes: bytes
) -> None:
    """aiohttp's parser limits (32 KiB per line, 128 fields) and strictness, answered as JSON."""
    served = await serve_proxy()
    conn = await connect(served)
    await conn.send(request_bytes)
    status, headers, body = parse(await conn.until_closed())
    assert (status, headers["content-type"], body["error"]) == (
        400,
        "application/json; charset=utf-8",
        "invalid_request",
    )
    assert body["error_description"].startswith("not a valid HTTP/1.1 request (")
    assert not re.search(r"(.)\1{15}", body["error_description"])  # refused bytes not echoed
    await until(lambda: served.open == 0)


# --- the total head size cap (CPI_PROXY_MAX_HEAD_BYTES) ----------------------------------------


def padded_head(start: bytes, size: int) -> bytes:
    """`start` (a request line and headers) padded with X-Pad fields to `size` bytes in all; each
    field under 8 KiB, so the emulated CPI (aiohttp's defaults) takes them too."""
    room = size - len(start) - 2  # the blank line
    pads: list[bytes] = []
    while room > 0:
        line = b"X-Pad-%d: " % len(pads)
        value = b"p" * max(1, min(8000, room - len(line) - 2))
        pads.append(line + value + b"\r\n")
        room -= len(pads[-1])
    head = start + b"".join(pads) + b"\r\n"
    assert len(head) == size, "pad to an exact size"
    return head


def largest_token(xsuaa: EmulatedXsuaa) -> bytes:
    """A valid user token as large as the validator admits (within base64's 4-byte steps)."""
    pad = (MAX_TOKEN_BYTES - len(xsuaa.mint_user_token("big"))) * 3 // 4
    token = xsuaa.mint_user_token("big", claims={"pad": "x" * pad})
    while len(token) > MAX_TOKEN_BYTES:
        pad -= 1
        token = xsuaa.mint_user_token("big", claims={"pad": "x" * pad})
    assert MAX_TOKEN_BYTES - 4 < len(token) <= MAX_TOKEN_BYTES
    return token.encode()


def send_in_background(conn: Conn, data: bytes) -> asyncio.Task[None]:
    """Send `data` while the test reads; the proxy may hang up before it has read it all."""

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            await conn.send(data)

    return asyncio.create_task(send())


def statuses(received: bytes) -> list[int]:
    """The statuses of the whole answers in `received` (each has a Content-Length)."""
    found = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
        found.append(int(status_line.split()[1]))
        received = rest[int(fields["content-length"]) :]
    return found


async def test_a_huge_head_gets_a_431_json_answer_at_once_and_the_proxy_stays_healthy(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    field = b"X-Big-%03d: " + b"a" * (30 * 1024) + b"\r\n"  # each line within aiohttp's 32 KiB
    head = HEALTHZ[:-2] + b"".join(field % i for i in range(120)) + b"\r\n"  # within 128 fields
    assert len(head) > 3_600_000
    started = time.monotonic()
    sender = send_in_background(conn, head)
    status, headers, body = await conn.answer()
    elapsed = time.monotonic() - started
    assert (status, headers["connection"], json.loads(body)) == (
        431,
        "close",
        {
            "error": "request_header_fields_too_large",
            "error_description": "the request line and header fields together exceed 65536 bytes",
        },
    )
    assert elapsed < 1.0, f"the 431 took {elapsed:.3f} s"
    assert await conn.until_closed() == b""  # and nothing after it: the proxy sends no more
    await sender
    assert metric(served.metrics(), "cpi_proxy_request_heads_too_large_total") == 1
    await until(lambda: served.open == 0)  # the client stays: the proxy closes after the linger
    assert served.site is not None and served.site.clients is not None
    assert served.site.clients.lingering == 0
    again = await connect(served)
    await again.send(HEALTHZ)
    assert (await again.answer())[0] == 200


@pytest.mark.parametrize(("size", "status"), [(MAX_HEAD, 200), (MAX_HEAD + 1, 431)])
async def test_a_head_up_to_the_cap_with_the_largest_token_is_served_and_beyond_refused(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa, size: int, status: int
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    start = b"GET /cpi/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % (
        largest_token(xsuaa)
    )
    sender = send_in_background(conn, padded_head(start, size))
    assert (await conn.answer())[0] == status
    await sender
    refused = metric(served.metrics(), "cpi_proxy_request_heads_too_large_total")
    assert refused == (1 if status == 431 else 0)


async def test_a_head_in_many_small_packets_under_the_cap_is_served(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    head = padded_head(HEALTHZ[:-2], MAX_HEAD - 1)
    for i in range(0, len(head), 100):  # 656 writes, each drained: many small reads
        await conn.send(head[i : i + 100])
    assert (await conn.answer())[0] == 200
    await conn.send(HEALTHZ)  # the next head has its own count
    assert (await conn.answer())[0] == 200


async def test_a_large_body_after_a_small_head_is_not_counted(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    body = bytes(range(256)) * 4096  # 1 MiB, 16 times the cap; in the head's own reads too
    token = xsuaa.mint_user_token().encode()
    sender = send_in_background(
        conn,
        b"POST /cpi/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n%s%s"
        % (len(body), token, body, HEALTHZ),
    )
    status, _, echoed = await conn.answer()
    assert (status, len(echoed), echoed == body) == (200, len(body), True)
    assert (await conn.answer())[0] == 200  # the pipelined head behind the body
    await sender
    assert metric(served.metrics(), "cpi_proxy_request_heads_too_large_total") == 0


async def test_pipelined_heads_worth_more_than_the_cap_in_one_write_are_all_answered(
    serve_proxy: Serve, connect: Connect
) -> None:
    served = await serve_proxy()
    conn = await connect(served)
    one = padded_head(HEALTHZ[:-2], 1500)
    sender = send_in_background(conn, one * 100)  # 150 KB: 2.3 times the cap
    assert [(await conn.answer())[0] for _ in range(100)] == [200] * 100
    await sender
    assert metric(served.metrics(), "cpi_proxy_request_heads_too_large_total") == 0


async def test_a_huge_head_pipelined_behind_a_request_never_garbles_its_answer(
    serve_proxy: Serve, connect: Connect
) -> None:
    """If the first answer is still pending when the cap fills, no 431 can be written after it:
    the proxy just hangs up. If it was sent already, the 431 follows it whole."""
    served = await serve_proxy()
    conn = await connect(served)
    huge = padded_head(HEALTHZ[:-2], 4 * MAX_HEAD)
    sender = send_in_background(conn, HEALTHZ + huge)
    received = await conn.until_closed()
    await sender
    assert statuses(received) in ([], [200], [200, 431])
    assert metric(served.metrics(), "cpi_proxy_request_heads_too_large_total") == 1
    await until(lambda: served.open == 0)


# --- `cpi-proxy serve` itself -----------------------------------------------------------------


async def test_serve_applies_the_client_limits(
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    ca_file: Path,
    tmp_path: Path,
    unused_tcp_port: int,
    connect: Connect,
) -> None:
    """The real process (uvloop when installed), configured through the environment."""
    settings = {
        "CPI_PROXY_HEADER_TIMEOUT": "0.3",
        "CPI_PROXY_MAX_CLIENTS": "2",
        "CPI_PROXY_MAX_HEAD_BYTES": "20000",
    }
    process = await serve(xsuaa, iflow, tmp_path, unused_tcp_port, settings)
    served = Served(unused_tcp_port)
    try:
        await wait_until_serving(f"http://127.0.0.1:{unused_tcp_port}", process)
        slow = await connect(served)
        started = time.monotonic()
        await slow.send(b"GET /healthz HTTP/1.1\r\n")
        assert (await slow.until_closed()).startswith(b"HTTP/1.1 408 ")
        assert 0.3 <= time.monotonic() - started < 0.3 + GENEROUS
        big = await connect(served)
        await big.send(padded_head(HEALTHZ[:-2], 20001))
        assert (await big.answer())[0] == 431
        big.close()
        held = [await connect(served) for _ in range(2)]
        for conn in held:
            await conn.send(HEALTHZ)
            assert (await conn.answer())[0] == 200
        refused = await connect(served)
        assert parse(await refused.until_closed())[0] == 503
        for conn in held:
            conn.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)


# --- the file-descriptor budget ---------------------------------------------------------------


def test_the_fd_limit_is_raised_to_what_the_limits_need(caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert fd_budget(max_clients=100, max_connections=10) == 256  # enough: untouched
        needed = 300 + 10 + LINGERING_REFUSALS + FD_RESERVE
        assert fd_budget(max_clients=300, max_connections=10) == min(needed, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(needed, hard)
        assert "file-descriptor limit" not in caplog.text
        if hard != resource.RLIM_INFINITY:
            with caplog.at_level(logging.WARNING):
                assert fd_budget(max_clients=hard, max_connections=10) == hard
            assert "lower CPI_PROXY_MAX_CLIENTS" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- serve calls app.handle past the router: what the router did for it ---------------------


async def test_served_proxy_tells_an_expecting_client_to_send_its_body(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa
) -> None:
    conn = await connect(await serve_proxy())
    token = xsuaa.mint_user_token().encode()
    await conn.send(
        b"POST /cpi/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
        b"Authorization: Bearer " + token + b"\r\n\r\n"
    )
    async with asyncio.timeout(GENEROUS):  # without the 100, a client would wait, then send
        assert await conn.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    await conn.send(b"hello")
    status, _, body = await conn.answer()
    assert (status, body) == (200, b"hello")


async def test_served_proxy_refuses_an_unknown_expectation(
    serve_proxy: Serve, connect: Connect
) -> None:
    conn = await connect(await serve_proxy())
    await conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n")
    status, headers, body = await conn.answer()
    assert status == 417
    assert json.loads(body)["error"] == "expectation_failed"
    assert headers["x-correlationid"]


async def test_served_proxy_answers_operator_endpoints_and_proxies_the_rest(
    serve_proxy: Serve, connect: Connect, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    conn = await connect(await serve_proxy())
    await conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await conn.answer())[0] == 200
    await conn.send(b"DELETE /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await conn.answer()
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    token = xsuaa.mint_user_token("served").encode()
    await conn.send(
        b"GET /cpi/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    )
    status, headers, _ = await conn.answer()
    assert (status, headers["x-cpi-subject"]) == (200, "served")
    assert [r.subject for r in iflow.runtime.requests] == ["served"]

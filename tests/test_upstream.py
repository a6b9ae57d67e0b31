"""upstream.Pool against scripted CPI stand-ins on loopback: real sockets, exact bytes.

Each test plays CPI with a small asyncio server whose script reads and writes raw HTTP/1.1, so
the behaviours under test (stale keep-alive connections, early answers, resets, stalls) are
reproduced byte by byte rather than mocked.
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import ssl
import struct
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.dev import DevCA
from proxy.tls import client_context
from proxy.upstream import (
    _HIGH_WATER,
    ConnectFailed,
    ConnectionClosed,
    Pool,
    ProtocolError,
    Response,
    UploadFailed,
    UpstreamError,
)
from tests.conftest import until

Script = Callable[["Peer"], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WITHIN = 5.0  # bound on every wait for the other side; the tests themselves take far less
DEADLINE = 10.0  # a test still running by then has its pool and server torn down


# --- the CPI stand-in ---------------------------------------------------------------------------
@dataclass
class Peer:
    """One connection as CPI sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    heads: list[bytes] = field(default_factory=list)

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and decoded body; None once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.heads.append(head)
        fields = head.lower()
        if b"\r\ntransfer-encoding: chunked\r\n" in fields:
            body = b"".join(await read_chunked(self.reader))
        elif match := re.search(rb"\r\ncontent-length: (\d+)\r\n", fields):
            body = await self.reader.readexactly(int(match[1]))
        else:
            body = b""
        return head, body

    async def until_eof(self) -> bytes:
        """Whatever the client still sends before it closes the connection."""
        try:
            return await self.reader.read()
        except ConnectionError:
            return b""

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def read_chunked(reader: asyncio.StreamReader) -> list[bytes]:
    """A chunked body, strictly: lowercase hex sizes, CRLFs in place, no extensions or trailers."""
    chunks: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        assert re.fullmatch(rb"[0-9a-f]+\r\n", line), line
        size = int(line[:-2], 16)
        chunk = await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
        if size == 0:
            return chunks
        chunks.append(chunk)


class Upstream:
    """A loopback server that runs `script` on every connection it accepts."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.peers: list[Peer] = []
        self.open_now = 0
        self.most_open = 0
        self.errors: list[BaseException] = []
        self.port = 0

    async def start(self, tls: ssl.SSLContext | None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self.peers)

    def lines(self) -> list[list[bytes]]:
        """Each connection's request lines, in order."""
        return [[head.split(b"\r\n", 1)[0] for head in peer.heads] for peer in self.peers]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self._script(peer)
        except asyncio.CancelledError:
            pass  # the test is over; Python 3.11's stream server mishandles a cancelled task
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.open_now -= 1
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks)
        await self._server.wait_closed()


def always(answer: bytes) -> Script:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.send(answer)

    return script


def recording(into: list[tuple[bytes, bytes]], answer: bytes = OK) -> Script:
    async def script(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            into.append(request)
            peer.send(answer)

    return script


class Stage:
    """Starts upstreams and pools for one test, and stops them after it."""

    def __init__(self) -> None:
        self.upstreams: list[Upstream] = []
        self.pools: list[Pool] = []

    async def start(
        self,
        script: Script,
        *,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        path: str = "",
        limit: int = 100,
    ) -> tuple[Upstream, Pool]:
        upstream = Upstream(script)
        await upstream.start(server_tls)
        self.upstreams.append(upstream)
        scheme = "https" if server_tls else "http"
        url = f"{scheme}://127.0.0.1:{upstream.port}{path}"
        return upstream, self.pool(url, ssl_context=client_tls, limit=limit)

    def pool(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limit: int = 100,
        connect_timeout: float = WITHIN,
    ) -> Pool:
        pool = Pool(url, ssl_context=ssl_context, connect_timeout=connect_timeout, limit=limit)
        self.pools.append(pool)
        return pool

    async def stop(self) -> None:
        for pool in self.pools:
            await pool.close()
        for upstream in self.upstreams:
            await upstream.stop()


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    stage = Stage()
    loop = asyncio.get_running_loop()
    expired: list[asyncio.Task[None]] = []
    # A broken pool must fail its test, not hang the suite: past the deadline everything is
    # torn down, so whatever the test still awaits from the pool or the server fails.
    watchdog = loop.call_later(DEADLINE, lambda: expired.append(loop.create_task(stage.stop())))
    yield stage
    watchdog.cancel()
    await asyncio.gather(*expired)
    await stage.stop()
    assert not expired, f"the test outlived its {DEADLINE:g} s"
    assert [error for upstream in stage.upstreams for error in upstream.errors] == []


# --- small helpers ------------------------------------------------------------------------------
async def get(pool: Pool, target: str = "/") -> tuple[int, bytes]:
    async with await pool.request("GET", target, [], None) as response:
        return response.status, await response.read()


async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def at_next_turn(
    condition: Callable[[], bool], action: Callable[[], object]
) -> asyncio.Future[None]:
    """Run `action` as soon as `condition` holds, before any task woken meanwhile resumes.

    The check queues itself again on every loop iteration, so it is always queued ahead of the
    task wake-ups that a socket read schedules: what data_received resolves in iteration N
    resumes its tasks in N + 1, after this check has had its turn.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def check() -> None:
        if done.done():
            return
        if condition():
            action()
            done.set_result(None)
        else:
            loop.call_soon(check)

    loop.call_soon(check)
    return done


def reading(response: Response) -> bool:
    """Whether the connection under `response` still reads from its socket."""
    conn = response._conn
    return conn is not None and conn.transport is not None and conn.transport.is_reading()


# --- 1. keep-alive ------------------------------------------------------------------------------
async def test_sequential_requests_share_one_keep_alive_connection(stage: Stage) -> None:
    upstream, pool = await stage.start(always(OK))
    assert (pool.open_connections, pool.idle_connections) == (0, 0)

    assert await get(pool, "/one") == (200, b"ok")
    assert (pool.open_connections, pool.idle_connections) == (1, 1)
    assert await get(pool, "/two") == (200, b"ok")

    assert (pool.open_connections, pool.idle_connections) == (1, 1)
    assert upstream.lines() == [[b"GET /one HTTP/1.1", b"GET /two HTTP/1.1"]]


async def test_an_idle_connection_cpi_closed_is_not_handed_out(stage: Stage) -> None:
    async def answer_once_then_close(peer: Peer) -> None:
        if await peer.request() is not None:
            peer.send(OK)

    upstream, pool = await stage.start(answer_once_then_close)
    assert await get(pool, "/one") == (200, b"ok")
    await until(lambda: pool.open_connections == 0, within=WITHIN)

    assert await get(pool, "/two") == (200, b"ok")
    assert upstream.lines() == [[b"GET /one HTTP/1.1"], [b"GET /two HTTP/1.1"]]


async def test_header_bytes_survive_as_aiohttp_would_pass_them_on(stage: Stage) -> None:
    answer = "HTTP/1.1 200 Très bien\r\nX-Name: café\r\nContent-Length: 2\r\n\r\nok".encode()
    _, pool = await stage.start(always(answer))
    async with await pool.request("GET", "/", [], None) as response:
        assert response.headers["X-Name"] == "café"  # UTF-8, as aiohttp decodes headers
        assert response.reason == "Très bien"


async def test_connections_left_idle_are_closed_after_the_idle_timeout(stage: Stage) -> None:
    closed: list[bytes] = []

    async def answer_then_note_the_close(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.send(OK)
        closed.append(await peer.until_eof())

    upstream = Upstream(answer_then_note_the_close)
    await upstream.start(None)
    stage.upstreams.append(upstream)
    pool = Pool(f"http://127.0.0.1:{upstream.port}", ssl_context=None, connect_timeout=WITHIN,
                idle_timeout=0.2)  # fmt: skip
    stage.pools.append(pool)
    first, second = await asyncio.gather(get(pool, "/a"), get(pool, "/b"))
    assert first == second == (200, b"ok")
    assert pool.open_connections == 2
    # No further request comes: the pool's own timer closes them, as CPI would see it.
    await until(lambda: pool.open_connections == 0 and len(closed) == 2, within=WITHIN)
    assert pool.idle_connections == 0


async def test_a_broken_off_answer_is_freed_at_once_not_by_the_cyclic_gc(stage: Stage) -> None:
    """A dead connection holds a TLS buffer and its answer the body read so far: both must go
    when the last reference does. Left to the cyclic GC, they piled up by the hundred MiB."""

    async def cut_short(peer: Peer) -> None:
        if await peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + bytes(5000))
            await asyncio.sleep(0)
            peer.reset()

    _, pool = await stage.start(cut_short)
    gc.disable()
    try:
        response = await pool.request("GET", "/", [], None)
        assert response._conn is not None
        conn, answer = weakref.ref(response._conn), weakref.ref(response)
        try:
            async with response:
                await response.read()
        except UpstreamError:
            pass
        else:
            pytest.fail("the answer was cut short")
        del response
        await until(lambda: conn() is None, within=WITHIN)
        assert answer() is None
    finally:
        gc.enable()


# --- 2. request bytes ---------------------------------------------------------------------------
async def test_request_heads_and_bodies_are_written_exactly(stage: Stage) -> None:
    seen: list[tuple[bytes, bytes]] = []
    upstream, pool = await stage.start(recording(seen), path="/cpi/")
    headers = [("X-B", "2"), ("x-a", "1"), ("X-B", "3")]
    large = bytes(range(256)) * 100  # over the size that leaves in the same write as the head
    requests: list[tuple[str, bytes | None]] = [
        ("GET", None),
        ("POST", b"hello"),
        ("POST", None),
        ("PUT", b""),
        ("DELETE", None),
        ("PATCH", large),
    ]

    for method, body in requests:
        async with await pool.request(method, "/http/flow?x=1&y=%20z", headers, body) as response:
            assert await response.read() == b"ok"

    host = b"Host: 127.0.0.1:%d\r\n" % upstream.port
    common = b" /cpi/http/flow?x=1&y=%20z HTTP/1.1\r\n" + host + b"X-B: 2\r\nx-a: 1\r\nX-B: 3\r\n"
    assert seen == [
        (b"GET" + common + b"\r\n", b""),
        (b"POST" + common + b"Content-Length: 5\r\n\r\n", b"hello"),
        (b"POST" + common + b"Content-Length: 0\r\n\r\n", b""),
        (b"PUT" + common + b"Content-Length: 0\r\n\r\n", b""),
        (b"DELETE" + common + b"\r\n", b""),
        (b"PATCH" + common + b"Content-Length: 25600\r\n\r\n", large),
    ]
    assert upstream.connections == 1  # so no stray byte fell between the requests


@pytest.mark.parametrize(
    ("target", "header"),
    [
        ("/evil", ("X-Evil", "a\r\nInjected: 1")),
        ("/evil", ("X-Evil", "a\nInjected: 1")),
        ("/evil", ("X-Evil", "a\rb")),
        ("/evil", ("X-Evil\r\nInjected", "1")),
        ("/evil HTTP/1.1\r\nInjected: 1\r\nX:", ("X-Fine", "1")),
    ],
)
async def test_a_line_break_in_the_head_is_refused_and_nothing_is_sent(
    stage: Stage, target: str, header: tuple[str, str]
) -> None:
    upstream, pool = await stage.start(always(OK))
    assert await get(pool, "/before") == (200, b"ok")

    with pytest.raises(ProtocolError, match="line break"):
        await pool.request("GET", target, [header], None)

    assert await get(pool, "/after") == (200, b"ok")
    assert upstream.lines() == [[b"GET /before HTTP/1.1", b"GET /after HTTP/1.1"]]


# --- 3. response framings -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "answer", "expected", "reused"),
    [
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            (200, "OK", b"hello"),
            True,
            id="content-length",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
            (200, "OK", b"hello, world"),
            True,
            id="chunked",
        ),
        pytest.param(
            "DELETE",
            b"HTTP/1.1 204 No Content\r\nX-Done: yes\r\n\r\n",
            (204, "No Content", b""),
            True,
            id="204",
        ),
        pytest.param(
            "HEAD",  # llhttp would wait for 42 body bytes: the connection must not be reused
            b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n",
            (200, "OK", b""),
            False,
            id="head",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nfinal",
            (201, "Created", b"final"),
            True,
            id="103-first",
        ),
        pytest.param(
            "POST",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Fine\r\nContent-Length: 4\r\n\r\ndone",
            (200, "Fine", b"done"),
            True,
            id="100-first",
        ),
    ],
)
async def test_response_framing(
    stage: Stage, method: str, answer: bytes, expected: tuple[int, str, bytes], reused: bool
) -> None:
    async def script(peer: Peer) -> None:
        if len(upstream.peers) == 1:
            await peer.request()
            peer.send(answer)
        await always(OK)(peer)

    upstream, pool = await stage.start(script)
    async with await pool.request(method, "/framed", [], None) as response:
        assert (response.status, response.reason, await response.read()) == expected
        assert "Link" not in response.headers  # the 1xx's headers are not the answer's

    assert (pool.open_connections, pool.idle_connections) == ((1, 1) if reused else (0, 0))
    assert await get(pool, "/next") == (200, b"ok")
    assert upstream.connections == (1 if reused else 2)


async def test_a_body_delimited_by_eof_completes_and_the_connection_is_dropped(
    stage: Stage,
) -> None:
    async def script(peer: Peer) -> None:
        if await peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
            peer.send(b"the end")
            # returning closes the connection: that is the end of the body

    upstream, pool = await stage.start(script)
    assert await get(pool, "/eof") == (200, b"until the end")
    assert (pool.open_connections, pool.idle_connections) == (0, 0)

    assert await get(pool, "/again") == (200, b"until the end")
    assert upstream.connections == 2


# --- 4. streamed uploads ------------------------------------------------------------------------
async def test_a_streamed_upload_of_known_length_sends_raw_bytes(stage: Stage) -> None:
    seen: list[tuple[bytes, bytes]] = []
    upstream, pool = await stage.start(recording(seen))

    body = parts(b"abc", b"", b"defg")
    async with await pool.request("POST", "/up", [("X-A", "1")], body, length=7) as response:
        assert await response.read() == b"ok"

    host = b"Host: 127.0.0.1:%d\r\n" % upstream.port
    head = b"POST /up HTTP/1.1\r\n" + host + b"X-A: 1\r\nContent-Length: 7\r\n\r\n"
    assert seen == [(head, b"abcdefg")]
    assert await get(pool, "/next") == (200, b"ok")
    assert upstream.connections == 1


async def test_a_streamed_upload_of_unknown_length_is_chunked(stage: Stage) -> None:
    received: asyncio.Future[tuple[bytes, list[bytes]]] = asyncio.Future()

    async def script(peer: Peer) -> None:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        received.set_result((head, await read_chunked(peer.reader)))
        peer.send(OK)
        await always(OK)(peer)

    upstream, pool = await stage.start(script)
    big = b"x" * 70000
    body = parts(b"hello", b"", b" ", big, b"!")  # an empty chunk must not end the body
    async with await pool.request("PUT", "/up", [], body) as response:
        assert await response.read() == b"ok"

    host = b"Host: 127.0.0.1:%d\r\n" % upstream.port
    head = b"PUT /up HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
    assert received.result() == (head, [b"hello", b" ", big, b"!"])
    assert await get(pool, "/next") == (200, b"ok")  # the terminating chunk left nothing behind
    assert upstream.connections == 1


async def test_an_early_answer_to_an_upload_is_returned_and_the_connection_dropped(
    stage: Stage,
) -> None:
    upload_stopped = asyncio.Event()
    cpi_saw_eof = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            yield b"x" * 1000
            await asyncio.Event().wait()  # the client's upload stalls: CPI will not wait for it
            yield b"never sent"
        finally:
            upload_stopped.set()

    async def script(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        assert await peer.reader.readexactly(1000) == b"x" * 1000
        peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        assert await peer.until_eof() == b""
        cpi_saw_eof.set()

    _, pool = await stage.start(script)
    async with await pool.request("POST", "/up", [], endless(), length=10**6) as response:
        assert (response.status, await response.read()) == (413, b"too big!")

    async with asyncio.timeout(WITHIN):
        await upload_stopped.wait()
        await cpi_saw_eof.wait()
    assert (pool.open_connections, pool.idle_connections) == (0, 0)


async def test_a_failing_upload_source_is_told_apart_from_cpi_failing(stage: Stage) -> None:
    """The forwarder answers a client's broken body as the client's fault, not CPI's."""
    cpi_saw_eof = asyncio.Event()

    class ClientGone(Exception):
        pass

    async def breaks() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise ClientGone("the client left")

    async def script(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.until_eof()
        cpi_saw_eof.set()

    _, pool = await stage.start(script)
    with pytest.raises(UploadFailed) as failed:
        await pool.request("POST", "/up", [], breaks(), length=10**6)
    assert isinstance(failed.value.reason, ClientGone)
    async with asyncio.timeout(WITHIN):
        await cpi_saw_eof.wait()  # half a request is never left on a pooled connection
    assert (pool.open_connections, pool.idle_connections) == (0, 0)


# --- 5. back-pressure ---------------------------------------------------------------------------
async def test_a_slow_reader_holds_back_a_large_answer_and_gets_all_of_it(stage: Stage) -> None:
    body = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the kernel buffers hold
    writers: list[asyncio.StreamWriter] = []

    async def script(peer: Peer) -> None:
        if await peer.request() is not None:
            writers.append(peer.writer)
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await always(OK)(peer)

    upstream, pool = await stage.start(script)
    async with await pool.request("GET", "/big", [], None) as response:
        chunks = response.iter_any()
        received = [await anext(chunks)]
        unsent = writers[0].transport.get_write_buffer_size
        # Read nothing more until the client stopped reading or CPI sent it all
        await until(lambda: not reading(response) or unsent() == 0, within=WITHIN)
        assert not reading(response)
        await until(lambda: unsent() > 0, within=WITHIN)  # CPI is blocked, not just slow
        peak = response._buffered
        async for chunk in chunks:
            peak = max(peak, response._buffered + len(chunk))
            received.append(chunk)

    assert peak <= _HIGH_WATER + 256 * 1024  # one socket read beyond the high-water mark
    assert b"".join(received) == body
    assert await get(pool, "/next") == (200, b"ok")
    assert upstream.connections == 1


# --- 6. read timeout ----------------------------------------------------------------------------
async def test_a_stall_mid_body_times_out_after_read_timeout(stage: Stage) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.until_eof()

    _, pool = await stage.start(script)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await pool.request("GET", "/stall", [], None, read_timeout=0.2)
    received = b""
    with pytest.raises(TimeoutError, match=r"CPI sent nothing for 0\.2 s"):
        async for chunk in response.iter_any():
            received += chunk
    elapsed = loop.time() - started

    assert received == b"abc"
    assert 0.2 <= elapsed < 0.2 + 0.5
    assert pool.open_connections == 0


async def test_no_answer_times_out_after_read_timeout(stage: Stage) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.until_eof()

    _, pool = await stage.start(script)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"CPI sent nothing for 0\.2 s"):
        await pool.request("GET", "/silent", [], None, read_timeout=0.2)
    elapsed = loop.time() - started

    assert 0.2 <= elapsed < 0.2 + 0.5
    assert pool.open_connections == 0


async def test_a_steady_trickle_is_not_a_timeout(stage: Stage) -> None:
    gap, timeout = 0.08, 0.3

    async def script(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(gap)  # CPI's pace, not a wait for the test
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            await asyncio.sleep(gap)
            peer.send(bytes([byte]))
        await always(OK)(peer)

    _, pool = await stage.start(script)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with await pool.request("GET", "/slow", [], None, read_timeout=timeout) as response:
        assert await response.read() == b"abcdef"

    assert loop.time() - started > timeout  # so only the gaps kept it alive
    assert pool.idle_connections == 1


async def paced(chunks: int, gap: float, stamps: list[float]) -> AsyncIterator[bytes]:
    """A client whose upload trickles in: one KiB every `gap` seconds."""
    loop = asyncio.get_running_loop()
    for _ in range(chunks):
        await asyncio.sleep(gap)  # the client's pace, not a wait for the test
        stamps.append(loop.time())
        yield b"u" * 1024


async def test_a_slow_upload_is_not_a_timeout(stage: Stage) -> None:
    """The read timeout is CPI's to keep; a client trickling its body in is not CPI silent."""
    gap, timeout = 0.08, 0.2
    stamps: list[float] = []
    _, pool = await stage.start(always(OK))
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = paced(6, gap, stamps)
    async with await pool.request("PUT", "/up", [], body, read_timeout=timeout) as response:
        assert (response.status, await response.read()) == (200, b"ok")

    assert stamps[-1] - started > 2 * timeout  # the upload alone outlasted the timeout
    assert pool.idle_connections == 1


async def test_after_a_slow_upload_cpi_gets_the_whole_timeout_to_answer(stage: Stage) -> None:
    timeout = 0.2
    stamps: list[float] = []
    answered = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()  # the whole body; then stays silent
        answered.set()
        await peer.until_eof()

    _, pool = await stage.start(script)
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError, match=r"CPI sent nothing for 0\.2 s"):
        await pool.request("POST", "/up", [], paced(4, 0.08, stamps), read_timeout=timeout)
    assert answered.is_set()
    assert timeout <= loop.time() - stamps[-1] < timeout + 0.5
    assert pool.open_connections == 0


async def test_cpi_that_stops_taking_the_upload_times_out(stage: Stage) -> None:
    """CPI reads the head and then nothing: once the socket buffers are full, the upload
    waits on CPI, and that wait is what the read timeout bounds."""
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        block = b"x" * (1 << 20)
        while sent < 1 << 30:  # far more than loopback's buffers hold
            sent += len(block)
            yield block

    async def script(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()  # never reads the body, never answers

    _, pool = await stage.start(script)
    with pytest.raises(TimeoutError, match=r"CPI took none of the upload for 0\.2 s"):
        await pool.request("POST", "/up", [], endless(), length=1 << 30, read_timeout=0.2)
    assert sent < 1 << 30  # stopped by the timeout, not by running out of body
    assert pool.open_connections == 0


# --- 7. broken upstream -------------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["reset", "fin"])
async def test_a_body_cut_short_raises_connection_closed(stage: Stage, ending: str) -> None:
    part_arrived = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await part_arrived.wait()
        if ending == "reset":
            peer.reset()
        # else returning closes the connection with a FIN

    _, pool = await stage.start(script)
    response = await pool.request("GET", "/cut", [], None)
    chunks = response.iter_any()
    received = b""
    while len(received) < 10:
        received += await anext(chunks)
    part_arrived.set()

    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(WITHIN):
            await anext(chunks)
    assert received == b"0123456789"
    assert pool.open_connections == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTPP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
)
async def test_a_malformed_answer_raises_protocol_error(stage: Stage, answer: bytes) -> None:
    _, pool = await stage.start(always(answer))
    with pytest.raises(ProtocolError):
        await pool.request("GET", "/", [], None)
    assert pool.open_connections == 0


async def test_a_malformed_chunk_raises_protocol_error_from_the_body(stage: Stage) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
    _, pool = await stage.start(always(answer))
    response = await pool.request("GET", "/", [], None)
    with pytest.raises(ProtocolError):
        await response.read()
    assert pool.open_connections == 0


async def test_a_refused_connection_fails_fast(stage: Stage) -> None:
    with socket.socket() as unused:  # bound but not listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        pool = stage.pool(f"http://127.0.0.1:{unused.getsockname()[1]}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
            await pool.request("GET", "/", [], None)
        assert loop.time() - started < 1.0
    assert pool.open_connections == 0


@pytest.mark.skipif(
    sys.platform != "linux", reason="relies on Linux dropping SYNs to a full backlog"
)
async def test_a_connect_that_hangs_fails_after_connect_timeout(stage: Stage) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its queue is full, SYNs are dropped
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            pool = stage.pool(f"http://127.0.0.1:{port}", connect_timeout=0.2)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConnectFailed, match=r"no connection within 0\.2 s"):
                async with asyncio.timeout(WITHIN):
                    await pool.request("GET", "/", [], None)
            assert 0.2 <= loop.time() - started < 1.0
        finally:
            for filler in fillers:
                filler.close()
    assert pool.open_connections == 0


# --- 8. a pooled connection CPI closed as the request went out ----------------------------------
def closes_on_second_request(answer: bytes = OK) -> Script:
    """The first connection answers once, then takes the next request and closes unanswered."""
    served = 0

    async def script(peer: Peer) -> None:
        nonlocal served
        served += 1
        if served > 1:
            await always(answer)(peer)
        elif await peer.request() is not None:
            peer.send(answer)
            await peer.request()

    return script


async def test_an_idempotent_request_on_a_stale_connection_is_retried_once(stage: Stage) -> None:
    upstream, pool = await stage.start(closes_on_second_request())
    assert await get(pool, "/one") == (200, b"ok")

    assert await get(pool, "/two") == (200, b"ok")
    assert upstream.lines() == [
        [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1"],
        [b"GET /two HTTP/1.1"],
    ]


async def test_a_post_on_a_stale_connection_is_not_sent_twice(stage: Stage) -> None:
    upstream, pool = await stage.start(closes_on_second_request())
    async with await pool.request("POST", "/one", [], b"first") as response:
        assert await response.read() == b"ok"

    with pytest.raises(ConnectionClosed):
        await pool.request("POST", "/two", [], b"second")

    seen = [line for lines in upstream.lines() for line in lines]
    assert seen == [b"POST /one HTTP/1.1", b"POST /two HTTP/1.1"]
    assert upstream.connections == 1


async def test_a_fresh_connection_closed_unanswered_is_not_retried(stage: Stage) -> None:
    async def close_unanswered(peer: Peer) -> None:
        await peer.request()

    upstream, pool = await stage.start(close_unanswered)
    with pytest.raises(ConnectionClosed):
        await get(pool, "/")
    assert upstream.connections == 1


async def test_a_stale_connection_that_began_an_answer_is_not_retried(stage: Stage) -> None:
    served = 0

    async def script(peer: Peer) -> None:
        nonlocal served
        served += 1
        await peer.request()
        peer.send(OK)
        await peer.request()
        peer.send(b"HTTP/1.1 50")  # CPI got this far: it saw the request

    upstream, pool = await stage.start(script)
    assert await get(pool, "/one") == (200, b"ok")
    with pytest.raises(ConnectionClosed):
        await get(pool, "/two")
    assert upstream.connections == 1


# --- 9. the connection limit --------------------------------------------------------------------
def held(gate: asyncio.Event, into: list[bytes]) -> Script:
    """Answers every request, but only once `gate` is set."""

    async def script(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            into.append(request[0].split(b"\r\n", 1)[0])
            await gate.wait()
            peer.send(OK)

    return script


async def test_with_limit_one_concurrent_requests_take_turns_on_one_connection(
    stage: Stage,
) -> None:
    gate, seen = asyncio.Event(), list[bytes]()
    upstream, pool = await stage.start(held(gate, seen), limit=1)

    first = asyncio.create_task(get(pool, "/a"))
    await until(lambda: seen == [b"GET /a HTTP/1.1"], within=WITHIN)
    second = asyncio.create_task(get(pool, "/b"))
    await until(lambda: len(pool._waiters) == 1, within=WITHIN)
    assert (upstream.connections, pool.open_connections) == (1, 1)
    gate.set()

    async with asyncio.timeout(WITHIN):
        assert (await first, await second) == ((200, b"ok"), (200, b"ok"))
    assert upstream.lines() == [[b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]]


async def test_no_more_than_limit_connections_ever_open(stage: Stage) -> None:
    gate, seen = asyncio.Event(), list[bytes]()
    upstream, pool = await stage.start(held(gate, seen), limit=3)

    tasks = [asyncio.create_task(get(pool, f"/{n}")) for n in range(10)]
    await until(lambda: len(seen) == 3 and len(pool._waiters) == 7, within=WITHIN)
    assert (upstream.connections, pool.open_connections) == (3, 3)
    gate.set()

    async with asyncio.timeout(WITHIN):
        assert await asyncio.gather(*tasks) == [(200, b"ok")] * 10
    assert (upstream.connections, upstream.most_open, pool.open_connections) == (3, 3, 3)
    assert sorted(seen) == sorted(b"GET /%d HTTP/1.1" % n for n in range(10))


async def test_a_failed_connect_frees_its_place_for_a_waiter(stage: Stage) -> None:
    with socket.socket() as unused:  # bound but not listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        pool = stage.pool(f"http://127.0.0.1:{unused.getsockname()[1]}", limit=1)
        tasks = [asyncio.create_task(get(pool, f"/{n}")) for n in range(2)]
        async with asyncio.timeout(WITHIN):
            results = await asyncio.gather(*tasks, return_exceptions=True)

    assert [type(result) for result in results] == [ConnectFailed, ConnectFailed]
    assert (pool.open_connections, len(pool._waiters)) == (0, 0)


async def test_a_cancelled_waiter_leaves_no_trace(stage: Stage) -> None:
    gate, seen = asyncio.Event(), list[bytes]()
    upstream, pool = await stage.start(held(gate, seen), limit=1)
    first = asyncio.create_task(get(pool, "/a"))
    await until(lambda: len(seen) == 1, within=WITHIN)
    waiting = asyncio.create_task(get(pool, "/cancelled"))
    await until(lambda: len(pool._waiters) == 1, within=WITHIN)

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(pool._waiters) == 0
    gate.set()

    async with asyncio.timeout(WITHIN):
        assert await first == (200, b"ok")
        assert await get(pool, "/c") == (200, b"ok")
    assert upstream.lines() == [[b"GET /a HTTP/1.1", b"GET /c HTTP/1.1"]]


async def test_a_waiter_cancelled_as_its_turn_came_passes_the_turn_on(stage: Stage) -> None:
    answer_a: asyncio.Future[None] = asyncio.Future()

    async def script(peer: Peer) -> None:
        await peer.request()
        await answer_a
        peer.send(OK)
        await always(OK)(peer)

    upstream, pool = await stage.start(script, limit=1)
    first = asyncio.create_task(get(pool, "/a"))
    await until(lambda: upstream.lines() == [[b"GET /a HTTP/1.1"]], within=WITHIN)
    woken = asyncio.create_task(get(pool, "/b"))
    await until(lambda: len(pool._waiters) == 1, within=WITHIN)
    third = asyncio.create_task(get(pool, "/c"))
    await until(lambda: len(pool._waiters) == 2, within=WITHIN)

    # A's answer puts the connection back and wakes B; B is cancelled before it resumes
    cancelled = at_next_turn(lambda: pool.idle_connections == 1, woken.cancel)
    answer_a.set_result(None)

    async with asyncio.timeout(WITHIN):
        await cancelled
        assert await first == (200, b"ok")
        assert await third == (200, b"ok")
    assert woken.cancelled()
    assert upstream.lines() == [[b"GET /a HTTP/1.1", b"GET /c HTTP/1.1"]]


# --- 10. cancellation ---------------------------------------------------------------------------
async def test_a_caller_cancelled_after_its_answer_does_not_abort_the_pooled_connection(
    stage: Stage,
) -> None:
    answer_a: asyncio.Future[None] = asyncio.Future()

    async def script(peer: Peer) -> None:
        await peer.request()
        await answer_a
        peer.send(OK)  # the whole answer: the connection goes back to the pool at once
        await always(OK)(peer)

    upstream, pool = await stage.start(script, limit=1)
    first = asyncio.create_task(pool.request("GET", "/a", [], None))
    await until(lambda: upstream.lines() == [[b"GET /a HTTP/1.1"]], within=WITHIN)
    second = asyncio.create_task(get(pool, "/b"))  # handed A's connection once A is done
    await until(lambda: len(pool._waiters) == 1, within=WITHIN)

    # A's head and body arrive in one read; A is cancelled before it resumes with its answer
    cancelled = at_next_turn(lambda: pool.idle_connections == 1, first.cancel)
    answer_a.set_result(None)

    async with asyncio.timeout(WITHIN):
        await cancelled
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == (200, b"ok")
    assert upstream.lines() == [[b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]]
    assert (pool.open_connections, pool.idle_connections) == (1, 1)


async def test_a_caller_cancelled_while_waiting_for_the_head_closes_its_connection(
    stage: Stage,
) -> None:
    cpi_saw_eof: asyncio.Future[bytes] = asyncio.Future()
    served = 0

    async def script(peer: Peer) -> None:
        nonlocal served
        served += 1
        if served == 1:
            await peer.request()
            cpi_saw_eof.set_result(await peer.until_eof())
        else:
            await always(OK)(peer)

    upstream, pool = await stage.start(script)
    waiting = asyncio.create_task(get(pool, "/a"))
    await until(lambda: upstream.lines() == [[b"GET /a HTTP/1.1"]], within=WITHIN)

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with asyncio.timeout(WITHIN):
        assert await cpi_saw_eof == b""
    assert (pool.open_connections, pool.idle_connections) == (0, 0)

    assert await get(pool, "/b") == (200, b"ok")
    assert upstream.lines() == [[b"GET /a HTTP/1.1"], [b"GET /b HTTP/1.1"]]


# --- 11. closing the pool -----------------------------------------------------------------------
async def test_close_aborts_open_connections_and_refuses_new_requests(stage: Stage) -> None:
    eofs: list[bytes] = []

    async def script(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            if request[0].startswith(b"GET /idle "):
                peer.send(OK)
            else:
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        eofs.append(await peer.until_eof())

    upstream, pool = await stage.start(script)
    busy = await pool.request("GET", "/busy", [], None)
    assert await get(pool, "/idle") == (200, b"ok")
    assert (pool.open_connections, pool.idle_connections) == (2, 1)

    await pool.close()

    assert (pool.open_connections, pool.idle_connections) == (0, 0)
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(WITHIN):
            await busy.read()
    await until(lambda: eofs == [b"", b""], within=WITHIN)
    with pytest.raises(ConnectFailed, match="shutting down"):
        await get(pool, "/after")
    assert upstream.connections == 2


async def test_close_fails_an_answer_running_until_eof_instead_of_ending_it(stage: Stage) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\n\r\nthe first part")
        await peer.until_eof()

    _, pool = await stage.start(script)
    response = await pool.request("GET", "/eof", [], None)
    chunks = response.iter_any()
    assert await anext(chunks) == b"the first part"

    await pool.close()

    with pytest.raises(ConnectionClosed):  # not a clean end: the body was cut short
        async with asyncio.timeout(WITHIN):
            await anext(chunks)


async def test_close_fails_waiters_for_a_connection(stage: Stage) -> None:
    gate, seen = asyncio.Event(), list[bytes]()
    upstream, pool = await stage.start(held(gate, seen), limit=1)
    first = asyncio.create_task(get(pool, "/a"))
    await until(lambda: len(seen) == 1, within=WITHIN)
    waiting = asyncio.create_task(get(pool, "/b"))
    await until(lambda: len(pool._waiters) == 1, within=WITHIN)

    await pool.close()

    async with asyncio.timeout(WITHIN):
        with pytest.raises(ConnectFailed, match="shutting down"):
            await waiting
        with pytest.raises(UpstreamError):
            await first
    assert upstream.connections == 1


# --- TLS ----------------------------------------------------------------------------------------
async def test_https_with_the_test_ca_keeps_the_connection_alive(
    stage: Stage, dev_ca: DevCA, ca_file: Path
) -> None:
    seen: list[tuple[bytes, bytes]] = []
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecure\r\n0\r\n\r\n"
    upstream, pool = await stage.start(
        recording(seen, chunked), server_tls=dev_ca.server_context(), client_tls=client_context()
    )

    for body in (b"over tls", None):
        async with await pool.request("POST", "/tls", [], body) as response:
            assert (response.status, await response.read()) == (200, b"secure")
    upload = parts(b"streamed ", b"over tls")
    async with await pool.request("POST", "/tls", [], upload) as response:
        assert await response.read() == b"secure"

    assert [body for _, body in seen] == [b"over tls", b"", b"streamed over tls"]
    assert upstream.connections == 1


async def test_a_connection_completing_after_close_is_not_used(
    stage: Stage, dev_ca: DevCA, ca_file: Path
) -> None:
    """close() while a TLS handshake is under way: the connection it yields is dropped, not
    handed to the request (it would outlive the pool, unknown to it)."""
    upstream, pool = await stage.start(
        always(OK), server_tls=dev_ca.server_context(), client_tls=client_context()
    )
    request = asyncio.ensure_future(get(pool, "/late"))
    closing: list[asyncio.Task[None]] = []
    async with asyncio.timeout(WITHIN):  # the handshake takes several turns of the loop
        await at_next_turn(
            lambda: pool._connecting == 1,
            lambda: closing.append(asyncio.ensure_future(pool.close())),
        )
        await closing[0]
        with pytest.raises(ConnectFailed, match="shutting down"):
            await request
    assert pool.open_connections == 0
    assert upstream.lines() in ([], [[]])  # nothing was sent on it


async def test_https_to_an_untrusted_certificate_fails_to_connect(
    stage: Stage, dev_ca: DevCA
) -> None:
    upstream, pool = await stage.start(
        always(OK), server_tls=dev_ca.server_context(), client_tls=ssl.create_default_context()
    )
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        await pool.request("GET", "/", [], None)
    assert (upstream.connections, pool.open_connections) == (0, 0)

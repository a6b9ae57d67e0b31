"""A lean HTTP/1.1 client for the one hop that is paid on every call: cpi-proxy -> CPI.

Why not aiohttp's ClientSession here: per request it builds a ClientRequest and runs cookie,
auth, proxy, redirect, tracing and timeout machinery this hop never uses; that was the largest
share of cpi-proxy's CPU per request. This client does only what the forwarder needs:

- a LIFO pool of keep-alive (TLS) connections to the one CPI origin, capped at `limit`;
- the request head and a small body leave in one write; larger bodies stream with
  back-pressure (Content-Length when known, else chunked);
- answers are parsed by httptools (llhttp, the parser aiohttp and Node.js use), and body
  chunks are handed over with back-pressure: reading pauses while 256 KiB wait unread;
- `read_timeout` is the longest wait for the next bytes from CPI (aiohttp's sock_read), kept by
  one timer per request rather than one per read. While a body streams up, only time CPI
  spends not taking it counts: a slow client is not CPI's fault (aiohttp starts the timer
  once the body is sent);
- a pooled connection that turns out closed before any answer is retried once on a new
  connection, for idempotent methods only (RFC 9112 §9.3.1), like aiohttp does.

XSUAA and CSRF fetches stay on aiohttp's ClientSession: they are rare and want its features.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})  # an empty body still says Content-Length: 0
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """CPI could not be reached, closed the connection, or spoke broken HTTP."""


class ConnectFailed(UpstreamError):
    pass


class ConnectionClosed(UpstreamError):
    pass


class ProtocolError(UpstreamError):
    pass


class UploadFailed(ConnectionClosed):
    """The request body's source failed (not CPI): `reason` is what it raised."""

    def __init__(self, message: str, reason: BaseException | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def _fresh(exc: BaseException) -> BaseException:
    """A new exception like `exc`, to raise. Raising the stored one would hang the raising
    frames (and the Response they hold, with its buffered body) on its traceback: a cycle that
    only the cyclic GC frees, which a busy proxy runs rarely. The soak saw RSS climb from it."""
    try:
        return type(exc)(*exc.args)
    except TypeError:  # an exception class with another signature: no copy, no cycle risk
        return exc


class Response:
    """One answer from CPI. Its body is read with `read()` or `iter_any()`; leaving
    `async with` before the body is complete closes the connection instead of pooling it."""

    __slots__ = (
        "__weakref__",
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_exc",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, conn: _Connection, status: int, reason: str, headers: CIMultiDictProxy[str]
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn: _Connection | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        """The whole body (for small answers: usually already here, so no wait at all)."""
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts += self._chunks
                self._chunks.clear()
                self._buffered = 0
                if self._conn is not None:
                    self._conn.resume()
            elif self._exc is not None:
                raise _fresh(self._exc)
            elif self._done:
                return b"".join(parts)
            else:
                await self._wait()

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; raises UpstreamError or TimeoutError if CPI breaks off."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._conn is not None and self._buffered <= _LOW_WATER:
                    self._conn.resume()
                yield chunk
            elif self._exc is not None:
                raise _fresh(self._exc)
            elif self._done:
                return
            else:
                await self._wait()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        """Give up on the rest of the body: the connection cannot be reused."""
        if self._conn is not None and not self._done:
            self._conn.abort()
        self._conn = None

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- fed by the connection --------------------------------------------------------------
    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, exc: BaseException | None = None) -> None:
        if exc is None:
            self._done = True
        elif not self._done:
            self._exc = exc
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Dead:
    """What a closed connection's parser reports to its callbacks: nothing."""


_DEAD_PARSER = httptools.HttpResponseParser(_Dead())


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._method = ""
        self._reason = b""
        self._header_list: list[tuple[str, str]] = []
        self._framed = True
        self._got_bytes = False
        self._paused_reading = False
        self._paused_writing = False
        self._drain: asyncio.Future[None] | None = None
        self._timeout = 0.0
        self._last_heard = 0.0  # CPI's last sign of life: bytes sent, or upload bytes taken
        self._timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_heard = self._loop.time()
        self._got_bytes = True
        if self._head is None and self._response is None:
            self._fail(ProtocolError("CPI sent bytes nobody asked for"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("CPI tried to switch protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"CPI sent malformed HTTP ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        ended_by_cpi = not self.closed  # not our own abort (the pool closing)
        self.closed = True
        response = self._response
        if response is not None and not self._framed and exc is None and ended_by_cpi:
            self._complete()  # the body ran until the connection closed, as announced
        else:
            self._fail(ConnectionClosed("CPI closed the connection"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionClosed("CPI closed the connection"))
        self._pool._forget(self)
        # Break the cycles through the parser's callbacks and the (TLS) transport, so a dead
        # connection and its 256 KiB TLS buffer go at once, not at the next full GC: the soak
        # saw RSS climb by the hundreds of MiB from dead connections waiting for the GC.
        self.transport = None
        self._parser = _DEAD_PARSER

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._last_heard = self._loop.time()  # from now on, CPI holds the upload back

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._last_heard = self._loop.time()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._header_list = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them, so the server side writes the same bytes back out.
        self._header_list.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or self._head is None:
            return  # 1xx: informational, the real answer follows
        headers = CIMultiDictProxy(CIMultiDict(self._header_list))
        self._framed = (
            "Content-Length" in headers
            or "Transfer-Encoding" in headers
            or status in (204, 304)
            or self._method == "HEAD"
        )
        head, self._head = self._head, None
        if head.done():  # the caller was cancelled and is about to abort this connection
            return
        reason = self._reason.decode("utf-8", "surrogateescape")
        response = Response(self, status, reason, headers)
        self._response = response
        head.set_result(response)
        if self._method == "HEAD":  # llhttp cannot be told to skip a HEAD answer's body
            self._complete(reusable=False)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and body:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None:
            self._complete()

    # --- request side ------------------------------------------------------------------------
    def send(
        self, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool
    ) -> asyncio.Future[Response]:
        """Write the request; the future resolves with the answer's head. A plain function,
        not a coroutine: one level less for every resumption of the request's task."""
        self._method = method
        self._got_bytes = False
        head_future: asyncio.Future[Response] = self._loop.create_future()
        self._head = head_future
        assert self.transport is not None
        if isinstance(body, bytes):
            self.transport.write(head + body if len(body) <= 16384 else head)
            if len(body) > 16384:
                self.transport.write(body)
        else:
            self.transport.write(head)
            if body is not None:
                self._sender = asyncio.ensure_future(self._stream(body, chunked))
                self._sender.add_done_callback(self._sent)
        self._arm()
        return head_future

    def abandon(self, head_future: asyncio.Future[Response]) -> None:
        """Our caller gave up. Mid-request, the connection cannot be reused. If the answer had
        already arrived (the task was cancelled before it resumed), the connection may be back
        in the pool serving someone else: only an unfinished body is still ours to drop."""
        if head_future.cancelled():
            self.abort()
        elif head_future.exception() is None:
            head_future.result().close()

    async def _stream(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        assert self.transport is not None
        async for chunk in body:
            if self.closed:
                raise ConnectionClosed("CPI closed the connection during the upload")
            if chunk:
                self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._paused_writing:
                self._drain = self._loop.create_future()
                await self._drain
        if chunked and not self.closed:
            self.transport.write(b"0\r\n\r\n")

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sender = None  # a failed task's traceback holds this connection: no cycle
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, UpstreamError):  # CPI went away mid-upload
            self._fail(ConnectionClosed(str(exc)))
        elif exc is not None:  # the body's source failed; CPI has half a request: no reuse
            self._fail(UploadFailed(f"the upload ended ({exc.__class__.__name__}: {exc})", exc))
        else:
            self._last_heard = self._loop.time()  # CPI's turn to answer starts now

    # --- read timeout: one timer per request, rescheduled only when it fires ------------------
    def _arm(self) -> None:
        if self._timeout > 0:
            self._last_heard = self._loop.time()
            self._timer = self._loop.call_at(self._last_heard + self._timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._head is None and self._response is None:
            return
        now = self._loop.time()
        deadline = self._last_heard + self._timeout
        uploading = self._sender is not None and not self._paused_writing
        if self._paused_reading or uploading:  # our reader or the client is slow, not CPI
            deadline = now + self._timeout
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
        elif self._paused_writing:
            self._fail(TimeoutError(f"CPI took none of the upload for {self._timeout:g} s"))
        else:
            self._fail(TimeoutError(f"CPI sent nothing for {self._timeout:g} s"))

    # --- flow control and endings ------------------------------------------------------------
    def pause(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self._last_heard = self._loop.time()
            self.transport.resume_reading()

    def _complete(self, *, reusable: bool = True) -> None:
        response, self._response = self._response, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if response is not None:
            response._finish()
        self.resume()
        # CPI answered before taking the whole upload: it will not read the rest, so this
        # connection cannot carry another request.
        sending = self._sender is not None and not self._sender.done()
        if not reusable or sending or self.closed or not self._parser.should_keep_alive():
            self.abort()
        else:
            self._sender = None
            self._pool._release(self)

    def _fail(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        response, self._response = self._response, None
        if response is not None:
            response._finish(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        if self.transport is not None:
            self.transport.abort()
        self._pool._forget(self)

    @property
    def answered(self) -> bool:
        """Whether CPI sent any byte of an answer to the current request."""
        return self._got_bytes


class Pool:
    """Keep-alive connections to one origin, most recently used first."""

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        limit: int = 100,
        idle_timeout: float = 15.0,
    ) -> None:
        url = URL(base_url)
        if url.host is None or url.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {base_url}")
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl_context if url.scheme == "https" else None
        authority = url.host if url.is_default_port() else f"{url.host}:{url.port}"
        self._head_prefix = f"Host: {authority}\r\n"
        self._base_path = url.raw_path.rstrip("/")
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._idle_timeout = idle_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        length: int | None = None,
        read_timeout: float = 0.0,
    ) -> Response:
        """Send `method target` (path and query, already encoded) and wait for the answer's
        head. A bytes body sets Content-Length; a streamed one uses `length` or chunks."""
        chunked = False
        lines = [f"{method} {self._base_path}{target} HTTP/1.1\r\n", self._head_prefix]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None and length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif body is not None:
            lines.append("Transfer-Encoding: chunked\r\n")
            chunked = True
        elif method in _WITH_BODY:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ProtocolError("a header value holds a line break; refusing to send it")
        head = text.encode("utf-8", "surrogateescape")
        retry = method in IDEMPOTENT and not (body is not None and not isinstance(body, bytes))
        while True:
            conn = self._take_idle() or await self._acquire()
            conn._timeout = read_timeout
            answer = conn.send(method, head, body, chunked)
            try:
                return await answer
            except asyncio.CancelledError:
                conn.abandon(answer)
                raise
            except ConnectionClosed:
                if not (retry and conn.reused and not conn.answered):
                    raise
                retry = False  # a pooled connection CPI had closed: once more on a fresh one
            finally:
                # The future keeps its exception, whose traceback keeps this frame: without the
                # future in it, that is no cycle, and the request's body is freed at once.
                del answer

    def _take_idle(self) -> _Connection | None:
        """The most recently used live connection, if any (LIFO keeps TLS sessions warm)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                conn.reused = True
                return conn
            conn.abort()
        return None

    async def _acquire(self) -> _Connection:
        """A new connection, once the pool is under its limit."""
        while self._limit and len(self._open) + self._connecting >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # our turn came as we were cancelled: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            idle = self._take_idle()
            if idle is not None:
                return idle
        return await self._connect()

    async def _connect(self) -> _Connection:
        if self._closing:
            raise ConnectFailed("the proxy is shutting down")
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None

        def factory() -> _Connection:
            nonlocal conn
            conn = _Connection(self)
            return conn

        self._connecting += 1  # counts against the limit until it is open or has failed
        opened = False
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    factory,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
            opened = True
        except TimeoutError:
            raise ConnectFailed(f"no connection within {self._connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"{exc.__class__.__name__}: {exc}") from None
        finally:
            self._connecting -= 1
            if not opened:
                self._wake()  # the place it held is free for a waiter
        assert conn is not None
        if self._closing:  # closed while connecting: this one would outlive the pool
            conn.abort()
            raise ConnectFailed("the proxy is shutting down")
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self._closing:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self._idle_timeout, self._reap)
        self._wake()

    def _reap(self) -> None:
        """Close connections idle for idle_timeout; one timer per pool, not one per request."""
        self._reaper = None
        now = time.monotonic()
        while self._idle and now - self._idle[0].idle_since >= self._idle_timeout:
            self._idle.popleft().abort()  # the left end holds the least recently used
        if self._idle:
            wait = self._idle[0].idle_since + self._idle_timeout - now
            self._reaper = asyncio.get_running_loop().call_later(wait, self._reap)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the proxy is shutting down"))
        await asyncio.sleep(0)  # let the transports run their connection_lost

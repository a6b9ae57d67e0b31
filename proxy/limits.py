"""Client connection limits for `serve`: a deadline and a size cap for each request head, a cap
on connections.

Why: aiohttp bounds each line of a request head (32 KiB here) and the number of its header fields
(128), but not their sum, so one head could hold ~4 MiB. Nor does it bound the time a head may
take to arrive. Its keep-alive timer starts when a connection opens and incoming bytes do not
push it back, so a client sending a head a byte at a time (slowloris) keeps its connection for
the whole keep-alive timeout (75 s under `serve`). Nor does it cap connections: many such clients
exhaust the file descriptors, then accept() fails and new clients wait in the backlog instead of
getting an answer.

    ClientLimits     the protocol factory `serve` listens with (`LimitedSite`)
     +-- _Handler    aiohttp's RequestHandler, plus a deadline and a size cap for each request head
     +-- _Refusal    beyond max_clients: 503 JSON with Connection: close, then the socket closes

A request head starts with the first bytes that arrive while no request body is still expected;
it ends when aiohttp's parser yields the request. Its deadline (`header_timeout`) and its size
(`max_head_bytes`, request line and header fields with their line ends) count from there. Bytes
of a body are neither timed nor counted (bodies may stream as long as their route allows), nor is
an idle keep-alive connection: aiohttp's keep-alive timer closes it. A read that is larger than
the room left under the cap is fed to the parser in pieces of that room, so a head that has not
ended when it fills the cap is refused before the parser sees more of it, whatever the reads.
Not counted: the bytes of a head that share a piece with the end of the request before it (only
pipelining clients send those), so such a head may pass the cap by up to that piece: less than
the cap behind a head, at most one read (256 KiB under asyncio and uvloop) behind a body.

When the deadline passes, an idle connection gets a 408 JSON answer with Connection: close and is
closed; one with an answer still being written (a pipelined head behind it) is just closed. A
head that fills the cap gets a 431 JSON answer the same way, but the connection then only stops
sending and drops what the client still sends, until the client closes or REFUSAL_LINGER passes:
such a client is usually still writing, and closing a socket with unread bytes resets it, which
can destroy the answer before the client reads it.

The answers are written straight to the socket: no request exists at that point, so the app's
`handle` (the one place that renders ProxyErrors) never sees them.

aiohttp internals relied on (aiohttp 3.14; tests/test_limits.py fails if they change):
- handlers are built as `Server.__call__` builds them, from `Server._loop` and `Server._kwargs`;
- `RequestHandler.data_received` appends each parsed request head, with its body stream, to
  `RequestHandler._messages`, and a head its parser refuses as something other than a
  `RawRequestMessage` with the parser's exception as `.exc` (aiohttp then answers 400 and
  closes). A body the parser refuses mid-way (a bad chunk) ends up the same way, its stream
  left waiting: `_Handler` sets the exception on it, so the request's handler learns of it;
- `RequestHandler._waiter` is pending while the handler waits for the next request: aiohttp's
  own keep-alive timer uses the same test for "idle".
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import weakref
from typing import Any, cast

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from yarl import URL

from proxy.logs import ParseErrors
from proxy.metrics import Metrics

log = logging.getLogger(__name__)

REFUSAL_LINGER = 1.0  # seconds a refused client has to read the 503/431 before the socket closes
LINGERING_REFUSALS = 64  # beyond this many, refused sockets close at once (a flood's fds)
FD_RESERVE = 64  # descriptors for the listener, logs, the metrics port, DNS, ...


def _answer(status: str, error: str, description: str, extra: str = "") -> bytes:
    body = json.dumps({"error": error, "error_description": description}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ClientLimits:
    """Builds aiohttp's request handler for each connection, up to `max_clients` at once."""

    def __init__(
        self,
        server: web.Server,
        *,
        header_timeout: float,
        max_clients: int,
        max_head_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_clients = max_clients
        self.max_head_bytes = max_head_bytes
        self._server = server
        self.loop: asyncio.AbstractEventLoop = server._loop  # as Server.__call__ builds them
        self._kwargs: dict[str, Any] = server._kwargs
        self._metrics = metrics or Metrics()
        self._metrics.track_clients(lambda: self.open)
        # Weak: a handler whose connection was never made (a failed accept) frees its slot.
        self._handlers: weakref.WeakSet[_Handler] = weakref.WeakSet()
        self.lingering = 0  # refused sockets still open (503s and 431s)
        self.timed_out = _answer(
            "408 Request Timeout",
            "request_timeout",
            f"the request head did not arrive within {header_timeout:g} s",
        )
        self.busy = _answer(
            "503 Service Unavailable",
            "too_many_connections",
            f"this proxy process serves {max_clients} connections at most; retry shortly",
            "Retry-After: 1\r\n",
        )
        self.too_large = _answer(
            "431 Request Header Fields Too Large",
            "request_header_fields_too_large",
            f"the request line and header fields together exceed {max_head_bytes} bytes",
        )

    @property
    def open(self) -> int:
        """Client connections being served (refused ones not counted)."""
        return len(self._handlers)

    def __call__(self) -> asyncio.Protocol:
        if len(self._handlers) >= self.max_clients:
            self._metrics.clients_refused.inc()
            return _Refusal(self)
        handler = _Handler(self._server, self, loop=self.loop, **self._kwargs)
        self._handlers.add(handler)
        return handler

    def head_timed_out(self) -> None:
        self._metrics.head_timeouts.inc()

    def head_too_large(self) -> None:
        self._metrics.heads_too_large.inc()

    def closed(self, handler: _Handler) -> None:
        self._handlers.discard(handler)


class _Handler(web.RequestHandler):
    __slots__ = ("__weakref__", "_body", "_deadline", "_head", "_limits", "_linger")

    def __init__(self, server: web.Server, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # of the last request head parsed
        self._head = 0  # bytes of the request head in progress
        self._linger: asyncio.TimerHandle | None = None  # set once a 431 is written

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # refused: dropped unread until the client closes or the linger ends
        while True:
            between_requests = self._body is None or self._body.is_eof()
            if between_requests:  # at most the room left under the cap, the rest after
                room = self._limits.max_head_bytes - self._head
                piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            else:
                piece, data = data, b""  # a body's bytes, and whatever follows them
            parsed = len(self._messages)
            super().data_received(piece)
            if self.transport is None:
                return
            if len(self._messages) > parsed:
                body = self._body
                message, self._body = self._messages[-1]
                self._head = 0
                self._stop_deadline()
                if not isinstance(message, RawRequestMessage):
                    if body is not None and not body.is_eof():
                        # A malformed body (a bad chunk): aiohttp's parser drops its stream
                        # without a word, and its reader would wait for bytes never to come.
                        body.set_exception(message.exc)
                    return  # refused by the parser: aiohttp answers 400 and closes
            elif between_requests and piece:
                self._head += len(piece)
                if self._head >= self._limits.max_head_bytes:  # full, and the head goes on
                    self._head_too_large()
                    return
                if self._deadline is None:
                    self._deadline = self._limits.loop.call_later(
                        self._limits.header_timeout, self._head_too_slow
                    )
            if not data:
                return

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused is plain text quoting the refused
        bytes; every other answer of the proxy is JSON, so this one is too (bytes elided)."""
        answer = super().handle_error(request, status, exc, message)  # logs; closes after
        if not isinstance(exc, HttpProcessingError):
            return answer
        what = ParseErrors.summary(exc.message)
        body = {
            "error": "invalid_request",
            "error_description": f"not a valid HTTP/1.1 request ({type(exc).__name__}: {what})",
        }
        response = web.json_response(body, status=answer.status)
        response.force_close()
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_deadline()
        if self._linger is not None:
            self._linger.cancel()
            self._limits.lingering -= 1
        self._limits.closed(self)
        super().connection_lost(exc)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _idle(self) -> bool:
        """No answer in progress or queued: no head parsed yet on this connection (aiohttp may
        not even be waiting for one yet), or aiohttp waits for the next one."""
        return self._body is None or (self._waiter is not None and not self._waiter.done())

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        self._limits.head_timed_out()
        if self._idle():
            self.transport.write(self._limits.timed_out)
        self.force_close()

    def _head_too_large(self) -> None:
        self._stop_deadline()
        self._limits.head_too_large()
        transport = self.transport
        assert transport is not None
        if not self._idle():
            self.force_close()
            return
        transport.write(self._limits.too_large)
        if self._limits.lingering >= LINGERING_REFUSALS or not transport.can_write_eof():
            self.force_close()
            return
        transport.write_eof()
        self._limits.lingering += 1
        self._linger = self._limits.loop.call_later(REFUSAL_LINGER, self.force_close)


class _Refusal(asyncio.Protocol):
    """Answers 503 at once, then drains what the client sends until it closes or the linger
    ends: closing a socket with unread bytes resets it, and the reset can destroy the answer
    before the client reads it."""

    def __init__(self, limits: ClientLimits) -> None:
        self._limits = limits
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transports
        transport.write(self._limits.busy)
        if self._limits.lingering >= LINGERING_REFUSALS or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._limits.lingering += 1
        self._linger = self._limits.loop.call_later(REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # never parsed: the answer is the same whatever was asked

    def eof_received(self) -> bool:
        return False  # the client is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self._limits.lingering -= 1


class LimitedSite(web.BaseSite):
    """`web.TCPSite` with `ClientLimits` as the protocol factory (plain HTTP: Cloud Foundry's
    router terminates TLS)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        header_timeout: float,
        max_clients: int,
        max_head_bytes: int,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port = host, port
        self._limits = (header_timeout, max_clients, max_head_bytes, metrics)
        self._reuse_port = reuse_port or None
        self.clients: ClientLimits | None = None

    @property
    def port(self) -> int:
        """The bound port once started (settings may ask for 0: any free port)."""
        return self._port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        header_timeout, max_clients, max_head_bytes, metrics = self._limits
        self.clients = ClientLimits(
            server,
            header_timeout=header_timeout,
            max_clients=max_clients,
            max_head_bytes=max_head_bytes,
            metrics=metrics,
        )
        listener = await asyncio.get_running_loop().create_server(
            self.clients,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        self._server = listener
        self._port = listener.sockets[0].getsockname()[1]


def fd_budget(max_clients: int, max_connections: int) -> int:
    """Raise this process's soft file-descriptor limit towards what the limits need; returns the
    limit in force. If the hard limit is lower, clients beyond it would wait in the backlog
    instead of getting the 503, so say so."""
    needed = max_clients + max_connections + LINGERING_REFUSALS + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        log.warning(
            "the file-descriptor limit (%d) is below the %d that CPI_PROXY_MAX_CLIENTS=%d and"
            " CPI_PROXY_MAX_CONNECTIONS=%d need: when it runs out, new clients wait unanswered;"
            " raise `ulimit -n` or lower CPI_PROXY_MAX_CLIENTS",
            soft, needed, max_clients, max_connections,
        )  # fmt: skip
    return soft

"""HTTP/1.1 to a backend process (or to the app), on kept-alive connections: asyncio protocols
with httptools' parser, so a relayed request costs a few callbacks, not a client library's
object graph (aiohttp's client was a quarter of the proxy's CPU under load; see front.py).

A `Connection` carries one exchange at a time and reports it to a `Sink`; a `Pool` keeps the
idle ones of one origin. Bodies arrive de-chunked; the caller frames what it writes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Protocol, cast

import httptools

CONNECT_TIMEOUT_S = 5.0
JOIN_BELOW = 16 * 1024  # a shorter body goes out joined to its head (uvloop's one-buffer fast path)
IDLE_S = 50.0  # a pooled connection idle longer is closed, not reused (below the app's keep-alive)


class Sink(Protocol):
    """Who hears an exchange's answer."""

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer's status and headers (names in lower case)."""

    def body(self, data: bytes) -> None: ...
    def flush(self) -> None:
        """What body() was given from one read may go out now (one write for many chunks)."""

    def end(self) -> None: ...
    def fail(self, exc: BaseException, answered: bool) -> None:
        """The connection broke; `answered`: after some of the answer had arrived."""

    def writable(self, ready: bool) -> None:
        """The request's upload may go on (True) or should wait (False)."""


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.answered = False
        self.head_only = False  # the answer to HEAD: headers, no body whatever they announce
        self.reused = False  # had carried an exchange before this one
        self.paused = False  # reading held for a client that cannot take more
        self.idle_since = 0.0
        self._headers: list[tuple[bytes, bytes]] = []

    # the exchange
    def send(self, sink: Sink, head: bytes, body: bytes = b"", head_only: bool = False) -> None:
        assert self.transport is not None
        self.sink, self.answered, self.head_only = sink, False, head_only
        write(self.transport, head, body)

    def write(self, data: bytes) -> None:
        """More of the request's body."""
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """The exchange is given up (the client went away): the connection is closed, so a
        backend stops generating for nobody."""
        self.sink = None
        if self.transport is not None:
            self.transport.close()

    def pause(self, paused: bool) -> None:
        """Stop reading the answer while the client cannot take more (and go on)."""
        if self.transport is not None and not self.transport.is_closing():
            self.paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.sink is None:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(exc)
            return
        if self.sink is not None:
            self.sink.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.pool.forget(self)
        if self.sink is not None:
            self._broken(exc or ConnectionResetError("the server closed the connection"))

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.writable(True)

    # httptools
    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return  # informational (100 Continue): the answer follows
        if self.sink is not None:
            self.sink.head(self.parser.get_status_code(), self._headers)
        if self.head_only:  # the parser would wait for the body HEAD's answer never has
            sink, self.sink = self.sink, None
            self.abort()
            if sink is not None:
                sink.end()

    def on_body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.body(data)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        sink, self.sink = self.sink, None
        keep = self.parser.should_keep_alive()
        if sink is not None:
            sink.end()  # first: it may give the connection up (an answer that came before the whole upload)
        if keep and self.transport is not None and not self.transport.is_closing():
            self.reused = True
            if self.paused:  # held for the client just answered (the answer's last write filled its buffer)
                self.pause(False)
            self.pool.release(self)
        else:
            self.abort()

    def _broken(self, exc: BaseException) -> None:
        sink, self.sink = self.sink, None
        self.abort()
        if sink is not None:
            sink.fail(exc, self.answered)


def write(transport: asyncio.Transport, head: bytes, body: bytes) -> None:
    """A message's head and body in one system call; a long body is not copied to join them
    (a writev: a 200 KB prompt cost two copies of itself on its way through)."""
    if len(body) < JOIN_BELOW:
        transport.write(head + body if body else head)
    else:
        transport.writelines((head, body))


class Pool:
    """Idle connections to one origin (a TCP port on 127.0.0.1, or a unix socket path)."""

    def __init__(self, port: int | None = None, path: str | None = None) -> None:
        self.port, self.path = port, path
        self.idle: list[Connection] = []
        self.closed = False

    def take(self) -> Connection | None:
        """The most recently used idle connection, or None (open one)."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since < IDLE_S and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.abort()
        return None

    async def open(self) -> Connection:
        loop = asyncio.get_running_loop()
        factory: Callable[[], Connection] = lambda: Connection(self)  # noqa: E731
        if self.path is None:
            _, conn = await asyncio.wait_for(
                loop.create_connection(factory, "127.0.0.1", self.port or 0), CONNECT_TIMEOUT_S
            )
            return conn
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connected here: uvloop refuses abstract names
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, self.path), CONNECT_TIMEOUT_S)
            _, conn = await loop.create_unix_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        return conn

    def release(self, conn: Connection) -> None:
        if self.closed:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        self.closed = True
        for conn in self.idle[:]:
            conn.abort()
        self.idle.clear()

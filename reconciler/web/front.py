"""xgen's listening socket: JSON `/v1` requests for a model that serves now go straight to its
process; everything else is relayed, bytes as they come, to the Starlette app (status, page,
metrics, and every `/v1` request that needs explaining, waiting or queueing).

Why not only the app: measured with benchmarks/proxy.py on 2 cores, uvicorn + Starlette +
aiohttp's client cost ~0.3 ms of CPU per proxied request, which capped the proxy at ~3,000
requests/s and put 128 streams' first bytes 40-66 ms late. Here a request costs two httptools
parses and a few callbacks (6-7x the requests/s, see docs/benchmarks.md). The decision which
requests may take this path is the proxy's (`Proxy.direct`: the same routing rules); the app
keeps the rest, and sees each client's address through `x-forwarded-for` set here.

HTTP/1.1 with keep-alive and pipelining (answers in order); request bodies are relayed as they
arrive (uploads stay streaming), answers re-framed for the client (chunked or content-length),
SSE passed through chunk by chunk with flow control both ways; a client that goes away closes
its backend connection (the generation stops). A pooled backend connection closed before it
answered anything is retried once on a fresh one.

A slow or stuck client holds nothing for long (nginx's header, body and send timeouts, in one
setting): a request head over MAX_HEAD_BYTES is refused with 431; one whose head or body stops
arriving for `server.client_timeout_s` gets 408; a client that takes nothing of its answer for as
long is disconnected, which closes its backend connection (a backend slot is not held by a
reader that went silent). The front's own pauses (pipelining, a full upload) do not count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from http import HTTPStatus
from typing import Any, cast

import httptools

from reconciler.spec import ServerSettings
from reconciler.web import metrics
from reconciler.web.proxy import (
    CORE,
    HOP_HEADERS,
    ROUTED,
    Direct,
    Proxy,
    answer_tokens,
    anthropic_error,
    not_answered,
    openai_error,
    unsupported,
)
from reconciler.web.upstream import Connection, Pool, write

JSON_PATHS = frozenset({*CORE, *ROUTED})
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
KEEP_ALIVE_S = 5.0  # an idle client connection is closed after this (uvicorn's default)
FILES_WARNING_S = 60.0  # how often a front near its open files limit says so
MAX_HEAD_BYTES = 64 * 1024  # a request's line and headers (nginx allows 32 KiB, uvicorn 16 KiB)
# Headers that describe one hop, not the message; xgen sets its own for each side.
HOP = frozenset({*(h.encode() for h in HOP_HEADERS), b"expect"})  # the front answers Expect itself
TO_APP_DROP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"expect", b"te", b"upgrade"}
    | {b"x-forwarded-for", b"x-forwarded-proto", b"proxy-authorization"}  # the app trusts these from us only
)
FROM_APP_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"trailer"})
SSE_DROP = frozenset({b"cache-control", b"x-accel-buffering"})
SSE_ADD = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

log = logging.getLogger(__name__)


class Front:
    """The server: client connections, a pool per backend process, the app's pool, drains."""

    def __init__(self, proxy: Proxy, app_socket: str, files: int) -> None:
        self.proxy = proxy
        self.files = files  # the open files limit: a client and its backend connection take two
        self.crowded_at = -FILES_WARNING_S  # when the last warning about it was logged
        self.app = Pool(path=app_socket)
        self.pools: dict[int, tuple[int | None, Pool]] = {}  # by backend port: (pid, pool)
        self.clients: set[Client] = set()
        self.server: asyncio.AbstractServer | None = None
        self.closing = False
        self.now = time.monotonic()  # the sweep's clock: client timestamps need no clock read per request
        metrics.CLIENTS.set_function(lambda: len(self.clients))
        proxy.store.listeners.append(self._on_event)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "drained" and isinstance(data.get("port"), int):
            held = self.pools.pop(data["port"], None)  # nothing in flight there: let the process stop at once
            if held is not None:
                held[1].close()

    def pool(self, port: int, pid: int | None) -> Pool:
        """Keyed by port and pid: a port reused by a new process must not get the old one's connections."""
        held = self.pools.get(port)
        if held is not None and held[0] == pid:
            return held[1]
        if held is not None:
            held[1].close()
        pool = Pool(port=port)
        self.pools[port] = (pid, pool)
        return pool

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Client(self), sock=sock, backlog=2048)
        self._sweep()

    def _sweep(self) -> None:
        """Each second: close connections idle for KEEP_ALIVE_S and time out stuck clients. One
        timer for all (a timer per request was 2% of the CPU)."""
        if self.closing:
            return
        self.now = time.monotonic()
        spec = self.proxy.get_spec()
        patience = (spec.server if spec is not None else ServerSettings()).client_timeout_s
        for client in list(self.clients):
            client.check(self.now, patience)
        if 2 * len(self.clients) > 0.8 * self.files and self.now - self.crowded_at > FILES_WARNING_S:
            self.crowded_at = self.now
            log.warning(
                "%d clients connected, near the open files limit (%d): new connections will be dropped; "
                "raise LimitNOFILE (systemd) or ulimit -n",
                len(self.clients),
                self.files,
            )
        asyncio.get_running_loop().call_later(1.0, self._sweep)

    async def drain(self, timeout: float) -> None:
        """Stop accepting; idle connections close now, busy ones after their answer (bounded)."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            client.close_if_idle()
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.close()

    def close(self) -> None:
        for client in list(self.clients):
            client.abort()  # not close(): a client that reads nothing would keep its socket
        for _, pool in self.pools.values():
            pool.close()
        self.app.close()


class Client(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        self.exchanges: deque[Exchange] = deque()  # the first is being answered; others were pipelined
        self.incoming: Exchange | None = None
        self.writing_paused = False
        # timestamps of Front.now (None: not so)
        self.idle_since: float | None = front.now  # no request in
        self.head_since: float | None = None  # a request's head is being read
        self.head_bytes = 0  # read while that head was incomplete
        self.last_read = front.now
        self.stalled_since: float | None = None  # the client takes nothing of its answer
        self.held = False  # the front does not read (pipelining, an upload's backend is full)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if isinstance(peer, tuple) else b"127.0.0.1"
        self.front.clients.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.front.now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(b"400 Bad Request", b"protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._refuse(b"400 Bad Request", f"malformed HTTP request: {exc}".encode())
            return
        if self.head_since is not None:  # a head goes on past this read (the parser holds it)
            self.head_bytes += len(data)  # whole reads: the first may end a pipelined body too
            if self.head_bytes > MAX_HEAD_BYTES:
                metrics.CLIENTS_DROPPED.labels("head_too_large").inc()
                self._refuse(
                    b"431 Request Header Fields Too Large",
                    b"the request line and headers are over %d bytes" % MAX_HEAD_BYTES,
                )

    def connection_lost(self, exc: BaseException | None) -> None:
        self.front.clients.discard(self)
        pending = list(self.exchanges)
        self.exchanges.clear()
        for exchange in pending:
            exchange.gone()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.stalled_since = self.front.now
        if self.exchanges:
            self.exchanges[0].pause(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.stalled_since = None
        if self.exchanges:
            self.exchanges[0].pause(False)

    # httptools
    def on_message_begin(self) -> None:
        self.idle_since = None
        self.head_since, self.head_bytes = self.front.now, 0
        self.incoming = Exchange(self)

    def on_url(self, url: bytes) -> None:
        assert self.incoming is not None
        self.incoming.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.incoming is not None
        self.incoming.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self.incoming
        assert exchange is not None and self.transport is not None
        self.head_since = None
        exchange.fields = dict(reversed(exchange.headers))
        exchange.method = self.parser.get_method()
        exchange.keep_alive = self.parser.should_keep_alive()
        exchange.http11 = self.parser.get_http_version() == "1.1"
        self.exchanges.append(exchange)
        if exchange.header(b"expect").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # its body is wanted, whoever answers
        if len(self.exchanges) == 1:
            exchange.start()

    def on_body(self, data: bytes) -> None:
        if self.incoming is not None:
            self.incoming.feed(data)

    def on_message_complete(self) -> None:
        exchange, self.incoming = self.incoming, None
        if exchange is not None:
            exchange.complete()
        if len(self.exchanges) > 1:
            self.hold(True)  # pipelined: read no further until the queue moves

    # answering
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def finished(self, exchange: Exchange) -> None:
        """The first exchange's answer is written: the next one's turn, or the end of the connection."""
        if not self.exchanges or self.exchanges[0] is not exchange:
            return
        self.exchanges.popleft()
        if not exchange.keep_alive or self.front.closing:
            self.idle_since = self.front.now  # gone once the answer is out (the sweep sees to it if never)
            self.close()
            return
        if self.exchanges:
            self.exchanges[0].start()
        elif self.incoming is None:
            self.idle_since = self.front.now
        if self.held:
            self.hold(False)

    def hold(self, held: bool) -> None:
        """Stop reading the client (or go on): the time the front holds it back is not its delay."""
        if self.transport is None:
            return
        self.held = held
        if held:
            self.transport.pause_reading()
            return
        self.last_read = self.front.now
        if self.head_since is not None:
            self.head_since = self.front.now
        self.transport.resume_reading()

    def check(self, now: float, patience: float) -> None:
        """The sweep's look at this connection: idle too long, or a client stuck for `patience` s."""
        late = now - patience
        if self.stalled_since is not None and self.stalled_since < late:  # idle or not: its answer is unsent
            log.info("client %s took nothing of its answer for %g s: disconnected", self.peer.decode(), patience)
            metrics.CLIENTS_DROPPED.labels("answer_not_taken").inc()
            self.abort()
        elif self.idle_since is not None:
            if self.idle_since < late - KEEP_ALIVE_S:
                self.abort()  # closed long ago, and still here: its last answer is not taken
            elif self.idle_since < now - KEEP_ALIVE_S:
                self.close()
        elif self.held:
            return
        elif self.head_since is not None and self.head_since < late:
            self._time_out("head_timeout", f"the request's head did not arrive within {patience:g} s")
        elif self.incoming is not None and self.last_read < late:
            self._time_out("body_timeout", f"the request's body stopped arriving for {patience:g} s")

    def _time_out(self, reason: str, why: str) -> None:
        """408 when nothing of an answer has gone out (no earlier pipelined one either), then closed."""
        why += " (server.client_timeout_s)"
        log.info("client %s: %s: disconnected", self.peer.decode(), why)
        metrics.CLIENTS_DROPPED.labels(reason).inc()
        pending = self.exchanges
        if not pending or (len(pending) == 1 and pending[0] is self.incoming and pending[0].status == 0):
            self._refuse(b"408 Request Timeout", why.encode())
        else:
            self.abort()

    def close_if_idle(self) -> None:
        if not self.exchanges and self.incoming is None:
            self.close()

    def close(self) -> None:
        """Closed once what was written has gone out."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Closed now, whatever is unsent."""
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self, status: bytes, why: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = json.dumps({"error": {"message": why.decode(errors="replace"), "type": "invalid_request_error"}})
            self.transport.write(
                b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, len(body), body.encode())
            )
        self.close()


class Exchange:
    """One request and its answer: straight to a model's process (`direct`), or through the app.
    It is the upstream connection's Sink."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.url = b""
        self.path = ""  # the URL's path, once it starts
        self.headers: list[tuple[bytes, bytes]] = []  # names in lower case
        self.fields: dict[bytes, bytes] = {}  # the same, by name (the first of a repeated one)
        self.method = b"GET"
        self.keep_alive = True
        self.http11 = True
        self.parts: list[bytes] = []  # the body so far (until it can be sent)
        self.received = False  # the whole body is in
        self.candidate = False  # may go direct (decided once, when it starts)
        self.to_app = False  # relayed to the app
        self.chunked_in = False  # the request body comes chunked (relayed chunked to the app)
        self.conn: Connection | None = None
        self.streaming_to: Connection | None = None  # the app connection the body streams to
        self.direct: Direct | None = None
        self.endpoint = ""
        self.retried = False
        self.request_head = b""  # of a direct request, sent with direct.body (again on a stale connection)
        # the answer
        self.status = 0
        self.sse = False
        self.chunked_out = False
        self.body_out: list[bytes] | None = None  # a direct non-SSE answer, held to count its tokens
        self.out_headers: list[tuple[bytes, bytes]] = []
        self.usage = b""
        self.tokens = 0  # generated, from the answer's usage
        self.pending: list[bytes] = []  # relayed pieces of the answer not yet written
        self.done = False
        self.t0 = time.perf_counter()

    def header(self, name: bytes) -> bytes:
        return self.fields.get(name, b"")

    # the request
    def start(self) -> None:
        """This exchange is first in line: send it where it goes (a direct one once its body is in)."""
        self.path = self.url.split(b"?", 1)[0].decode("latin-1")
        self.chunked_in = b"chunked" in self.header(b"transfer-encoding").lower()
        self.candidate = self._may_go_direct()
        if self.candidate:
            if self.received:
                self._dispatch()
        else:
            self._to_app()

    def feed(self, data: bytes) -> None:
        if self.to_app and self.chunked_in:  # relayed as it came: in chunks
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.streaming_to is not None:
            self.streaming_to.write(data)
        elif not self.done:
            self.parts.append(data)

    def complete(self) -> None:
        self.received = True
        if self.streaming_to is not None and self.chunked_in:
            self.streaming_to.write(b"0\r\n\r\n")
        if self.candidate:  # started, waiting for its body
            self._dispatch()

    def _may_go_direct(self) -> bool:
        if self.method != b"POST" or self.path not in JSON_PATHS or self.chunked_in:
            return False
        try:
            length = int(self.header(b"content-length") or b"0")
        except ValueError:
            return False
        spec = self.client.front.proxy.get_spec()
        return spec is not None and length <= spec.server.max_body_bytes

    def _dispatch(self) -> None:
        body = b"".join(self.parts)
        self.endpoint = self.path.removeprefix("/v1/")
        proxy = self.client.front.proxy
        direct = proxy.direct(self.endpoint, self.header(b"authorization"), self.header(b"x-api-key"), body)
        if direct is None:
            self.parts = [body]
            self._to_app()
            return
        self.direct = direct
        info = direct.info
        port = info.port or 0
        lines = [
            b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-length: %d\r\n" % (self.url, port, len(direct.body))
        ]
        lines += [b"%s: %s\r\n" % pair for pair in self.headers if pair[0] not in HOP]  # never the client's key
        lines.append(b"\r\n")
        self.request_head = b"".join(lines)
        self.parts = []
        proxy.begin(info.name, port)
        self._send(self.client.front.pool(port, info.pid))

    def _send(self, pool: Pool, fresh: bool = False) -> None:
        conn = None if fresh else pool.take()
        if conn is not None:
            self.conn = conn
            conn.send(self, self.request_head, self.direct.body if self.direct else b"")
            if self.client.writing_paused:
                conn.pause(True)
        else:
            asyncio.get_running_loop().create_task(self._open(pool))

    async def _open(self, pool: Pool) -> None:
        try:
            conn = await pool.open()
        except (OSError, TimeoutError) as exc:
            self.fail(exc, False)
            return
        if self.done:  # the client went away meanwhile
            pool.release(conn)
            return
        self.conn = conn
        if self.client.writing_paused:
            conn.pause(True)
        if self.direct is not None:
            conn.send(self, self.request_head, self.direct.body)
            return
        conn.send(self, self._app_head(), b"".join(self.parts), head_only=self.method == b"HEAD")
        self.parts = []
        if not self.received:
            self.streaming_to = conn
        elif self.chunked_in:
            conn.write(b"0\r\n\r\n")

    def _to_app(self) -> None:
        """Relay to the app over its socket: the client's request as it came (framing aside),
        its address in x-forwarded-for."""
        self.to_app = True
        if self.chunked_in:
            self.parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in self.parts]
        asyncio.get_running_loop().create_task(self._open(self.client.front.app))

    def _app_head(self) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method, self.url)]
        lines += [b"%s: %s\r\n" % pair for pair in self.headers if pair[0] not in TO_APP_DROP]
        lines.append(b"x-forwarded-for: %s\r\n" % self.client.peer)
        if self.chunked_in:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif length := self.header(b"content-length"):
            lines.append(b"content-length: %s\r\n" % length)
        lines.append(b"\r\n")
        return b"".join(lines)

    # Sink: the answer
    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """`headers`: names in lower case (upstream.py)."""
        self.status = status
        fields = dict(reversed(headers))  # the first of a repeated name, as for requests
        self.sse = fields.get(b"content-type", b"").startswith(b"text/event-stream")
        if self.direct is not None:
            kept = [pair for pair in headers if pair[0] not in HOP]
            if not self.sse:
                self.body_out = []
                self.out_headers = kept
                return
            self._write_head([*(p for p in kept if p[0] not in SSE_DROP), *SSE_ADD], None)
            return
        no_body = self.method == b"HEAD" or status in (204, 304)
        self._write_head([p for p in headers if p[0] not in FROM_APP_DROP], fields.get(b"content-length"), no_body)

    def body(self, data: bytes) -> None:
        if self.body_out is not None:
            self.body_out.append(data)
            return
        if self.sse and b'"usage"' in data:
            self.usage = data  # a copy of the chunk that carries usage (usually the last)
        self.pending.append(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked_out else data)

    def flush(self) -> None:
        if self.pending:  # every chunk of one read in one write: a backend that outruns the client costs fewer calls
            self.client.write(self.pending[0] if len(self.pending) == 1 else b"".join(self.pending))
            self.pending = []

    def end(self) -> None:
        if self.done:
            return
        self.flush()
        if self.body_out is not None:
            self._answer_held()
        elif self.chunked_out:
            self.client.write(b"0\r\n\r\n")
        if not self.received:  # answered before the whole upload came: the connection cannot go on
            self.keep_alive = False
            if self.streaming_to is not None:
                self.streaming_to.abort()
        self._finish()

    def fail(self, exc: BaseException, answered: bool) -> None:
        if self.done:
            return
        direct = self.direct
        if direct is not None and not answered and not self.retried and self.conn is not None and self.conn.reused:
            # a kept-alive connection the backend had just closed (llama-server closes idle and
            # well-used ones): nothing was answered, so send it once more on a fresh connection
            self.retried = True
            self.conn = None
            self._send(self.client.front.pool(direct.info.port or 0, direct.info.pid), fresh=True)
            return
        if self.status and self.body_out is None:  # the answer had begun: it can only be cut off
            self.keep_alive = False
            self.client.close()
            self._finish()
            return
        if direct is not None:
            self._error(not_answered(direct.info, exc, began=bool(self.status)))
        else:
            self._error(openai_error(503, f"xgen's app did not answer: {exc!r}", "service_unavailable"))

    def writable(self, ready: bool) -> None:
        if not self.received:
            self.client.hold(not ready)

    # the client
    def pause(self, paused: bool) -> None:
        if self.conn is not None:
            self.conn.pause(paused)

    def gone(self) -> None:
        """The client went away: the backend connection is closed (that stops a generation)."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.abort()
        self._finish(status=str(self.status) if self.status else "499")

    # helpers
    def _write_head(
        self, headers: list[tuple[bytes, bytes]], length: bytes | None, no_body: bool = False, body: bytes = b""
    ) -> None:
        """The answer's head (and `body`, in the same write: one system call)."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, REASONS.get(self.status, b"Unknown"))]
        lines += [b"%s: %s\r\n" % pair for pair in headers]
        if length is not None:
            lines.append(b"content-length: %s\r\n" % length)
        elif not no_body:
            if self.http11:
                self.chunked_out = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the end of the connection
        if not self.keep_alive or self.client.front.closing:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        if self.client.transport is not None:
            write(self.client.transport, b"".join(lines), body)

    def _answer_held(self) -> None:
        """A direct, non-streamed answer: counted, and explained when the backend lacks the endpoint."""
        assert self.body_out is not None and self.direct is not None
        content = b"".join(self.body_out)
        info = self.direct.info
        if (explained := unsupported(info, self.path, self.status, content)) is not None:
            self._error(explained)
            return
        self._write_head(self.out_headers, b"%d" % len(content), body=content)
        self.tokens = answer_tokens(info.name, self.endpoint, self.status, content)

    def _error(self, response: Any) -> None:
        """xgen's own error answer (a Starlette JSONResponse), in Anthropic's shape on /v1/messages;
        a direct request is counted with its status."""
        if self.path.startswith("/v1/messages"):
            response = anthropic_error(response)
        self.status = response.status_code
        self.chunked_out = False
        body = bytes(response.body)
        headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
        self._write_head(headers, b"%d" % len(body), body=body)
        self._finish()

    def _finish(self, status: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.conn = None
        if self.direct is not None:
            info = self.direct.info
            if self.sse:
                self.tokens = metrics.count_stream_tokens(info.name, self.usage)
            self.client.front.proxy.done(
                info.name, info.port or 0, status or str(self.status), self.t0, self.direct.gate, self.tokens
            )
        self.client.finished(self)


def app_socket_name() -> str:
    """An abstract unix socket for the app (Linux: no file to leave behind), unique to this run."""
    return f"\0xgen-app-{os.getpid()}-{secrets.token_hex(8)}"

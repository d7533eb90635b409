"""The OpenAI-compatible `/v1` proxy: route by `model`, stream bytes through, never buffer.

Routing (`route()`) is a pure decision over the spec and the model states; the handler does the
I/O: one pooled aiohttp session per backend port, SSE chunks forwarded as they arrive, the
upstream connection closed in a `finally` so a client that goes away cancels the generation.

Why aiohttp and not httpx here: measured with benchmarks/proxy.py, httpx/httpcore took 84% of
the proxy's CPU and capped it at ~420 requests/s at concurrency 16 on 2 cores (the pool issue
that moved LiteLLM off httpx too); the rest of xgen keeps httpx, off the hot path.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from reconciler.policy import apply_params
from reconciler.spec import ModelSpec, ServerSettings, Spec
from reconciler.state import ModelInfo, ModelState
from reconciler.store import StateStore
from reconciler.supervisor import remote_auth
from reconciler.web import metrics
from reconciler.web.activity import Activity
from reconciler.web.formfield import FormField, boundary_of
from reconciler.web.gate import Gate
from reconciler.web.jsonbody import JsonBody

HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "authorization",
    "content-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "x-api-key",
}
# Endpoints every backend serves; for the others a 404/501 from the backend is explained.
CORE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# The other APIs clients speak, routed by the `model` in the JSON body like chat
ROUTED = (
    "/v1/responses",
    "/v1/responses/input_tokens",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/v1/score",
    "/infill",
    "/completion",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/v1/audio/speech",
)
# multipart uploads, routed by their `model` form field without holding the file in memory
UPLOADS = ("/v1/audio/transcriptions", "/v1/audio/translations")
# Endpoints that generate text (path less /v1/)
GENERATE = frozenset({"chat/completions", "completions", "responses", "messages", "/completion", "/infill"})
# Rerank endpoints (path less /v1/): a request naming no model goes to the one rerank model
RERANK = frozenset({"rerank", "reranking", "/rerank", "score"})
# OpenAI error types → Anthropic's, for clients of /v1/messages
ANTHROPIC_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status, headers=headers
    )


def anthropic_error(response: JSONResponse) -> JSONResponse:
    """xgen's own error in the shape Anthropic clients parse (`{"type": "error", "error": …}`)."""
    error = json.loads(bytes(response.body))["error"]
    status = response.status_code
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": error["message"]}}, status_code=status, headers=headers
    )


@dataclass(slots=True)  # not frozen: built for every request, and a frozen __init__ costs three times as much
class Direct:
    info: ModelInfo  # the serving process
    body: bytes  # what it is sent
    gate: Gate | None  # the turn taken under max_concurrent (left in done())


def key_ok(spec: Spec | None, authorization: bytes, x_api_key: bytes) -> bool:
    """Whether the request may use /v1: no key configured, or the right one as a bearer token
    (or in `x-api-key`, which Anthropic clients send)."""
    key = spec.server.api_key if spec else None
    if not key:
        return True
    return hmac.compare_digest(authorization, f"Bearer {key}".encode()) or hmac.compare_digest(x_api_key, key.encode())


@dataclass(slots=True)  # not frozen: see Direct
class Route:
    model: str  # the xgen model that serves it
    upstream_model: str  # what the backend is asked for (the model, a LoRA adapter, a remote's name)
    variant: str | None = None  # `model:variant`: that parameter set applies


def _to(spec: Spec, name: str, variant: str | None = None) -> Route:
    model = spec.models.get(name)
    return Route(name, (model.remote_model if model else None) or name, variant)


def route(
    spec: Spec, requested: str | None, endpoint: str, active: str | None, loaded: dict[str, ModelInfo]
) -> Route | str:
    """The model for a request, or an error text (answered 404 model_not_found). Pure.

    A name that is no model, alias or adapter is refused, so a client's typo is seen, unless
    `server.unknown_model: active`; a request without `model` goes to the active model."""
    if requested:
        name = spec.resolve(requested)
        if name is not None:
            return _to(spec, name)
        for base, model in spec.models.items():
            if any(a.name == requested for a in model.lora):
                return Route(base, requested)
        if (variant := spec.resolve_variant(requested)) is not None:
            return _to(spec, *variant)
        if spec.server.unknown_model == "reject":
            return unknown_model(spec, requested)
    kind = "embedding" if endpoint == "embeddings" else "rerank" if endpoint in RERANK else None
    if kind is not None:  # the one model of that kind, when the request names none
        fitting = [n for n, m in spec.served.items() if m.server_type == kind]
        if len(fitting) == 1:
            return _to(spec, fitting[0])
        running = [n for n in fitting if n in loaded and loaded[n].state is ModelState.LOADED]
        if len(running) == 1:
            return _to(spec, running[0])
        article = "an" if kind == "embedding" else "a"
        return f"name {article} {kind} model in `model`: {', '.join(fitting) or 'none configured'}"
    if active is None:
        return f"the request names no model and no active model is set; name one of: {served_names(spec)}"
    return _to(spec, active)


def wrong_kind(server_type: str, endpoint: str) -> str | None:
    """Why a model of `server_type` cannot answer `endpoint`, or None. Pure."""
    if endpoint == "embeddings" and server_type != "embedding":
        return f"is an {server_type} model; embeddings need a model with server_type: embedding in models.yaml"
    if server_type == "rerank" and endpoint in GENERATE:
        return "is a rerank model (server_type: rerank); it answers /v1/rerank, not generation"
    return None


def unknown_model(spec: Spec, requested: str) -> str:
    return f"model '{_clip(requested)}' does not exist; this server serves: {served_names(spec)}"


def served_names(spec: Spec, limit: int = 20) -> str:
    """Every name a request may use (models, aliases, adapters), shortened when long."""
    names = [n for name, m in spec.models.items() for n in routable_names(name, m)]
    shown = ", ".join(names[:limit]) or "no models"
    return shown + (f" … and {len(names) - limit} more (GET /v1/models)" if len(names) > limit else "")


def routable_names(name: str, model: ModelSpec) -> list[str]:
    """The names a request may use for a model: its own, aliases, adapters, `name:variant`s."""
    bases = [name, *model.aliases]
    return [*bases, *(a.name for a in model.lora), *(f"{b}:{v}" for v in model.variants for b in bases)]


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


# States a wanted model passes through on its way (back) to LOADED; None: not started yet.
WAIT_WHILE: frozenset[ModelState | None] = frozenset({ModelState.LOADING, ModelState.UNLOADING, None})


class Proxy:
    def __init__(self, store: StateStore, get_spec: Any, inflight: dict[int, int]) -> None:
        self.store = store
        self.get_spec = get_spec  # () -> Spec | None: the spec the daemon runs
        self.inflight = inflight  # per backend port: a drain waits for its own process's requests
        self.clients: dict[str, tuple[int | None, aiohttp.ClientSession]] = {}  # by origin: (pid, pool)
        self.gates: dict[str, Gate] = {}  # per model with max_concurrent
        self.activity = Activity()  # the page's sparklines
        self._closing: set[asyncio.Task[None]] = set()
        store.listeners.append(self._on_event)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "drained" and isinstance(data.get("port"), int):
            self._close(local(data["port"]))  # nothing is in flight there: let its process stop at once

    def _close(self, origin: str) -> None:
        held = self.clients.pop(origin, None)
        if held is not None and not held[1].closed:
            closing = asyncio.get_running_loop().create_task(held[1].close())
            self._closing.add(closing)  # held until done: a task nobody references may vanish
            closing.add_done_callback(self._closing.discard)

    def client(self, origin: str, pid: int | None) -> aiohttp.ClientSession:
        """One keep-alive pool per backend process (or remote origin), sized for many concurrent
        streams. Keyed by origin and pid: a port reused by a new process must not get the old
        one's dead connections."""
        held = self.clients.get(origin)
        if held is not None and held[0] == pid and not held[1].closed:
            return held[1]
        self._close(origin)
        client = aiohttp.ClientSession(
            base_url=origin,
            connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,  # bytes through as the backend sent them
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.clients[origin] = (pid, client)
        return client

    async def close(self) -> None:
        for _, client in self.clients.values():
            await client.close()

    def check_key(self, request: Request) -> Response | None:
        headers = request.headers
        if not key_ok(
            self.get_spec(), headers.get("authorization", "").encode(), headers.get("x-api-key", "").encode()
        ):
            return openai_error(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None

    async def models(self, request: Request) -> Response:
        if (denied := self.check_key(request)) is not None:
            return denied
        spec: Spec | None = self.get_spec()
        data = []
        for name, model in spec.served.items() if spec else ():
            info = self.store.models.get(name)
            serving = info is not None and info.state is ModelState.LOADED
            if not serving and model.desired != "on_demand":
                continue  # a pinned model that does not serve now is not offered
            meta = {
                "backend": info.backend if info else None,  # chosen when it loads
                "server_type": model.server_type,
                "desired": model.desired,
                "resident": serving,  # an on-demand model that is not is loaded by the first request
            }
            for served in routable_names(name, model):
                data.append(
                    {
                        "id": served,
                        "object": "model",
                        "created": int(info.started_at or 0) if info else 0,
                        "owned_by": "xgen",
                        "root": name,
                        "meta": meta,
                    }
                )
        return JSONResponse({"object": "list", "data": data})

    def direct(self, endpoint: str, authorization: bytes, x_api_key: bytes, body: bytes) -> Direct | None:
        """The fast path's decision (front.py): where a JSON request goes and the body it is
        sent with, when it can go straight to a local backend that serves now; None when the
        app must answer it (anything to explain, wait for or queue: a wrong key, an unknown
        name, a model loading or on demand, a full gate, a remote backend). The same rules as
        the app's path: route(), wrong_kind(), _rewrite(); a gate's turn is taken if returned."""
        spec: Spec | None = self.get_spec()
        if spec is None or not key_ok(spec, authorization, x_api_key) or len(body) > spec.server.max_body_bytes:
            return None
        try:
            doc = JsonBody(body)
        except ValueError:
            return None
        name = doc.model
        if name is not None and not isinstance(name, str):
            return None
        model = spec.models.get(name) if name else None
        decision: Route | None = None  # named by its own name, no rules: the client's bytes go as they are
        if model is None or not model.as_sent:
            routed = route(spec, name, endpoint, self.store.active, self.store.models)
            if isinstance(routed, str):
                return None
            decision, name, model = routed, routed.model, spec.models[routed.model]
        info = self.store.models.get(name)
        if (
            info is None
            or info.state is not ModelState.LOADED
            or info.backend == "remote"
            or not info.port
            or wrong_kind(model.server_type, endpoint) is not None
        ):
            return None
        if decision is None and not info.spec.lora:  # adapters the running process has: selected per request
            payload = body
        else:
            try:
                payload = _rewrite(doc, decision or Route(name, name), model, info)
            except ValueError:
                return None
        gate = None
        if model.max_concurrent is not None:
            gate = self.gate(name)
            if not gate.try_enter(model.max_concurrent):
                return None  # the app queues it
        return Direct(info, payload, gate)

    def gate(self, name: str) -> Gate:
        """`name`'s admission gate, made on its first request under max_concurrent."""
        gate = self.gates.get(name)
        if gate is None:  # not setdefault: its default would build a Gate on every request
            gate = self.gates[name] = Gate(name)
        return gate

    def begin(self, name: str, port: int) -> None:
        """A request goes to a model's process: counted in flight until done()."""
        self.store.touch(name)
        self.inflight[port] = self.inflight.get(port, 0) + 1
        metrics.STATS.begin(name)

    async def forward(self, request: Request) -> Response:
        """Route a request by the `model` in its body and pass it through to that backend, at the
        same path (OpenAI, Anthropic Messages, OpenAI Responses and the backends' own endpoints)."""
        response = await self._forward(request)
        if isinstance(response, JSONResponse) and request.url.path.startswith("/v1/messages"):
            return anthropic_error(response)  # only xgen's own errors are JSONResponse here
        return response

    async def _admit(self, request: Request) -> Spec | Response:
        """The spec to route with, or the answer for a request that goes no further (no key, no
        spec yet, a declared body over the limit). Just after start, until the first plan is
        handed out (the file may be settling: written a moment before), the request waits for
        it, as it would for a load."""
        if (denied := self.check_key(request)) is not None:
            return denied
        if not self._routed():  # starting: the first pass is on its way
            await self.store.wait_until(self._routed, ServerSettings().load_wait_s)
        spec: Spec | None = self.get_spec()
        if spec is None:
            return openai_error(
                503, "no valid models.yaml loaded yet", "service_unavailable", headers={"Retry-After": "5"}
            )
        if int(request.headers.get("content-length") or 0) > spec.server.max_body_bytes:
            return _too_large(spec.server.max_body_bytes)
        return spec

    def _routed(self) -> bool:
        """A plan was handed out (routing, the active model, is in place), or none will be soon:
        the file is invalid, or its plan refused."""
        store = self.store
        return store.routed or store.spec_error is not None or store.plan_errors is not None

    async def _forward(self, request: Request) -> Response:
        endpoint = request.url.path.removeprefix("/v1/")
        t0 = time.perf_counter()
        spec = await self._admit(request)
        if isinstance(spec, Response):
            return spec
        limit = spec.server.max_body_bytes
        try:
            body = await _read_body(request, limit)
        except ClientDisconnect:
            return Response(status_code=499)
        if body is None:
            return _too_large(limit)
        try:
            doc = JsonBody(body)  # finds `model` without parsing the prompt
        except ValueError as exc:
            return not_json(exc)
        requested = doc.model
        if requested is not None and not isinstance(requested, str):
            return openai_error(400, "`model` must be a string", "invalid_request_error", "invalid_model")
        return await self._route_and_send(request, spec, endpoint, requested, body, t0, doc)

    async def forward_form(self, request: Request) -> Response:
        """A multipart upload (audio transcriptions and translations): routed by its `model`
        field and forwarded byte for byte. The upload is never held in memory: what arrives
        before the field is spooled (to disk past 1 MiB), then everything streams through."""
        boundary = boundary_of(request.headers.get("content-type", ""))
        if boundary is None:
            return await self.forward(request)
        t0 = time.perf_counter()
        spec = await self._admit(request)
        if isinstance(spec, Response):
            return spec
        limit = spec.server.max_body_bytes
        field = FormField(boundary, "model")
        spool = tempfile.SpooledTemporaryFile(max_size=2**20)  # noqa: SIM115 (closed by the body stream)
        chunks = request.stream().__aiter__()
        size = 0
        try:
            while field.found is None:
                chunk = await chunks.__anext__()
                size += len(chunk)
                if size > limit:
                    spool.close()
                    return _too_large(limit)
                spool.write(chunk)
                field.feed(chunk)
        except StopAsyncIteration:
            pass
        except ClientDisconnect:
            spool.close()
            return Response(status_code=499)

        async def body() -> AsyncIterator[bytes]:
            sent = size
            with spool:
                spool.seek(0)
                while block := spool.read(2**16):
                    yield block
            async for chunk in chunks:
                sent += len(chunk)
                if sent > limit:
                    raise ValueError(f"request body over {limit} bytes")  # the upstream request breaks off
                yield chunk

        return await self._route_and_send(
            request, spec, request.url.path.removeprefix("/v1/"), field.found or None, body(), t0
        )

    async def _route_and_send(
        self,
        request: Request,
        spec: Spec,
        endpoint: str,
        requested: str | None,
        body: bytes | AsyncIterator[bytes],
        t0: float,
        doc: JsonBody | None = None,
    ) -> Response:
        """Route by the requested name (waiting for a loading or on-demand model) and send; a JSON
        body (`doc`) gets its `model` (and llama-server's LoRA selection) rewritten where needed."""
        decision = route(spec, requested, endpoint, self.store.active, self.store.models)
        if isinstance(decision, str) and self.store.settling:
            # a save is settling: a model it adds becomes routable within settle_ms
            await self.store.wait_settled(spec.server.settle_ms / 1000 + 1.0)
            spec = self.get_spec() or spec
            decision = route(spec, requested, endpoint, self.store.active, self.store.models)
        if isinstance(decision, str):
            return openai_error(404, decision, "invalid_request_error", "model_not_found")
        name = decision.model
        if (mismatch := wrong_kind(spec.models[name].server_type, endpoint)) is not None:
            return openai_error(400, f"model '{name}' {mismatch}", "invalid_request_error", "wrong_model_type")
        info = self.store.models.get(name)
        serving = info is not None and info.state is ModelState.LOADED
        if not serving and doc is not None and _shows_loading(spec, name, endpoint, doc):
            return StreamingResponse(
                self._loading(request, spec, decision, endpoint, body, t0, doc),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                media_type="text/event-stream",
            )
        if not serving:
            info = await self._wait_serving(name, spec)
        if info is None or info.state is not ModelState.LOADED or info.endpoint is None:
            return self._unavailable(name, info, spec)
        return await self._deliver(request, spec, decision, info, endpoint, body, t0, doc)

    async def _wait_serving(self, name: str, spec: Spec) -> ModelInfo | None:
        """Wait for a model that does not serve now: an on-demand one is asked for, a pinned one
        may be loading or between the stop and the start of a reload."""
        if name in spec.on_demand:
            return await self._demand(name, spec)
        if name in spec.loaded:
            return await self.store.wait_for(name, spec.server.load_wait_s, WAIT_WHILE)
        return self.store.models.get(name)

    async def _deliver(
        self,
        request: Request,
        spec: Spec,
        decision: Route,
        info: ModelInfo,
        endpoint: str,
        body: bytes | AsyncIterator[bytes],
        t0: float,
        doc: JsonBody | None,
    ) -> Response:
        """The model serves: apply its parameter rules, rewrite `model` (and llama-server's LoRA
        selection) where needed, take a turn under max_concurrent, send."""
        name = decision.model
        model = spec.models[name]
        if doc is not None:
            try:
                body = _rewrite(doc, decision, model, info)
            except ValueError as exc:  # the scan routed it; the parse a rule needs finds it malformed
                return not_json(exc)
        gate = None
        if model.max_concurrent is not None:
            gate = self.gate(name)
            gone = functools.partial(_disconnected, request) if isinstance(body, bytes) else None  # upload: unread
            refused = await gate.enter(model.max_concurrent, model.max_queue, model.queue_timeout_s, gone)
            if refused is not None:
                metrics.STATS.answered(name, "429")
                return openai_error(429, refused, "requests", "rate_limit_exceeded", headers={"Retry-After": "1"})
        return await self._send(request, info, endpoint, body, t0, gate=gate)

    async def _loading(
        self,
        request: Request,
        spec: Spec,
        decision: Route,
        endpoint: str,
        body: bytes | AsyncIterator[bytes],
        t0: float,
        doc: JsonBody,
    ) -> AsyncIterator[bytes]:
        """A streaming chat request for a model that is loading (server.loading_messages): the
        stream opens at once with the load's progress as `reasoning_content` (chat UIs show it
        apart from the answer, clients that ignore reasoning see nothing), then the model's
        own stream follows; a load that fails ends the stream with its error."""
        name = decision.model
        waiting = asyncio.ensure_future(self._wait_serving(name, spec))
        try:
            yield _chunk(name, {"role": "assistant", "reasoning_content": f"Loading model {name}…\n"})
            shown = -1.0
            while not waiting.done():
                info = self.store.models.get(name)
                progress = info.progress if info is not None and info.state is ModelState.LOADING else 0.0
                if progress >= shown + 0.1:
                    shown = progress
                    yield _chunk(name, {"reasoning_content": f"Loading {name}: {progress:.0%}\n"})
                await asyncio.wait([waiting], timeout=0.25)
            info = waiting.result()
            if info is None or info.state is not ModelState.LOADED or info.endpoint is None:
                answer: Response = self._unavailable(name, info, spec)
            else:
                yield _chunk(name, {"reasoning_content": f"Model {name} is ready.\n"})
                answer = await self._deliver(request, spec, decision, info, endpoint, body, t0, doc)
            if isinstance(answer, StreamingResponse):
                async for part in answer.body_iterator:
                    yield part if isinstance(part, bytes) else str(part).encode()
            else:  # an error after the stream opened: in the stream, as OpenAI sends them
                yield b"data: " + bytes(answer.body) + b"\n\ndata: [DONE]\n\n"
        finally:
            waiting.cancel()

    async def _demand(self, name: str, spec: Spec) -> ModelInfo | None:
        """An on-demand model that is not serving: ask the daemon for it and wait for its load
        (one load, shared by every request that waits), until it serves, fails, is refused for
        lack of room, or load_wait_s passes."""
        record = self.store.demand_of(name)
        self.store.want(name)
        try:
            return await self.store.wait_for(
                name, spec.server.load_wait_s, WAIT_WHILE, until=lambda: record.refused is not None
            )
        finally:
            self.store.unwant(name)

    async def upstream(self, request: Request) -> Response:
        """`/upstream/<model>/<path>`: the model's own server, raw (its /props, /slots, /metrics).
        Read-only methods unless `server.upstream_write` allows more."""
        t0 = time.perf_counter()
        spec = await self._admit(request)
        if isinstance(spec, Response):
            return spec
        if request.method not in ("GET", "HEAD") and not spec.server.upstream_write:
            return openai_error(
                405,
                f"{request.method} through /upstream is off: it can change a backend behind xgen's back "
                "(set server.upstream_write: true to allow it)",
                "invalid_request_error",
                "method_not_allowed",
            )
        requested = request.path_params["model"]
        name = spec.resolve(requested)
        if name is None:
            return openai_error(404, unknown_model(spec, requested), "invalid_request_error", "model_not_found")
        info = self.store.models.get(name)
        if info is None or info.state is not ModelState.LOADED or info.endpoint is None:
            return self._unavailable(name, info, spec)
        body = await _read_body(request, spec.server.max_body_bytes) if request.method not in ("GET", "HEAD") else b""
        if body is None:
            return _too_large(spec.server.max_body_bytes)
        return await self._send(request, info, "upstream", body, t0, upstream="/" + request.path_params["path"])

    def _unavailable(self, name: str, info: ModelInfo | None, spec: Spec) -> Response:
        refused = self.store.demand_of(name).refused if name in spec.on_demand else None
        if refused is not None:
            why = refused
        elif info is None and name in spec.on_demand:
            why = f"model '{name}' (on demand) did not load within load_wait_s ({spec.server.load_wait_s:.0f} s)"
        elif info is None:
            why = (
                f"model '{name}' is not loaded (desired: unloaded)"
                if name not in spec.loaded
                else f"model '{name}' is still starting"
            )
        elif info.state is ModelState.ERROR:
            retry = f"; retrying in {max(0.0, info.retry_at - time.time()):.0f} s" if info.retry_at else ""
            why = f"model '{name}' failed: {info.error_message}{retry}"
        elif name not in spec.loaded:
            why = f"model '{name}' is being unloaded ({'desired: unloaded' if name in spec.models else 'removed'})"
        else:
            why = f"model '{name}' is {info.state.value} (waited {spec.server.load_wait_s:.0f} s)"
        metrics.STATS.answered(name, "503")
        return openai_error(503, why, "service_unavailable", "model_unavailable", headers={"Retry-After": "5"})

    async def _send(
        self,
        request: Request,
        info: ModelInfo,
        endpoint: str,
        body: bytes | AsyncIterator[bytes],
        t0: float,
        upstream: str | None = None,
        gate: Gate | None = None,
    ) -> Response:
        """Send to the model's process (at the request's own path, or `upstream` with the
        request's method and query) and pass the answer through, streamed when it streams."""
        name, port, pid = info.name, info.port or 0, info.pid  # a remote model's requests count under port 0
        origin, prefix = upstream_of(info)
        path = upstream if upstream is not None else request.url.path
        if info.backend == "remote":  # its URL ends where /v1 does
            path = prefix + (path if upstream is not None else path.removeprefix("/v1"))
        method = request.method if upstream is not None else "POST"
        params = request.query_params if upstream is not None else None
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}  # never the client's key
        if info.backend == "remote":
            headers.update(remote_auth(info.spec))
        self.begin(name, port)
        try:
            try:
                resp = await self.client(origin, pid).request(method, path, params=params, data=body, headers=headers)
            except aiohttp.ClientConnectorError:
                raise  # nothing listens: no second try
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # a pooled keep-alive connection the backend had just closed (llama-server's HTTP
                # server closes idle and well-used ones): nothing was answered, so send it once
                # more on a fresh connection (a streamed upload is gone: it cannot be sent again)
                if not isinstance(body, bytes):
                    raise
                resp = await self.client(origin, pid).request(method, path, params=params, data=body, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            self.done(name, port, "502", t0, gate)
            if not isinstance(body, bytes) and "request body" in str(exc):
                return openai_error(
                    502,
                    f"the {info.backend} backend of '{name}' closed the connection before it took the whole upload "
                    f"to {path}: it does not serve this endpoint, or refused the request ({exc})",
                    "upstream_error",
                )
            return not_answered(info, exc, began=False)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        if resp.content_type == "text/event-stream":
            out_headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return StreamingResponse(
                self._stream(resp, name, port, t0, gate), status_code=resp.status, headers=out_headers
            )
        try:
            content = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            resp.close()
            self.done(name, port, "502", t0, gate)
            return not_answered(info, exc, began=True)
        resp.release()
        explained = unsupported(info, path, resp.status, content) if upstream is None else None
        tokens = answer_tokens(name, endpoint, resp.status, content) if explained is None else 0
        self.done(name, port, str(resp.status), t0, gate, tokens)
        return explained or Response(content, status_code=resp.status, headers=out_headers)

    async def _stream(
        self, resp: aiohttp.ClientResponse, name: str, port: int, t0: float, gate: Gate | None
    ) -> AsyncIterator[bytes]:
        usage = b""
        finished = False
        try:
            async for chunk in resp.content.iter_any():  # each read as it arrives: no re-chunking
                if b'"usage"' in chunk:  # a copy of the chunk that carries usage (usually the last)
                    usage = chunk
                yield chunk
            finished = True
        finally:
            # also runs when the client goes away: closing the connection cancels the generation
            if finished:
                resp.release()
            else:
                resp.close()
            self.done(name, port, str(resp.status), t0, gate, metrics.count_stream_tokens(name, usage))

    def done(self, name: str, port: int, status: str, t0: float, gate: Gate | None = None, tokens: int = 0) -> None:
        """A request that begin() counted is answered (`tokens`: generated, for the sparklines)."""
        if gate is not None:
            gate.leave()
        self.store.touch(name)
        if self.store.waiting:  # a request waits for room this one may have made
            self.store.wake()
        self.inflight[port] -= 1
        seconds = time.perf_counter() - t0
        metrics.STATS.done(name, status, seconds)
        self.activity.request(name, seconds, tokens, time.time())


def answer_tokens(name: str, endpoint: str, status: int, content: bytes) -> int:
    """The tokens a non-streamed answer generated (counted in the metrics), 0 when it says none."""
    return metrics.count_tokens(name, content) if status == 200 and endpoint != "embeddings" else 0


def unsupported(info: ModelInfo, path: str, status: int, content: bytes) -> JSONResponse | None:
    """xgen's explanation of a backend's 404/501 for an endpoint not every backend serves; None
    for any other answer."""
    if status not in (404, 501) or path in CORE:
        return None
    return openai_error(
        status,
        f"the {info.backend} backend of '{info.name}' does not serve {path} "
        f"(it answered {status}: {content[:200].decode(errors='replace')})",
        "invalid_request_error",
        "endpoint_not_supported",
    )


def not_json(exc: ValueError) -> JSONResponse:
    return openai_error(400, f"request body is not a JSON object: {exc}", "invalid_request_error")


def not_answered(info: ModelInfo, exc: BaseException, began: bool) -> JSONResponse:
    """The 502 for a backend whose connection failed before it answered, or after it `began`."""
    what = "broke off" if began else f"(pid {info.pid}, port {info.port or 0}) did not answer"
    return openai_error(502, f"backend of '{info.name}' {what}: {exc!r}", "upstream_error")


def _rewrite(doc: JsonBody, decision: Route, model: ModelSpec, info: ModelInfo) -> bytes:
    """The body for the backend: the model's parameter rules and the variant applied, `model`
    set to the backend's name for it, llama-server's LoRA selection; the client's own bytes
    when none of that changes anything. Raises ValueError for a body that is not JSON."""
    variant = model.variants.get(decision.variant) if decision.variant else None
    changed = (not model.params.empty or bool(variant)) and apply_params(doc.payload(), model.params, variant)
    if info.backend == "llama-server" and info.spec.lora:
        # llama-server selects adapters per request by id and scale: the named adapter at its
        # scale, the others off; a request for the base model gets none (as with vLLM)
        doc.payload()["lora"] = [
            {"id": i, "scale": a.scale if a.name == decision.upstream_model else 0.0}
            for i, a in enumerate(info.spec.lora)
        ]
        return doc.encode(decision.model, changed=True)
    return doc.encode(decision.upstream_model, changed)


def _shows_loading(spec: Spec, name: str, endpoint: str, doc: JsonBody) -> bool:
    """A request that waits for a load gets its progress in its stream (server.loading_messages)."""
    if not (spec.server.loading_messages and endpoint == "chat/completions" and name in spec.served):
        return False
    try:
        return doc.payload().get("stream") is True
    except ValueError:
        return False


def _chunk(model: str, delta: dict[str, str]) -> bytes:
    """One chat.completion.chunk carrying `delta`, as an SSE event."""
    data = {
        "id": "xgen-loading",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def local(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def upstream_of(info: ModelInfo) -> tuple[str, str]:
    """(origin, path prefix) of a model's server: its process here, or a remote URL."""
    if info.backend == "remote" and info.spec.url:
        url = urllib.parse.urlsplit(info.spec.url)
        return f"{url.scheme}://{url.netloc}", url.path.rstrip("/")
    return local(info.port or 0), ""


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (its body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _too_large(limit: int) -> JSONResponse:
    return openai_error(413, f"request body over {limit} bytes", "invalid_request_error", "body_too_large")


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` (a lying or absent content-length is not trusted)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)

"""The OpenAI-compatible `/v1` proxy: route by `model`, stream bytes through, never buffer.

Routing (`route()`) is a pure decision over the spec and the model states; the handler does the
I/O: one pooled httpx client per backend port, SSE chunks forwarded as they arrive, the upstream
response closed in a `finally` so a client that goes away cancels the generation at once.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from reconciler.spec import Spec
from reconciler.state import ModelInfo, ModelState
from reconciler.store import StateStore
from reconciler.web import metrics

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
}


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status, headers=headers
    )


@dataclass(frozen=True)
class Route:
    model: str  # the xgen model that serves it
    upstream_model: str  # what the backend is asked for (the model, or a LoRA adapter)


def route(
    spec: Spec, requested: str | None, endpoint: str, active: str | None, loaded: dict[str, ModelInfo]
) -> Route | str:
    """The model for a request, or an error text. Pure."""
    if requested:
        name = spec.resolve(requested)
        if name is not None:
            return Route(name, name)
        for base, model in spec.models.items():
            if any(a.name == requested for a in model.lora):
                return Route(base, requested)
    if endpoint == "embeddings":
        embedders = [n for n, m in spec.loaded.items() if m.server_type == "embedding"]
        if len(embedders) == 1:
            return Route(embedders[0], embedders[0])
        running = [n for n in embedders if n in loaded and loaded[n].state is ModelState.LOADED]
        if len(running) == 1:
            return Route(running[0], running[0])
        return (
            f"model '{requested}' is not an embedding model here; "
            f"name one of: {', '.join(embedders) or 'none configured'}"
        )
    if active is None:
        return f"model '{requested}' is unknown and no active model is set (models: {', '.join(spec.models)})"
    return Route(active, active)


class Proxy:
    def __init__(self, store: StateStore, get_spec: Any, inflight: dict[str, int]) -> None:
        self.store = store
        self.get_spec = get_spec  # () -> Spec | None: the spec the daemon runs
        self.inflight = inflight
        self.clients: dict[int, httpx.AsyncClient] = {}

    def client(self, port: int) -> httpx.AsyncClient:
        client = self.clients.get(port)
        if client is None:
            client = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
                timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=60.0),
            )
            self.clients[port] = client
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    def check_key(self, request: Request) -> Response | None:
        spec: Spec | None = self.get_spec()
        key = spec.server.api_key if spec else None
        if not key:
            return None
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return openai_error(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None

    async def models(self, request: Request) -> Response:
        if (denied := self.check_key(request)) is not None:
            return denied
        spec: Spec | None = self.get_spec()
        data = []
        for name, info in self.store.models.items():
            if info.state is not ModelState.LOADED or spec is None or name not in spec.models:
                continue
            for served in (name, *spec.models[name].aliases, *(a.name for a in spec.models[name].lora)):
                data.append(
                    {
                        "id": served,
                        "object": "model",
                        "created": int(info.started_at or 0),
                        "owned_by": "xgen",
                        "root": name,
                        "meta": {"backend": info.backend, "server_type": info.spec.server_type},
                    }
                )
        return JSONResponse({"object": "list", "data": data})

    async def forward(self, request: Request) -> Response:
        endpoint = request.url.path.removeprefix("/v1/")
        t0 = time.perf_counter()
        if (denied := self.check_key(request)) is not None:
            return denied
        spec: Spec | None = self.get_spec()
        if spec is None:
            return openai_error(
                503, "no valid models.yaml loaded yet", "service_unavailable", headers={"Retry-After": "5"}
            )
        limit = spec.server.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            return openai_error(413, f"request body over {limit} bytes", "invalid_request_error", "body_too_large")
        try:
            body = await _read_body(request, limit)
        except ClientDisconnect:
            return Response(status_code=499)
        if body is None:
            return openai_error(413, f"request body over {limit} bytes", "invalid_request_error", "body_too_large")
        try:
            payload = json.loads(body)
            assert isinstance(payload, dict)
        except (ValueError, AssertionError):
            return openai_error(400, "request body is not a JSON object", "invalid_request_error")
        requested = payload.get("model")
        decision = route(
            spec, requested if isinstance(requested, str) else None, endpoint, self.store.active, self.store.models
        )
        if isinstance(decision, str):
            return openai_error(404, decision, "invalid_request_error", "model_not_found")
        name = decision.model
        info = self.store.models.get(name)
        if (info is None or info.state is not ModelState.LOADED) and name in spec.loaded:
            info = await self.store.wait_for(name, spec.server.load_wait_s)
        if info is None or info.state is not ModelState.LOADED or info.port is None:
            return self._unavailable(name, info, spec)
        if payload.get("model") != decision.upstream_model:
            payload["model"] = decision.upstream_model
            body = json.dumps(payload).encode()
        return await self._send(request, name, info.port, endpoint, body, t0)

    def _unavailable(self, name: str, info: ModelInfo | None, spec: Spec) -> Response:
        if info is None:
            why = (
                f"model '{name}' is not loaded (desired: unloaded)"
                if name not in spec.loaded
                else f"model '{name}' is still starting"
            )
        elif info.state is ModelState.ERROR:
            why = f"model '{name}' failed: {info.error_message}"
        else:
            why = f"model '{name}' is {info.state.value} (waited {spec.server.load_wait_s:.0f} s)"
        metrics.REQUESTS.labels(name, "503").inc()
        return openai_error(503, why, "service_unavailable", "model_unavailable", headers={"Retry-After": "5"})

    async def _send(self, request: Request, name: str, port: int, endpoint: str, body: bytes, t0: float) -> Response:
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        client = self.client(port)
        upstream = client.build_request("POST", f"/v1/{endpoint}", content=body, headers=headers)
        self.inflight[name] = self.inflight.get(name, 0) + 1
        metrics.INFLIGHT.labels(name).inc()
        try:
            resp = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            self._done(name, "502", t0)
            return openai_error(502, f"backend of '{name}' did not answer: {exc!r}", "upstream_error")
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            out_headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return StreamingResponse(self._stream(resp, name, t0), status_code=resp.status_code, headers=out_headers)
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
            self._done(name, str(resp.status_code), t0)
        if resp.status_code == 200 and endpoint != "embeddings":
            metrics.count_tokens(name, content)
        return Response(content, status_code=resp.status_code, headers=out_headers)

    async def _stream(self, resp: httpx.Response, name: str, t0: float) -> AsyncIterator[bytes]:
        last = b""
        try:
            async for chunk in resp.aiter_raw():
                last = chunk
                yield chunk
        finally:
            # runs on completion and when the client goes away: closing cancels the generation
            await resp.aclose()
            self._done(name, str(resp.status_code), t0)
            metrics.count_stream_tokens(name, last)

    def _done(self, name: str, status: str, t0: float) -> None:
        self.inflight[name] -= 1
        metrics.INFLIGHT.labels(name).dec()
        metrics.REQUESTS.labels(name, status).inc()
        metrics.LATENCY.labels(name, status).observe(time.perf_counter() - t0)


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

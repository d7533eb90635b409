"""What the /v1 proxy adds, measured from the client against the backend reached directly.

Part 1 isolates the proxy: a fast OpenAI-compatible stub backend (raw asyncio, keep-alive),
reached directly and through xgen (its front and app wired as `xgen serve` wires them, with the
stub registered as a LOADED model). Part 2 does the same against the real
llama-server with the default model, through a real `xgen serve`.

Prints added latency p50/p99 at concurrency 1, 16, 64 (non-streaming), time to first byte for
streaming, and streamed throughput through the proxy as a ratio of direct at 64 streams.
Goals: added p50 < 1 ms at concurrency 1; streaming throughput >= 97% of direct at 64 streams.

Part 1b prints the same added latency for /v1/messages and /v1/responses beside chat's (goal:
equal: they take the same path through the proxy).

Usage: python benchmarks/proxy.py [--quick] [--skip-real]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from net import free_port

STREAM_CHUNKS = 200
CHUNK = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
REPLY = json.dumps({"id": "x", "object": "chat.completion", "model": "stub", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello " * 20}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}}).encode()


# ---------------------------------------------------------------- stub backend


async def stub_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pace_ms: float = 0) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length) if length else b""
            if head.startswith(b"GET /health"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
                             b'{"status":"ok"}')
            elif b'"stream": true' in body or b'"stream":true' in body:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                interval = (json.loads(body).get("stub_interval_ms") or pace_ms) / 1000
                for _ in range(STREAM_CHUNKS):
                    writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                    await writer.drain()
                    if interval:
                        await asyncio.sleep(interval)  # a token every few ms, like a real model
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(REPLY), REPLY))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def run_stub(port: int, pace_ms: float = 0) -> None:
    """The stub on `port`; `pace_ms`: its streams send a token that often (unless the request says)."""

    async def main() -> None:
        handle = functools.partial(stub_handle, pace_ms=pace_ms)
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------- the proxy under test


def run_proxy(port: int, backend_port: int) -> None:
    from reconciler.serve import serve_app
    from reconciler.spec import ModelSpec, Spec
    from reconciler.state import ModelInfo, ModelState
    from reconciler.store import StateStore
    from reconciler.web.app import create_app

    spec = Spec(models={"stub": ModelSpec(path="/stub.gguf")}, active="stub")
    store = StateStore()
    store.models["stub"] = ModelInfo("stub", spec.models["stub"], "llama-server", ModelState.LOADED,
                                     port=backend_port, started_at=time.time())
    store.active = "stub"
    app = create_app(store, lambda: spec, {}, {})
    serve_app(app, "127.0.0.1", port)


# ---------------------------------------------------------------- client


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, body: bytes,
                  stream: bool, path: bytes = b"/v1/chat/completions",
                  sink: bytearray | None = None) -> tuple[float, float, int, bool]:
    """One request on a kept-alive connection: (time to first body byte, total time, body bytes,
    whether the server keeps the connection open); the body goes to `sink` if given."""
    t0 = time.perf_counter()
    writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (path, port, len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    size = 0
    first = 0.0
    if b"chunked" in head.lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            n = int(line.strip(), 16)
            if n == 0:
                await reader.readuntil(b"\r\n")
                break
            data = await reader.readexactly(n + 2)
            if sink is not None:
                sink += data[:-2]
            if not first:
                first = time.perf_counter() - t0
            size += n
    else:
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        data = await reader.readexactly(length)
        if sink is not None:
            sink += data
        size = length
        first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, size, b"connection: close" not in head.lower()


async def load(port: int, concurrency: int, total: int, stream: bool, body: dict[str, object],
               path: bytes = b"/v1/chat/completions", bodies: list[bytes] | None = None) -> dict[str, float]:
    """`total` requests from `concurrency` kept-alive connections; each answer's body is added
    to `bodies` when given (to check what came through)."""
    payload = json.dumps({**body, "stream": stream}).encode()
    latencies: list[float] = []
    firsts: list[float] = []
    volume = 0
    remaining = total

    async def worker() -> None:
        nonlocal remaining, volume
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        *_, alive = await request(reader, writer, port, payload, stream, path)  # warm the connection
        while remaining > 0:
            remaining -= 1
            if not alive:  # the server said it closes: reconnect, as a client would
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            sink = bytearray() if bodies is not None else None
            try:
                first, whole, size, alive = await request(reader, writer, port, payload, stream, path, sink)
            except (asyncio.IncompleteReadError, ConnectionError):  # closed without saying so (llama-server)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                sink = bytearray() if bodies is not None else None
                first, whole, size, alive = await request(reader, writer, port, payload, stream, path, sink)
            if bodies is not None and sink is not None:
                bodies.append(bytes(sink))
            latencies.append(whole)
            firsts.append(first)
            volume += size
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    firsts.sort()
    return {"p50": statistics.median(latencies) * 1000, "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "ttfb50": statistics.median(firsts) * 1000, "ttfb99": firsts[int(0.99 * (len(firsts) - 1))] * 1000,
            "rps": len(latencies) / elapsed,
            "mbps": volume / elapsed / 2**20}


def wait_http(port: int, path: str = "/health", timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on port {port}")


def compare(label: str, direct_port: int, proxy_port: int, body: dict[str, object], levels: list[int],
            per_level: int, stream_runs: list[tuple[int, int]], stream_total: int) -> list[str]:
    lines = [f"{label}"]
    for c in levels:
        n = max(per_level, c * 20)
        d = asyncio.run(load(direct_port, c, n, False, body))
        p = asyncio.run(load(proxy_port, c, n, False, body))
        lines.append(f"  non-streaming, concurrency {c:>2}: direct p50 {d['p50']:.2f} ms p99 {d['p99']:.2f} ms | "
                     f"proxy p50 {p['p50']:.2f} ms p99 {p['p99']:.2f} ms | added p50 {p['p50'] - d['p50']:+.2f} ms "
                     f"p99 {p['p99'] - d['p99']:+.2f} ms | {p['rps']:.0f} vs {d['rps']:.0f} req/s")
    for c, paced in stream_runs:
        b = {**body, "stub_interval_ms": paced} if paced else body
        d = asyncio.run(load(direct_port, c, max(stream_total, c * 2), True, b))
        p = asyncio.run(load(proxy_port, c, max(stream_total, c * 2), True, b))
        how = f"paced {paced} ms/token" if paced else "as fast as the backend can"
        lines.append(f"  streaming, {c:>2} streams ({how}): TTFB p50 direct {d['ttfb50']:.2f} ms, proxy "
                     f"{p['ttfb50']:.2f} ms (added {p['ttfb50'] - d['ttfb50']:+.2f} ms) | throughput "
                     f"{p['mbps']:.2f} vs {d['mbps']:.2f} MiB/s = {100 * p['mbps'] / d['mbps']:.0f}% of direct")
    return lines


def apis(direct_port: int, proxy_port: int, body: dict[str, object], per_level: int) -> list[str]:
    """What the proxy adds on each API it routes, beside chat's, in the same run (direct and
    through xgen alternating per API, so each ratio sees the same machine)."""
    lines = ["Part 1b: the same stub, by API (non-streaming; added = proxy - direct)"]
    for path in (b"/v1/chat/completions", b"/v1/messages", b"/v1/responses"):
        shown = []
        for c in (1, 16):
            d = asyncio.run(load(direct_port, c, max(per_level, c * 20), False, body, path))
            p = asyncio.run(load(proxy_port, c, max(per_level, c * 20), False, body, path))
            shown.append(f"c={c}: added p50 {p['p50'] - d['p50']:+.2f} ms p99 {p['p99'] - d['p99']:+.2f} ms")
        lines.append(f"  {path.decode():<22} " + " | ".join(shown))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--serve-stub", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pace-ms", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        return run_stub(args.serve_stub, args.pace_ms)
    if args.serve_proxy:
        return run_proxy(*args.serve_proxy)

    out: list[str] = []
    stub, proxy = free_port(), free_port()
    here = str(Path(__file__).resolve())
    procs = [subprocess.Popen([sys.executable, here, "--serve-stub", str(stub)]),
             subprocess.Popen([sys.executable, here, "--serve-proxy", str(proxy), str(stub)])]
    try:
        wait_http(stub)
        wait_http(proxy, "/health")
        body = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        runs = [(1, 0), (64, 0), (1, 5), (64, 5)]  # paced: 200 tokens/s per stream, like a fast GPU model
        out += compare("Part 1: stub backend (isolates the proxy)", stub, proxy, body, [1, 16, 64],
                       400 if args.quick else 2000, runs, 128 if args.quick else 256)
        out += apis(stub, proxy, body, 400 if args.quick else 2000)
    finally:
        for p in procs:
            p.terminate()
    print("\n".join(out), flush=True)
    if not args.skip_real:
        print("\n".join(real_backend(args.quick)), flush=True)


def real_backend(quick: bool) -> list[str]:
    """Part 2: the default model in llama-server, direct vs through a real `xgen serve`."""
    from reconciler.install import default_model_path

    work = Path(tempfile.mkdtemp(prefix="xgen-proxy-bench-"))
    port, low = free_port(), 24500
    (work / "models.yaml").write_text(
        f"server: {{port: {port}, port_range: [{low}, {low + 5}]}}\nmodels:\n  smollm2:\n"
        f"    path: {default_model_path()}\n    n_ctx: 4096\n    llama: {{parallel: 16}}\n")
    daemon = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "serve", "models.yaml"], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        wait_http(port, "/ready")
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "temperature": 0, "seed": 1}
        return compare("Part 2: real llama-server, SmolLM2-135M Q4_1 on 2 CPU cores (8 tokens a request)",
                       low, port, body, [1, 16], 20 if quick else 60, [(1, 0), (16, 0)], 16 if quick else 32)
    finally:
        daemon.terminate()
        daemon.wait(60)


if __name__ == "__main__":
    main()

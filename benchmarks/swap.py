"""On-demand models: what a request for a model that is not resident costs, against the engine
itself and against llama.cpp's own router, in one run (real llama-server, the default GGUF under
several names).

1. Engine by hand: llama-server started directly with the argv xgen would use, timed from the
   start to /health answering 200 (polled every 2 ms), then its first request (max_tokens 1):
   the floor any tool pays for a cold model.
2. Cold load through xgen (room to spare, nothing to evict), each round right after one of 1.:
   time to the answer of a request for a model that is not resident (it went idle). Swap
   overhead = that - the round's start→ready - its first request (goal: p50 <= 100 ms).
3. Alternating between two models with room for one, xgen (`max_loaded: 1`) beside
   `llama-server --models-dir DIR --models-max 1` from the same build, both up at once and their
   swaps taking turns: p50 request-to-answer on a swap (goal: xgen at or below the router).
4. Mixed load: REQUESTS requests from several clients spread over three on-demand models with a
   CPU budget that holds two: failed requests (goal 0), evictions and their reasons, the most
   processes alive at once (<= 2) and of one model (1).

Usage: python benchmarks/swap.py [--rounds 20] [--requests 500] [--clients 6] [--parts cold,alternate,mixed]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Daemon
from lifetimes import alive_at_most
from net import free_port

from reconciler import memory
from reconciler.drivers.llama_server import LlamaServerDriver, find_binary
from reconciler.install import default_model_path
from reconciler.spec import ModelSpec, load

N_CTX = 512
THREADS = 1  # two models may run at once in part 4: keep them off each other's cores
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(v: float) -> str:
    return f"{v * 1000:7.1f} ms"


def ask(http: httpx.Client, url: str, model: str) -> tuple[float, int]:
    """Seconds to the whole answer, and its status (0: the connection broke)."""
    t0 = time.perf_counter()
    try:
        code = http.post(f"{url}/v1/chat/completions", json={**BODY, "model": model}).status_code
    except httpx.HTTPError as exc:
        print(f"   ({model}: {exc!r})")
        code = 0
    return time.perf_counter() - t0, code


def engine_once(http: httpx.Client, driver: LlamaServerDriver, spec: ModelSpec) -> tuple[float, float]:
    """llama-server started by hand: seconds to /health 200 (polled every 2 ms), then the first request."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(driver.command("m", spec, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **driver.environment(spec)})
    while True:
        try:
            if http.get(driver.health_url(port)).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.002)
    ready = time.perf_counter() - t0
    first = ask(http, f"http://127.0.0.1:{port}", "m")[0]
    proc.terminate()
    proc.wait()
    return ready, first


def cold(work: Path, model: Path, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Rounds of: the engine by hand, then a request to xgen for an on-demand model that is not
    resident (it went idle: idle_unload_s 1), interleaved so both see the same machine."""
    driver = LlamaServerDriver()
    spec = ModelSpec(path=str(model), n_ctx=N_CTX, llama={"threads": THREADS})  # type: ignore[arg-type]
    d = Daemon(work, 23000)
    d.save_spec(f"models:\n  a: {{path: {model}, n_ctx: {N_CTX}, llama: {{threads: {THREADS}}}, "
                "desired: on_demand, idle_unload_s: 1}\n")
    d.start()
    d.converged()
    ready, first, through = [], [], []
    try:
        with httpx.Client(timeout=60) as http:
            for _ in range(rounds):
                r, f = engine_once(http, driver, spec)
                ready.append(r)
                first.append(f)
                seconds, code = ask(http, d.url, "a")
                assert code == 200, code
                through.append(seconds)
                d.wait(lambda s: s["on_demand_models"][0]["residency"] == "standby", 30)
    finally:
        d.stop()
    return ready, first, through


def start_router(work: Path, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    """llama.cpp's own router from the same build, with room for one model of two."""
    models = work / "router-models"
    models.mkdir()
    for name in ("a", "b"):
        (models / f"{name}.gguf").symlink_to(model)
    port = free_port()
    binary = find_binary()
    assert binary is not None, "llama-server not found: run `xgen install`"
    proc = subprocess.Popen([str(binary), "--models-dir", str(models), "--models-max", "1", "--port", str(port),
                             "-c", str(N_CTX), "-t", str(THREADS)], stdout=(work / "router.log").open("ab"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=60) as http:
        while True:
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.01)


def alternate(work: Path, model: Path, rounds: int) -> list[tuple[float | None, float | None]]:
    """xgen (`max_loaded: 1`) and the router side by side, each alternating between two models:
    every request a swap. Their swaps take turns (the order flips every round), so both see the
    same machine at nearly the same moment. Per round: (xgen, router) seconds, None if not 200."""
    d = Daemon(work, 23040)
    d.head = d.head.replace("stop_grace_s: 5}", "stop_grace_s: 5, max_loaded: 1}")
    d.save_spec(f"defaults: {{n_ctx: {N_CTX}, llama: {{threads: {THREADS}}}}}\nmodels:\n"
                f"  a: {{path: {model}, desired: on_demand}}\n  b: {{path: {model}, desired: on_demand}}\n")
    d.start()
    router, router_url = start_router(work, model)
    rows: list[tuple[float | None, float | None]] = []
    try:
        d.converged()
        with httpx.Client(timeout=60) as http:
            ask(http, d.url, "a")
            ask(http, router_url, "a")
            for i in range(rounds):
                name = "ab"[(i + 1) % 2]
                row: dict[str, float | None] = {}
                for tool in ("xgen", "router") if i % 2 == 0 else ("router", "xgen"):
                    seconds, code = ask(http, d.url if tool == "xgen" else router_url, name)
                    row[tool] = seconds if code == 200 else None
                    if code != 200:
                        print(f"   ({tool}: {name} answered {code})")
                rows.append((row["xgen"], row["router"]))
    finally:
        router.terminate()
        router.wait()
        d.stop()
    return rows


def mixed(work: Path, model: Path, requests: int, clients: int) -> dict[str, object]:
    d = Daemon(work, 23080)
    body = (f"defaults: {{n_ctx: {N_CTX}, llama: {{threads: {THREADS}}}, desired: on_demand}}\nmodels:\n"
            + "".join(f"  {n}: {{path: {model}}}\n" for n in ("a", "b", "c")))
    d.save_spec(body)
    one = memory.spec_estimates(load(d.file), ())["a"]["cpu"]  # each model's RAM estimate (the same file)
    d.head = d.head.replace("stop_grace_s: 5}", f"stop_grace_s: 5, budgets: {{cpu: {int(one * 2.5)}}}}}")
    d.save_spec(body)
    d.start()
    start = d.converged()["last_event_id"]
    rng = random.Random(7)
    picks = [rng.choice("abc") for _ in range(requests)]
    codes: list[int] = []
    done = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        events_future = reader.submit(d.events, start, done)  # more than the daemon's backlog keeps
        t0 = time.monotonic()
        with httpx.Client(timeout=120) as http, concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for _, code in pool.map(lambda m: ask(http, d.url, m), picks):
                codes.append(code)
        wall = time.monotonic() - t0
        done.set()
        events = events_future.result()
    d.stop()
    evictions = [data for kind, data in events if kind == "unload"]
    return {
        "failed": sum(c != 200 for c in codes),
        "wall_s": wall,
        "loads": sum(kind == "load" for kind, _ in events),
        "evictions": evictions,
        "alive": alive_at_most(events),
        "budget": int(one * 2.5),
        "one": one,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--parts", default="cold,alternate,mixed", help="which of them to run (default: all)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    model = default_model_path()
    work = Path(tempfile.mkdtemp(prefix="xgen-swap-"))
    print(f"llama-server with {model.name}, n_ctx {N_CTX}, {THREADS} thread(s); {os.cpu_count()} cores; work in {work}")

    if "cold" in parts:
        (work / "cold").mkdir()
        ready, warm, through = cold(work / "cold", model, args.rounds)
        overhead = [t - r - w for t, r, w in zip(through, ready, warm, strict=True)]
        print("\n1. the engine by hand (the floor), each round beside 2.")
        print(f"   start → /health 200     p50 {ms(p(ready, .5))}  p90 {ms(p(ready, .9))}")
        print(f"   first request           p50 {ms(p(warm, .5))}  p90 {ms(p(warm, .9))}")
        print("\n2. a request for a model that is not resident, through xgen (room to spare)")
        print(f"   request → answer        p50 {ms(p(through, .5))}  p90 {ms(p(through, .9))}")
        print(f"   swap overhead           p50 {ms(p(overhead, .5))}  p90 {ms(p(overhead, .9))}   (goal p50 <= 100 ms; "
              "per round: xgen - that round's start→ready - first request)")

    if "alternate" in parts:
        (work / "alt").mkdir()
        rows = alternate(work / "alt", model, args.rounds)
        ours = [x for x, _ in rows if x is not None]
        router = [r for _, r in rows if r is not None]
        differences = [x - r for x, r in rows if x is not None and r is not None]
        print("\n3. alternating two models, room for one (every request a swap, the two tools taking turns)")
        print(f"   llama-server router     p50 {ms(p(router, .5))}  p90 {ms(p(router, .9))}   "
              f"({args.rounds - len(router)} failed)")
        print(f"   xgen                    p50 {ms(p(ours, .5))}  p90 {ms(p(ours, .9))}   "
              f"({args.rounds - len(ours)} failed)   ratio {p(ours, .5) / p(router, .5):.2f}x (goal <= 1.00x)")
        print(f"   xgen - router, per round p50 {ms(p(differences, .5))}  (the same moment's swap on each: "
              "less noise than the ratio)")

    if "mixed" in parts:
        (work / "mixed").mkdir()
        m = mixed(work / "mixed", model, args.requests, args.clients)
        evictions = m["evictions"]
        assert isinstance(evictions, list)
        reasons = {e["cause"] for e in evictions}
        print(f"\n4. {args.requests} requests from {args.clients} clients over three models, a CPU budget of "
              f"{m['budget'] / 2**20:.0f} MiB (holds two of {m['one'] / 2**20:.0f} MiB)")
        print(f"   failed {m['failed']} (goal 0); loads {m['loads']}; unloads {len(evictions)} (causes: "
              f"{', '.join(sorted(reasons)) or 'none'}); most alive at once {m['alive'][0]} (goal <= 2), "
              f"of one model {m['alive'][1]} (goal 1); {m['wall_s']:.1f} s")
        unexplained = [e for e in evictions if e["cause"] == "evict" and not e["reason"].startswith("evicted for ")]
        print(f"   evictions without a reason: {len(unexplained)}; e.g. {evictions[0]['reason'] if evictions else '-'}")


if __name__ == "__main__":
    main()

"""xgen's /v1 proxy beside the LiteLLM proxy, against the same stub backend and the same client,
in one run, as ratios against the stub reached directly.

The stub and the client are benchmarks/proxy.py's (raw asyncio, keep-alive). xgen is its real
front and app as `xgen serve` runs them, the stub registered as a loaded model; LiteLLM is its proxy
server (`litellm --config`, one worker, logging, telemetry and spend logs off), installed into
its own virtualenv under ~/.cache/xgen/peers/ by this script, version pinned and printed.

Workloads (each: direct, xgen, LiteLLM, taking turns; the tools not measured are paused with
SIGSTOP during a turn, so an idle peer's background work takes nothing from the one measured):
  1. non-streaming at concurrency 1, 16 and 64: added p50/p99, requests/s
  2. 128 streams paced at 5 ms a token (200 tokens each): time to first byte p50/p99, tokens/s
     as a share of direct, and whether every stream arrived whole (xgen: byte for byte; a peer
     that re-frames: the same number of events and the [DONE])
  3. a 200 KB prompt at concurrency 8: added p50/p99, share of direct throughput

Goals (issue 13): c=1 added p50 <= 0.3 ms, p99 <= 0.7; c=64 added p99 <= 10 ms and >= 40% of
direct; 128 paced streams added TTFB p99 <= 10 ms, >= 98% of direct tokens/s, every frame exact;
200 KB at c=8 added p99 <= 2 ms.

Usage: python benchmarks/peers.py [--quick] [--no-litellm] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proxy import STREAM_CHUNKS, load, wait_http

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from net import free_port

LITELLM = "1.108.7"
PACE_MS = 5.0
LITELLM_CONFIG = """\
model_list:
  - model_name: stub
    litellm_params: {{model: openai/stub, api_base: "http://127.0.0.1:{stub}/v1", api_key: none}}
  - model_name: paced
    litellm_params: {{model: openai/stub, api_base: "http://127.0.0.1:{paced}/v1", api_key: none}}
litellm_settings:
  telemetry: false
  set_verbose: false
  drop_params: true
general_settings:
  disable_spend_logs: true
  disable_error_logs: true
  dangerously_permit_weak_or_unset_master_key: true  # loopback only; xgen runs without a key too
"""


def run_xgen(port: int, stub: int, paced: int) -> None:
    """xgen's front and app as `xgen serve` runs them, the two stubs registered as loaded models."""
    from reconciler.serve import serve_app
    from reconciler.spec import ModelSpec, Spec
    from reconciler.state import ModelInfo, ModelState
    from reconciler.store import StateStore
    from reconciler.web.app import create_app

    spec = Spec(models={"stub": ModelSpec(path="/stub.gguf"), "paced": ModelSpec(path="/paced.gguf")}, active="stub")
    store = StateStore()
    for name, port_of in (("stub", stub), ("paced", paced)):
        store.models[name] = ModelInfo(name, spec.models[name], "llama-server", ModelState.LOADED, port=port_of,
                                       started_at=time.time())
    app = create_app(store, lambda: spec, {}, {})
    serve_app(app, "127.0.0.1", port)


def litellm_python() -> Path:
    """LiteLLM's own virtualenv, made on first use."""
    venv = Path(os.environ.get("XGEN_CACHE_DIR", Path.home() / ".cache" / "xgen")) / "peers" / f"litellm-{LITELLM}"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing litellm[proxy]=={LITELLM} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM}"], check=True)
    return python


def on_core(core: int | None) -> Any:
    """A Popen preexec_fn that pins the child (and all it starts) to one core; None: no pinning."""
    return None if core is None else (lambda: os.sched_setaffinity(0, {core}))


def start_litellm(work: Path, port: int, stub: int, paced: int, core: int | None) -> subprocess.Popen[bytes]:
    config = work / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(stub=stub, paced=paced))
    python = litellm_python()
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    return subprocess.Popen([str(python.with_name("litellm")), "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "1"], env=env,
                            stdout=(work / "litellm.log").open("ab"), stderr=subprocess.STDOUT,
                            preexec_fn=on_core(core))


def frames(body: bytes) -> tuple[int, bool]:
    """SSE events in a stream, and whether it ended with [DONE]."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    return len(events), bool(events) and events[-1].strip() == b"data: [DONE]"


def goal(met: bool, what: str) -> None:
    print(f"   goal (issue 13): {what}: {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of a tenth of the requests")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of turns; the median is reported")
    parser.add_argument("--no-litellm", action="store_true", help="direct and xgen only")
    parser.add_argument("--pin", action="store_true", help="the client and the stubs on core 0, the tool measured on "
                        "core 1 (tells the tool's own cost from three processes sharing two cores)")
    parser.add_argument("--serve-xgen", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_xgen:
        return run_xgen(*args.serve_xgen)

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="xgen-peers-"))
    stub, paced, xgen, peer = free_port(), free_port(), free_port(), free_port()
    proxy_py = str(Path(__file__).resolve().with_name("proxy.py"))
    near, far = (0, 1) if args.pin else (None, None)
    if near is not None:
        os.sched_setaffinity(0, {near})  # the client
    procs = [
        subprocess.Popen([sys.executable, proxy_py, "--serve-stub", str(stub)], preexec_fn=on_core(near)),
        subprocess.Popen([sys.executable, proxy_py, "--serve-stub", str(paced), "--pace-ms", str(PACE_MS)],
                         preexec_fn=on_core(near)),
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-xgen", str(xgen), str(stub),
                          str(paced)], preexec_fn=on_core(far)),
    ]
    if not args.no_litellm:
        procs.append(start_litellm(work, peer, stub, paced, far))
    tools = {"xgen": procs[2], f"LiteLLM {LITELLM}": procs[-1]} if not args.no_litellm else {"xgen": procs[2]}

    def run(label: str, port: int, *a: Any, **kw: Any) -> dict[str, float]:
        """One tool's turn; the other tools are stopped (SIGSTOP) meanwhile, so an idle peer's
        background work (LiteLLM's is measurable) takes nothing from the one being measured."""
        for other, proc in tools.items():
            if other != label:
                proc.send_signal(signal.SIGSTOP)
        try:
            return asyncio.run(load(port, *a, **kw))
        finally:
            for proc in tools.values():
                proc.send_signal(signal.SIGCONT)

    rounds = 1 if args.quick else args.rounds
    scale = 0.1 if args.quick else 1.0

    def count(label: str, fast: int, slow: int) -> int:
        """Requests in a turn: enough for a steady p99 (a turn of ~1 s) from direct and xgen, fewer
        from LiteLLM, which serves ~60 a second."""
        return max(int(scale * (fast if label in ("direct", "xgen") else slow)), 20)

    def turns(measure: Any) -> list[dict[str, dict[str, float]]]:
        """`rounds` rounds, in each of which every target takes its turn right after direct's:
        a tool's figures are compared with direct's from the same moment (the machine's load
        drifts from second to second), and the median round is reported."""
        return [{label: measure(label, port) for label, port in targets} for _ in range(rounds)]

    def summary(got: list[dict[str, dict[str, float]]], label: str) -> dict[str, float]:
        """Medians over the rounds of `label`'s figures, of what each adds to direct's ("+p99")
        and of its share of direct's rate ("share"), each taken within its round."""
        out = {k: statistics.median(r[label][k] for r in got) for k in got[0][label]}
        for k in ("p50", "p99", "ttfb50", "ttfb99"):
            out["+" + k] = statistics.median(r[label][k] - r["direct"][k] for r in got)
        out["share"] = statistics.median(r[label]["rps"] / r["direct"]["rps"] for r in got)
        return out

    def shares(got: list[dict[str, dict[str, float]]], label: str) -> str:
        each = ", ".join(f"{100 * r[label]['rps'] / r['direct']['rps']:.0f}%" for r in got)
        return f" (rounds: {each})" if len(got) > 1 else ""

    try:
        wait_http(stub)
        wait_http(paced)
        wait_http(xgen)
        targets = [("direct", stub), ("xgen", xgen)]
        if not args.no_litellm:
            try:
                wait_http(peer, "/health/liveliness", timeout=300)
            except TimeoutError:
                raise SystemExit(f"LiteLLM did not start; see {work / 'litellm.log'}") from None
            targets.append((f"LiteLLM {LITELLM}", peer))
        print(f"stub backend, one client, {os.cpu_count()} cores; LiteLLM {LITELLM} (one worker, logging and "
              f"telemetry off){' not run' if args.no_litellm else ''}; work in {work}"
              + ("; pinned: client and stubs on core 0, the tool measured on core 1" if args.pin else "")
              + f"\neach figure: the median of {rounds} round(s), a tool's turn right after direct's; "
              f"added and % of direct are taken within each round")
        chat = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}

        print("\n1. non-streaming chat (added = tool - direct)")
        for c, fast, slow in ((1, 2000, 300), (16, 10_000, 600), (64, 20_000, 600)):
            got = turns(lambda label, port, c=c, fast=fast, slow=slow: run(
                label, port, c, count(label, fast, slow), False, chat))
            for label, _ in targets:
                x = summary(got, label)
                added = "" if label == "direct" else (
                    f"  added p50 {x['+p50']:+7.2f} ms p99 {x['+p99']:+7.2f} ms  "
                    f"{100 * x['share']:5.1f}% of direct{shares(got, label)}")
                print(f"   c={c:<3} {label:<16} p50 {x['p50']:7.2f} ms p99 {x['p99']:7.2f} ms "
                      f"{x['rps']:8.0f} req/s{added}")
            x = summary(got, "xgen")
            if c == 1:
                goal(x["+p50"] <= 0.3 and x["+p99"] <= 0.7, "added p50 <= 0.3 ms, p99 <= 0.7 ms")
            elif c == 64:
                goal(x["+p99"] <= 10 and x["share"] >= 0.4, "added p99 <= 10 ms, >= 40% of direct")

        print(f"\n2. 128 streams, a token every {PACE_MS:g} ms ({STREAM_CHUNKS} tokens each)")
        streamed = {"model": "paced", "messages": [{"role": "user", "content": "hi"}], "max_tokens": STREAM_CHUNKS}
        bodies: dict[str, list[bytes]] = collections.defaultdict(list)

        def streams(label: str, port: int) -> dict[str, float]:
            return run(label, paced if label == "direct" else port, 128, 128, True, streamed, bodies=bodies[label])

        got = turns(streams)
        reference = bodies["direct"][0]
        for label, _ in targets:
            seen = bodies[label]
            if label == "direct":
                intact = f"{sum(b == reference for b in seen)}/{len(seen)} identical"
            elif label == "xgen":
                intact = f"{sum(b == reference for b in seen)}/{len(seen)} byte for byte as direct"
            else:
                want = frames(reference)[0]
                kinds = ", ".join(f"{events} events{'' if done else ' no [DONE]'} ×{n}"
                                  for (events, done), n in collections.Counter(frames(b) for b in seen).most_common(2))
                intact = (f"{sum(frames(b) == (want, True) for b in seen)}/{len(seen)} with direct's {want} "
                          f"events and [DONE] (seen: {kinds})")
            x = summary(got, label)
            added = "" if label == "direct" else f" (added {x['+ttfb50']:+.2f} / {x['+ttfb99']:+.2f} ms)"
            print(f"   {label:<16} TTFB p50 {x['ttfb50']:7.2f} ms p99 {x['ttfb99']:7.2f} ms{added}; "
                  f"{STREAM_CHUNKS * x['rps']:7.0f} tokens/s = {100 * x['share']:5.1f}% of direct; {intact}")
            if label == "xgen":
                goal(x["+ttfb99"] <= 10 and x["share"] >= 0.98 and all(b == reference for b in seen),
                     "added TTFB p99 <= 10 ms, >= 98% of direct tokens/s, every frame exact")

        print("\n3. a 200 KB prompt, concurrency 8, non-streaming")
        big = {**chat, "messages": [{"role": "user", "content": "word " * 40_000}]}
        got = turns(lambda label, port: run(label, port, 8, count(label, 3000, 200), False, big))
        for label, _ in targets:
            x = summary(got, label)
            added = "" if label == "direct" else (
                f"  added p50 {x['+p50']:+6.2f} ms p99 {x['+p99']:+6.2f} ms  "
                f"{100 * x['share']:5.1f}% of direct{shares(got, label)}")
            print(f"   {label:<16} p50 {x['p50']:7.2f} ms p99 {x['p99']:7.2f} ms {x['rps']:7.0f} req/s{added}")
        goal(summary(got, "xgen")["+p99"] <= 2, "added p99 <= 2 ms")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


if __name__ == "__main__":
    main()

"""What request policy adds to a request, beside a plain one, in one run.

The fast stub backend of benchmarks/proxy.py (it isolates the proxy), reached directly and
through xgen's proxy app as:
  plain     a model with no policy (the baseline every other line is compared with)
  variant   `stub:hot` (a variant: the body is parsed, changed and re-encoded)
  params    a model with set/default/strip rules (the same work)
  gated     a model with max_concurrent 64 (a turn taken and given back; nobody waits here)
  remote    a remote model whose url is a second xgen in front of the stub (two proxy hops;
            "far only" is that second xgen reached directly: one hop through another process)
Non-streaming chat requests at concurrency 1 and 16; p50/p99 and the added time against plain.
Goal: a variant, rules and the gate add well under 0.1 ms at p50; a remote model adds one
proxy hop (about what plain adds over direct).

Usage: python benchmarks/policy.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

from proxy import load, run_proxy, wait_http

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from net import free_port


def run_policy_proxy(port: int, stub_port: int, far_port: int) -> None:
    """xgen's app with the stub under several policies, and a remote model behind a second xgen."""
    from reconciler.serve import serve_app
    from reconciler.spec import ModelSpec, ParamRules, Spec
    from reconciler.state import ModelInfo, ModelState
    from reconciler.store import StateStore
    from reconciler.web.app import create_app

    local = ModelSpec(path="/stub.gguf")
    models = {
        "plain": local,
        "stub": local.model_copy(update={"variants": {"hot": {"temperature": 0.5, "top_k": 20}}}),
        "params": local.model_copy(update={"params": ParamRules(set={"temperature": 0.2}, default={"top_k": 20},
                                                                strip=["seed"])}),
        "gated": local.model_copy(update={"max_concurrent": 64}),
        "far": ModelSpec(backend="remote", url=f"http://127.0.0.1:{far_port}/v1", remote_model="stub"),
    }
    spec = Spec(models=models, active="plain")
    store = StateStore()
    for name, model in models.items():
        backend = "remote" if name == "far" else "llama-server"
        store.models[name] = ModelInfo(name, model, backend, ModelState.LOADED,
                                       port=None if name == "far" else stub_port, started_at=time.time())
    store.active = "plain"
    app = create_app(store, lambda: spec, {}, {})
    serve_app(app, "127.0.0.1", port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-far", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return run_policy_proxy(*args.serve)
    if args.serve_far:
        return run_proxy(*args.serve_far)

    stub, far, near = free_port(), free_port(), free_port()
    here = str(Path(__file__).resolve())
    procs = [
        subprocess.Popen([sys.executable, str(Path(here).with_name("proxy.py")), "--serve-stub", str(stub)]),
        subprocess.Popen([sys.executable, here, "--serve-far", str(far), str(stub)]),
        subprocess.Popen([sys.executable, here, "--serve", str(near), str(stub), str(far)]),
    ]
    total = 500 if args.quick else 3000
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 1.0, "seed": 7}
    rows = [("direct", stub, "plain"), ("plain", near, "plain"), ("far only", far, "stub"),
            ("variant", near, "stub:hot"), ("params", near, "params"), ("gated", near, "gated"),
            ("remote", near, "far")]
    try:
        wait_http(stub)
        wait_http(far)
        wait_http(near)
        for concurrency in (1, 16):
            print(f"\nconcurrency {concurrency}, {max(total, concurrency * 50)} non-streaming requests each "
                  "(the rows take turns, twice)")
            results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in rows}
            for _ in range(2):  # two rounds, interleaved, so every row sees the same machine
                for label, port, model in rows:
                    results[label].append(asyncio.run(
                        load(port, concurrency, max(total, concurrency * 50), False, {**base, "model": model})))
            best = {label: min(runs, key=lambda r: r["p50"]) for label, runs in results.items()}
            plain = best["plain"]
            for label, _, _ in rows:
                r = best[label]
                versus = "" if label in ("direct", "plain", "far only") else (
                    f"  | vs plain: p50 {r['p50'] - plain['p50']:+.3f} ms, p99 {r['p99'] - plain['p99']:+.3f} ms")
                print(f"  {label:<8} p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  {r['rps']:.0f} req/s{versus}")
            print(f"  (plain adds p50 {plain['p50'] - best['direct']['p50']:+.3f} ms over direct: one proxy hop)")
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()

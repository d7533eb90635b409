"""Replacing a running model: what clients see, surge beside recreate, in one run.

Real daemon, real llama-server with the default model, given half the cores (during a surge two
processes run; more threads than cores make llama.cpp crawl, which is why `replace: auto`
recreates there). Clients (half streaming) send chat requests for the whole run. For each
strategy (`replace: surge`, then `replace: recreate`): steady state for a few seconds (the
baseline), then N replacements (n_ctx alternating). Printed: non-200 answers, broken streams,
and p50/p99 latency during the replacements against steady state (goal for surge: 0 failed,
0 broken, p99 within 2x).

Then two more figures:
- parallel convergence: with a backend whose load takes SLOW_S (a test double that becomes
  ready after a delay), a save that adds an unrelated tiny model: its time to LOADED, against the
  same model's time to LOADED with nothing else loading (goal: within +200 ms);
- a failed update (a path to a file that is not a model): requests failed meanwhile (goal 0) and
  the time from the save to the `rolled_back` event.

Usage: python benchmarks/replace.py [--replacements 50] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Clients, Daemon
from slow_backend import write_slow_backend
from tinygguf import write_tiny_llama

from reconciler.install import default_model_path

SLOW_S = 30.0


def model(n_ctx: int, strategy: str) -> str:
    # one thread per llama-server: during a surge two run, and llama.cpp's spinning threads must not
    # outnumber the cores (xgen's `auto` picks recreate when they would)
    threads = max(1, (os.cpu_count() or 2) // 2)
    return (
        f"models:\n  chat:\n    path: {default_model_path()}\n    n_ctx: {n_ctx}\n    replace: {strategy}\n"
        f"    llama: {{threads: {threads}}}\n"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def replacements(d: Daemon, clients: Clients, strategy: str, count: int) -> str:
    d.save_spec(model(1024, strategy))
    d.converged()
    t0 = time.monotonic()
    time.sleep(5)
    steady = [r[1] for r in clients.window(t0, time.monotonic())]
    t1 = time.monotonic()
    for i in range(count):
        d.save_spec(model(1536 if i % 2 == 0 else 1024, strategy))
        d.converged()
    rows = clients.window(t1, time.monotonic())
    failed = sum(1 for r in rows if not r[2])
    during = [r[1] for r in rows if r[2]]
    return (
        f"| {strategy} | {count} in {time.monotonic() - t1:.0f} s | {len(rows)} | {failed} | "
        f"{pct(during, 0.5):.0f} / {pct(during, 0.99):.0f} ms | {pct(steady, 0.5):.0f} / {pct(steady, 0.99):.0f} ms | "
        f"{pct(during, 0.99) / pct(steady, 0.99):.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replacements", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xgen-replace-"))
    tiny = write_tiny_llama(work / "tiny.gguf")
    d = Daemon(work, 33000 + os.getpid() % 500 * 20)
    d.save_spec(model(1024, "surge"))
    d.start()
    d.converged()
    body = {"messages": [{"role": "user", "content": "Count to five"}], "max_tokens": 8}
    clients = Clients(f"http://127.0.0.1:{d.port}", args.clients, body)
    rows = [replacements(d, clients, strategy, args.replacements) for strategy in ("surge", "recreate")]
    print("| strategy | replacements | requests meanwhile | failed or broken | p50 / p99 during | "
          "p50 / p99 steady | p99 ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for failure in clients.failures[:5]:
        print(f"  failed: {failure}")

    # a failed update: the old version keeps answering
    since = d.status()["last_event_id"]
    bogus = work / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)  # passes the magic check, fails in llama.cpp
    t0 = time.monotonic()
    d.save_spec(model(1024, "surge").replace(str(default_model_path()), str(bogus)))
    d.wait(lambda s: s["loaded_models"][0]["update"]["error"])
    rolled = time.monotonic() - t0
    time.sleep(2)
    meanwhile = clients.window(t0, time.monotonic())
    kinds = [k for k, _ in d.events(since) if k in ("replace_started", "rolled_back")]
    clients.close()
    print(f"\nfailed update (a GGUF that llama.cpp refuses): save -> update failed + old version serving "
          f"{rolled * 1000:.0f} ms (events {kinds}); {sum(1 for r in meanwhile if not r[2])} of {len(meanwhile)} "
          "requests failed meanwhile")
    d.save_spec(model(1024, "surge"))
    d.converged()

    # parallel convergence: the tiny model alone, then beside a slow load
    alone_body = model(1024, "surge") + f"  tiny:\n    path: {tiny}\n    n_ctx: 256\n"
    t0 = time.monotonic()
    d.save_spec(alone_body)
    d.wait(lambda s: any(m["name"] == "tiny" and m["state"] == "LOADED" for m in s["loaded_models"]))
    alone = time.monotonic() - t0
    d.save_spec(model(1024, "surge"))
    d.converged()
    script, slow_dir = write_slow_backend(work / "slow", SLOW_S)
    slow = f"  slow:\n    path: {slow_dir}\n    backend: vllm\n    vllm:\n      python: {script}\n"
    d.save_spec(model(1024, "surge") + slow)
    d.wait(lambda s: any(m["name"] == "slow" and m["state"] == "LOADING" for m in s["loaded_models"]))
    t0 = time.monotonic()
    d.save_spec(model(1024, "surge") + slow + f"  tiny:\n    path: {tiny}\n    n_ctx: 256\n")
    status = d.wait(lambda s: any(m["name"] == "tiny" and m["state"] == "LOADED" for m in s["loaded_models"]))
    beside = time.monotonic() - t0
    slow_state = next(m["state"] for m in status["loaded_models"] if m["name"] == "slow")
    print(f"a save adding a tiny model -> LOADED: {beside * 1000:.0f} ms while a {SLOW_S:.0f} s load runs "
          f"(still {slow_state}); alone: {alone * 1000:.0f} ms; difference {(beside - alone) * 1000:+.0f} ms "
          "(goal <= +200 ms)")
    d.stop()


if __name__ == "__main__":
    main()

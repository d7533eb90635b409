"""Reliability under faults: the real daemon and llama-server while clients keep sending requests.

Clients send chat requests (max_tokens 1) to `stable`, a model whose entry never changes, for the
whole run. Meanwhile the script does, in order:

1. quiet: nothing (the baseline: requests/s and failures with no fault);
2. saves: SAVES random saves of models.yaml, each one of: a valid edit of `churn` (n_ctx, aliases,
   loaded/unloaded), the active model switched, a torn in-place write (two pieces, 0-50 ms
   apart), random bytes, non-UTF-8, a python tag, an alias cycle, an alias bomb, a truncation.
   Goal: 0 daemon exits, 0 failed requests to `stable`, `stable` never restarted;
3. backend kills: kill -9 of `churn`'s llama-server three times: time from the kill to LOADED;
4. a launch change of `stable` (n_ctx) under load: requests failed and the longest stall;
5. kill -9 of the daemon, then a restart: time to the first answer, and backend processes left
   (exactly one per model).

Prints a Markdown table (docs/reliability.md has one). Usage:
    python benchmarks/reliability.py [--saves 1000] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Clients, Daemon
from test_spec_faults import billion_laughs
from tinygguf import write_tiny_llama

from reconciler.install import default_model_path

BASE = """\
models:
  stable:
    path: {model}
    n_ctx: {stable_ctx}
    aliases: [default]
  churn:
    path: {tiny}
    n_ctx: {n_ctx}
    aliases: [{aliases}]
    desired: {desired}
active: {active}
"""


class Churn:
    """The two-model file of this benchmark, with `churn`'s entry varied."""

    def __init__(self, work: Path) -> None:
        self.d = Daemon(work, 31000 + os.getpid() % 500 * 20)
        self.vars: dict[str, Any] = {
            "model": default_model_path(), "tiny": write_tiny_llama(work / "tiny.gguf"), "n_ctx": 256,
            "aliases": "c", "desired": "loaded", "active": "stable", "stable_ctx": 1024,
        }

    def text(self, **over: Any) -> str:
        return self.d.head + BASE.format(**{**self.vars, **over})


def random_save(c: Churn, rng: random.Random) -> str:
    d = c.d
    kind = rng.choice(["edit", "edit", "edit", "active", "torn", "torn", "bytes", "utf8", "tag", "cycle", "bomb",
                       "cut"])
    valid = c.text(n_ctx=rng.choice([256, 320, 384]), aliases=rng.choice(["c", "c2", "c, c3"]),
                   desired=rng.choice(["loaded", "loaded", "unloaded"]))
    if kind == "edit":
        d.save(valid.encode())
    elif kind == "active":
        d.save(valid.replace("active: stable", "active: churn" if "desired: loaded" in valid else "active: stable")
               .encode())
    elif kind == "torn":
        data = valid.encode()
        cut = rng.randrange(1, len(data))
        with d.file.open("wb") as f:
            f.write(data[:cut])
            f.flush()
            time.sleep(rng.choice([0, 0.01, 0.025, 0.05]))
            f.write(data[cut:])
    elif kind == "bytes":
        d.save(rng.randbytes(rng.randrange(1, 400)))
    elif kind == "utf8":
        d.save(b"version: 1\n\xff\xfe garbage\n")
    elif kind == "tag":
        d.save(b"- !!python/object:os.system ls\n")
    elif kind == "cycle":
        d.save(b"a: &a [*a]\n")
    elif kind == "bomb":
        d.save(billion_laughs())
    else:
        d.save(valid.encode()[: rng.randrange(1, len(valid))])
    return kind


def backends(d: Daemon) -> list[int]:
    """llama-server processes listening in this daemon's port range."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and argv[0].endswith("llama-server") and "--port" in argv:
            port = int(argv[argv.index("--port") + 1])
            if d.low <= port <= d.low + 19:
                found.append(proc.pid)
    return found


def first_answer_after(clients: Clients, t0: float, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = [start + took for start, took, ok in clients.window(t0, float("inf")) if ok]
        if answered:
            return min(answered)
        time.sleep(0.02)
    raise SystemExit("no answer after the restart")


def summarize(rows: list[tuple[float, float, bool]]) -> tuple[int, int, float]:
    failed = sum(1 for r in rows if not r[2])
    stall = max((r[1] for r in rows), default=0.0)
    return len(rows), failed, stall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="xgen-reliability-"))
    c = Churn(work)
    d = c.d
    d.save(c.text().encode())
    d.start()
    d.converged()
    stable_pid = d.model("stable")["pid"]
    body = {"model": "stable", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    clients = Clients(f"http://127.0.0.1:{d.port}", args.clients, body, streams=False)
    table: list[tuple[str, str, str, str]] = []

    t0 = time.monotonic()
    time.sleep(5)
    quiet = summarize(clients.window(t0, time.monotonic()))
    quiet_rps = quiet[0] / (time.monotonic() - t0)
    table.append(("none (baseline)", f"{quiet[0]} requests, {quiet_rps:.0f}/s", "-", f"{quiet[1]} failed"))

    t0 = time.monotonic()
    kinds: dict[str, int] = {}
    exits = 0
    for _ in range(args.saves):
        kind = random_save(c, rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        time.sleep(rng.uniform(0.005, 0.08))
        if d.proc is not None and d.proc.poll() is not None:
            exits += 1
            break
    d.save(c.text().encode())
    d.converged()
    churn_s = time.monotonic() - t0
    n, failed, stall = summarize(clients.window(t0, time.monotonic()))
    restarted = d.model("stable")["pid"] != stable_pid
    table.append((
        f"{args.saves} random saves in {churn_s:.0f} s ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})",
        f"daemon exits {exits}; `stable` restarted: {'yes' if restarted else 'no'}",
        "-",
        f"{failed} of {n} failed; {n / churn_s / quiet_rps:.2f}x quiet throughput; longest {stall * 1000:.0f} ms",
    ))

    for i in range(3):
        pid = d.model("churn")["pid"]
        t0 = time.monotonic()
        os.kill(pid, 9)
        d.wait(lambda s, p=pid: any(m["name"] == "churn" and m["state"] == "LOADED" and m["pid"] != p
                                    for m in s["loaded_models"]))
        recover = time.monotonic() - t0
        n, failed, _ = summarize(clients.window(t0, time.monotonic()))
        table.append((f"kill -9 of a backend (`churn`, crash {i + 1})", "ERROR, restarted after the backoff",
                      f"{recover:.2f} s", f"{failed} of {n} to `stable` failed"))

    t0 = time.monotonic()
    d.save(c.text(stable_ctx=2048).encode())
    d.converged()
    time.sleep(0.5)
    n, failed, stall = summarize(clients.window(t0, time.monotonic()))
    table.append(("launch change of `stable` (n_ctx) under load", "drain, stop, start; requests held meanwhile",
                  f"{time.monotonic() - t0:.2f} s", f"{failed} of {n} failed; longest {stall * 1000:.0f} ms"))

    assert d.proc is not None
    groups = [m["pid"] for m in d.status()["loaded_models"]]
    d.proc.kill()
    d.proc.wait()
    t0 = time.monotonic()
    d.start()
    d.wait(lambda s: s["loaded_models"] and all(m["state"] == "LOADED" for m in s["loaded_models"]))
    first = first_answer_after(clients, t0)
    alive_old = [g for g in groups if psutil.pid_exists(g)]
    table.append(("kill -9 of the daemon, then a restart",
                  f"old backends left: {len(alive_old)}; llama-server processes now: {len(backends(d))} "
                  f"for {len(d.status()['loaded_models'])} models", f"{first - t0:.2f} s to the first answer",
                  "(daemon down meanwhile)"))

    clients.close()
    d.stop()
    print("| fault | what xgen did | time to recover | requests |")
    print("|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print(json.dumps({"work": str(work), "quiet_rps": round(quiet_rps, 1)}))


if __name__ == "__main__":
    main()

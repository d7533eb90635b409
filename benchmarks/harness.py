"""A real `xgen serve` for the benchmarks: write its file, start it, read its status and events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from net import free_port, poll_status


class Clients:
    """Threads sending chat requests (every other one streaming when `streams`) until closed;
    each outcome is kept as (start, seconds, ok: 200 and, for a stream, whole to [DONE])."""

    def __init__(self, url: str, count: int, body: dict[str, Any], streams: bool = True) -> None:
        self.url = url
        self.body = body
        self.rows: list[tuple[float, float, bool]] = []  # start, seconds, ok (200 and a whole stream)
        self.failures: list[str] = []  # what went wrong, for the report
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(streams and i % 2 == 0,), daemon=True) for i in range(count)
        ]
        for t in self.threads:
            t.start()

    def _run(self, stream: bool) -> None:
        body = {**self.body, "stream": stream}
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                t0 = time.monotonic()
                why = ""
                try:
                    if stream:
                        with http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                            lines = [line for line in r.iter_lines() if line]
                            ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                            why = f"stream {r.status_code}: {lines[-1:]}"
                    else:
                        r = http.post(f"{self.url}/v1/chat/completions", json=body)
                        ok, why = r.status_code == 200, f"{r.status_code}: {r.text[:300]}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                if not ok:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {why[:300]}")
                with self.lock:
                    self.rows.append((t0, time.monotonic() - t0, ok))
                if not ok:
                    time.sleep(0.05)  # the daemon may be down: do not spin

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        with self.lock:
            return [r for r in self.rows if start <= r[0] < end]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


class Daemon:
    def __init__(self, work: Path, low: int) -> None:
        self.work = work
        self.file = work / "models.yaml"
        self.port = free_port()
        self.low = low  # backend ports: low .. low + 19
        self.head = f"server: {{port: {self.port}, port_range: [{low}, {low + 19}], stop_grace_s: 5}}\n"
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def save(self, data: bytes) -> None:
        """Replace models.yaml atomically with exactly these bytes."""
        tmp = self.file.with_name(".models.yaml.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.file)

    def save_spec(self, body: str) -> str:
        """Write the server header and `body`; return the generation."""
        from reconciler.spec import load

        self.save((self.head + body).encode())
        return load(self.file).generation

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "serve", "models.yaml"], cwd=self.work,
                                     stdout=(self.work / "daemon.log").open("ab"), stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/api/management/status").json()
        return result

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.status()["loaded_models"] if m["name"] == name)

    def wait(self, check: Any, timeout: float = 300) -> dict[str, Any]:
        try:
            passed, last = poll_status(self.http, self.proc, check, timeout, interval=0.01)
        except ChildProcessError as exc:
            raise SystemExit(f"{exc}; see {self.work / 'daemon.log'}") from None
        if not passed:
            raise SystemExit(f"timed out; see {self.work / 'daemon.log'}")
        return last

    def converged(self) -> dict[str, Any]:
        from reconciler.spec import load

        generation = load(self.file).generation
        return self.wait(lambda s: s["observed_generation"] == generation and s["status"] == "converged")

    def events(self, since: int, until: threading.Event | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Every event after `since`, read from the SSE stream: up to the last one published now,
        or, given `until`, as they come until it is set and the stream is idle (a long run can
        publish more than the daemon's backlog keeps, so read it from a thread meanwhile)."""
        out, kind, current = [], "", 0
        last = self.status()["last_event_id"]
        with httpx.Client(base_url=str(self.http.base_url), timeout=httpx.Timeout(30, read=20)) as http, \
                http.stream("GET", "/api/events", params={"last_event_id": since}) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("id: "):
                    current = int(line[4:])
                elif line.startswith("data: "):
                    out.append((kind, json.loads(line[6:])))
                if (until is None or until.is_set()) and current >= (last if until is None else self.last_id()):
                    break
        return out

    def last_id(self) -> int:
        return int(self.status()["last_event_id"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

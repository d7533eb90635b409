"""A real `xgen serve` for the benchmarks: write its file, start it, read its status and events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from net import free_port


class Daemon:
    def __init__(self, work: Path, low: int) -> None:
        self.work = work
        self.file = work / "models.yaml"
        self.port = free_port()
        self.low = low  # backend ports: low .. low + 19
        self.head = f"server: {{port: {self.port}, port_range: [{low}, {low + 19}], stop_grace_s: 5}}\n"
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self.proc: subprocess.Popen[bytes] | None = None

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}; see {self.work / 'daemon.log'}")
            try:
                status = self.status()
                if check(status):
                    return status
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.01)
        raise SystemExit(f"timed out; see {self.work / 'daemon.log'}")

    def converged(self) -> dict[str, Any]:
        from reconciler.spec import load

        generation = load(self.file).generation
        return self.wait(lambda s: s["observed_generation"] == generation and s["status"] == "converged")

    def events(self, since: int) -> list[tuple[str, dict[str, Any]]]:
        """Every event after `since`, read from the SSE stream."""
        out, kind, current = [], "", 0
        last = self.status()["last_event_id"]
        with self.http.stream("GET", "/api/events", params={"last_event_id": since}) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("id: "):
                    current = int(line[4:])
                elif line.startswith("data: "):
                    out.append((kind, json.loads(line[6:])))
                    if current >= last:
                        break
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

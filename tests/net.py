"""Loopback helpers shared by the tests and the benchmarks."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll_status(
    http: httpx.Client, proc: subprocess.Popen[bytes] | None, check: Callable[[dict[str, Any]], Any],
    timeout: float, interval: float = 0.05,
) -> tuple[bool, dict[str, Any]]:
    """Ask a daemon for its status until `check` passes or `timeout` ends: (passed, the last
    status seen). Raises ChildProcessError once the daemon's process has exited."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildProcessError(f"xgen serve exited with {proc.returncode}")
        try:
            last = http.get("/api/management/status").json()
            if check(last):
                return True, last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(interval)
    return False, last

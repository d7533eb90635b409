"""Backend ports: taken from the configured range, probed free by binding before use.

A port some other process holds is skipped, not fought over.
"""

from __future__ import annotations

import socket


class PortsExhausted(Exception):
    pass


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on the port. SO_REUSEADDR as servers set it: a port whose old
    connections sit in TIME_WAIT after a stop is free for the next backend."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.held: dict[str, int] = {}

    def allocate(self, name: str, fixed: int | None = None, prefer: int | None = None) -> int:
        """A free port for `name`: its fixed one, else `prefer` (its previous one), else the lowest free."""
        self.release(name)
        taken = set(self.held.values())
        if fixed is not None:
            if fixed in taken or not is_free(fixed):
                raise PortsExhausted(f"port {fixed} (pinned by the spec) is in use by another process")
            self.held[name] = fixed
            return fixed
        candidates = range(self.low, self.high + 1)
        if prefer is not None and self.low <= prefer <= self.high:
            candidates = [prefer, *candidates]  # type: ignore[assignment]
        for port in candidates:
            if port not in taken and is_free(port):
                self.held[name] = port
                return port
        raise PortsExhausted(
            f"no free port in {self.low}-{self.high} ({len(taken)} held by xgen, the rest by "
            "other processes); widen server.port_range"
        )

    def release(self, name: str) -> None:
        self.held.pop(name, None)

    def move(self, src: str, dst: str) -> None:
        """Hold `src`'s port under `dst` (a surge's new process becomes the model's)."""
        if src in self.held:
            self.held[dst] = self.held.pop(src)

"""Process lifetimes read back from the daemon's state events (tests and benchmarks share it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def alive_at_most(events: Iterable[tuple[str, dict[str, Any]]]) -> tuple[int, int]:
    """The most model processes alive at once, overall and of any one model: a process lives
    from its first state (from nothing) to GONE."""
    alive: dict[str, int] = {}
    most = most_one = 0
    for kind, data in events:
        if kind != "state":
            continue
        model = data["model"]
        if data["from"] is None:
            alive[model] = alive.get(model, 0) + 1
        elif data["to"] == "GONE":
            alive[model] -= 1
        most, most_one = max(most, sum(alive.values())), max(most_one, *alive.values(), 0)
    return most, most_one

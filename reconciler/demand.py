"""Which on-demand models are resident: the pure choices behind loading on request, idle unload
and eviction. No clocks and no I/O: the time and the usage come in as data, so `xgen plan` and
the daemon decide alike and the choices get plain unit tests.

The rules (DESIGN.md, "Demand and memory"):
- a model that requests wait for is loaded if it fits its devices' budgets (and
  `server.max_loaded`) beside the pinned models and the on-demand models already resident;
- otherwise resident on-demand models that share a device it needs are evicted: idle ones before
  ones with requests in flight (those are drained first), and among them the one whose reload
  costs least per second it has sat idle (its measured load time / its idle time), so a model idle
  for long and quick to bring back goes first; a model that requests wait for is never evicted;
- when the only models in the way are ones other requests wait for, the request waits its turn
  (the next pass, when those are served, evicts them by the same rule);
- when even evicting every on-demand model cannot make room, nothing is evicted and the request
  is refused with the numbers (needed, free, held by pinned models): a GPU is never oversubscribed;
- a resident model unused for its `idle_unload_s` with nothing in flight is unloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_LOAD_S = 1.0  # the reload cost assumed for a model never loaded here


@dataclass(frozen=True)
class Usage:
    """How a model is used, as the proxy saw it."""

    last_used: float | None = None  # when a request for it last started or ended
    waiting: int = 0  # requests waiting for it to load
    wanted_at: float | None = None  # when the first of those arrived
    inflight: int = 0
    load_s: float | None = None  # how long its last load took, start to ready

    def to_json(self) -> dict[str, object]:
        return {
            "last_used": self.last_used,
            "waiting": self.waiting,
            "wanted_at": self.wanted_at,
            "inflight": self.inflight,
            "load_s": self.load_s,
        }


@dataclass(frozen=True)
class Candidate:
    """An on-demand model as the decision sees it."""

    name: str
    devices: tuple[str, ...]  # "cpu", or "gpu0", "gpu1" …
    need: Mapping[str, int] | None  # bytes per device; None: no estimate (only max_loaded holds it back)
    resident: bool  # a process of it exists now (loading, loaded or failed)
    usage: Usage = Usage()
    idle_unload_s: float | None = None


@dataclass(frozen=True)
class Room:
    """One device's budget: what xgen's models may use on it, and what pinned models hold."""

    device: str
    budget: int  # usable now: the configured budget, less what other processes take beyond it
    pinned: Mapping[str, int] = field(default_factory=dict)
    others: int = 0  # what processes xgen does not own hold on the device

    @property
    def held(self) -> int:
        return sum(self.pinned.values())


@dataclass(frozen=True)
class Decision:
    keep: Mapping[str, str] = field(default_factory=dict)  # resident or to be loaded: why
    unload: Mapping[str, tuple[Literal["idle", "evict"], str]] = field(default_factory=dict)  # name → (cause, why)
    refused: Mapping[str, str] = field(default_factory=dict)  # wanted, but nothing can make room: why
    queued: Mapping[str, str] = field(default_factory=dict)  # wanted, room held by waited-for models: why


def devices_of(gpus: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"gpu{g}" for g in gpus) or ("cpu",)


def decide(
    candidates: Sequence[Candidate],
    rooms: Mapping[str, Room],
    now: float,
    pinned_count: int = 0,
    max_loaded: int | None = None,
) -> Decision:
    """The resident set after this moment's requests: what to keep, load, unload and refuse."""
    keep: dict[str, str] = {}
    unload: dict[str, tuple[Literal["idle", "evict"], str]] = {}
    for c in candidates:
        if not c.resident:
            continue
        idle = now - (c.usage.last_used or now)
        if c.idle_unload_s is not None and not c.usage.waiting and not c.usage.inflight and idle >= c.idle_unload_s:
            unload[c.name] = ("idle", f"idle for {idle:.0f} s (idle_unload_s {c.idle_unload_s:g})")
        else:
            keep[c.name] = "demand"
    by_name = {c.name: c for c in candidates}
    refused: dict[str, str] = {}
    queued: dict[str, str] = {}
    wanted = sorted(
        (c for c in candidates if c.usage.waiting and c.name not in keep),
        key=lambda c: (c.usage.wanted_at or now, c.name),
    )
    for want in wanted:
        unload.pop(want.name, None)  # idle a moment ago, asked for again
        short = _shortfall(want, keep, by_name, rooms, pinned_count, max_loaded)
        evicted: list[str] = []
        order = [by_name[n] for n in keep if by_name[n].resident and not by_name[n].usage.waiting]
        order.sort(key=lambda c: _evict_key(c, now))
        while short and order:
            victim = next((c for c in order if _helps(c, want, short)), None)
            if victim is None:
                break
            order.remove(victim)
            evicted.append(victim.name)
            del keep[victim.name]
            short = _shortfall(want, keep, by_name, rooms, pinned_count, max_loaded)
        if short:
            for name in evicted:  # evicting them would not have made room: keep them
                keep[name] = "demand"
            held = [n for n in keep if by_name[n].usage.waiting or not by_name[n].resident]
            if not _shortfall(
                want, {n: k for n, k in keep.items() if n not in held}, by_name, rooms, pinned_count, max_loaded
            ):
                queued[want.name] = (
                    f"waiting for room: {', '.join(held)} must serve the requests waiting for them first"
                )
            else:
                refused[want.name] = _refusal(want, short, keep, by_name, rooms)
            continue
        keep[want.name] = "demand"
        for name in evicted:
            c = by_name[name]
            idle = now - (c.usage.last_used or now)
            busy = f", {c.usage.inflight} in flight drained first" if c.usage.inflight else ""
            cost = c.usage.load_s or DEFAULT_LOAD_S
            unload[name] = ("evict", f"evicted for {want.name} (idle {idle:.0f} s, reloads in {cost:.1f} s{busy})")
    return Decision(keep, unload, refused, queued)


def _shortfall(
    want: Candidate,
    keep: Mapping[str, str],
    by_name: Mapping[str, Candidate],
    rooms: Mapping[str, Room],
    pinned_count: int,
    max_loaded: int | None,
) -> dict[str, int]:
    """Bytes missing per device for `want` beside what is kept ("slots": models over max_loaded)."""
    short: dict[str, int] = {}
    if max_loaded is not None and pinned_count + len(keep) + 1 > max_loaded:
        short["slots"] = pinned_count + len(keep) + 1 - max_loaded
    for device in want.devices:
        room = rooms.get(device)
        need = (want.need or {}).get(device)
        if room is None or need is None:
            continue
        used = room.held + sum((by_name[n].need or {}).get(device, 0) for n in keep)
        missing = need - (room.budget - used)
        if missing > 0:
            short[device] = missing
    return short


def _helps(victim: Candidate, want: Candidate, short: Mapping[str, int]) -> bool:
    return "slots" in short or any(d in short and (victim.need or {}).get(d, 0) > 0 for d in victim.devices)


def _evict_key(c: Candidate, now: float) -> tuple[bool, float, str]:
    """Idle before busy; then the smallest reload cost per second of idleness."""
    idle = max(now - (c.usage.last_used or now), 1e-3)
    return (c.usage.inflight > 0, (c.usage.load_s or DEFAULT_LOAD_S) / idle, c.name)


def _refusal(
    want: Candidate,
    short: Mapping[str, int],
    keep: Mapping[str, str],
    by_name: Mapping[str, Candidate],
    rooms: Mapping[str, Room],
) -> str:
    parts = []
    for device, missing in short.items():
        if device == "slots":
            parts.append("server.max_loaded models are resident and none of them can be evicted now")
            continue
        room = rooms[device]
        need = (want.need or {}).get(device, 0)
        others = [n for n in keep if device in by_name[n].devices]
        busy = f"; on-demand {', '.join(others)} cannot go now (requests wait for them)" if others else ""
        pinned = ", ".join(room.pinned) or "none"
        foreign = f"; other processes hold {gib(room.others)}" if room.others else ""
        parts.append(
            f"needs {gib(need)} on {device}, {gib(need - missing)} free of a "
            f"{gib(room.budget)} budget; pinned models hold {gib(room.held)} ({pinned}){foreign}{busy}"
        )
    return f"model '{want.name}' cannot be loaded now: " + "; ".join(parts)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"

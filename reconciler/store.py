"""StateStore: the one place that holds ModelInfo per model, and the event stream.

Every state change goes through `transition()` here, which applies the table in state.py, logs
one line and publishes an event. Readers (the web app, `xgen apply --wait`) only read.
Events carry increasing ids and a bounded backlog, so an SSE client resumes without a gap.
Samples (GPU facts every 5 s, a load's progress) are kept only as the latest of each: in the
backlog they pushed out the history (1,000 events were 83 minutes of GPU samples).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.demand import Usage
from reconciler.state import ModelInfo, ModelState, transition

log = logging.getLogger("xgen")


@dataclass(frozen=True)
class Event:
    id: int
    kind: str  # state | plan | spec_error | spec_ok | pass_error | crash_loop | active | gpu
    data: dict[str, Any]
    at: float = 0.0  # when it was published (the page's timeline shows it)


@dataclass
class Demand:
    """How a model is asked for, kept across its loads and unloads (the proxy writes the usage,
    the daemon the causes)."""

    last_used: float | None = None
    waiting: int = 0  # requests waiting for it to load
    wanted_at: float | None = None  # when the first of them arrived
    load_s: float | None = None  # its last load, start to ready
    swap_s: float | None = None  # its last load on demand, first waiting request to ready
    loaded_because: str | None = None  # spec | demand
    unloaded_because: str | None = None  # why it last went: idle, evicted for X, spec
    refused: str | None = None  # requests wait and nothing can make room: why

    def usage(self, inflight: int) -> Usage:
        return Usage(self.last_used, self.waiting, self.wanted_at, inflight, self.load_s)


SAMPLES = frozenset({"gpu", "progress"})  # events that are snapshots: only the latest of each is kept


@dataclass
class StateStore:
    backlog: int = 1000
    models: dict[str, ModelInfo] = field(default_factory=dict)
    active: str | None = None
    generation: str | None = None
    observed_generation: str | None = None
    routed: bool = False  # an adopted spec's plan was handed out: routing (the active model) is in place
    spec_error: list[str] | None = None  # problems of the file as it is now, if invalid
    last_plan: dict[str, Any] | None = None
    last_pass: dict[str, Any] | None = None
    plan_errors: list[str] | None = None  # why the daemon refuses the current spec's plan, if it does
    pass_error: dict[str, Any] | None = None  # the last pass that failed unexpectedly, until one succeeds
    serving: dict[str, Any] | None = None  # which spec runs: from the file, or the last good one kept
    settling: bool = False  # the file changed less than settle_ms ago: routing may be about to change
    gpu: dict[str, Any] = field(default_factory=lambda: {"detector": "cpu", "total": 0, "gpus": []})
    started_at: float = field(default_factory=time.time)
    demand: dict[str, Demand] = field(default_factory=dict)
    wake: Callable[[], None] = lambda: None  # asks the daemon for a pass (a request wants a model)
    waiting: int = 0  # requests waiting for on-demand models, all together
    _events: deque[Event] = field(default_factory=deque)
    _samples: dict[tuple[str, str], Event] = field(default_factory=dict)  # (kind, model): the latest SAMPLES event
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    listeners: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)
    closed: bool = False
    _changed: asyncio.Condition | None = None

    # ------------------------------------------------ writes (daemon side only)

    def demand_of(self, name: str) -> Demand:
        record = self.demand.get(name)
        if record is None:
            record = self.demand[name] = Demand()
        return record

    def touch(self, name: str) -> None:
        """A request for `name` starts or ends (the idle clock restarts)."""
        self.demand_of(name).last_used = time.time()

    def usage(self, name: str, inflight: Mapping[int, int]) -> Usage:
        """`name`'s usage for the demand rules, with its requests in flight now (`inflight` per port)."""
        info = self.models.get(name)
        return self.demand_of(name).usage(inflight.get(info.port, 0) if info is not None and info.port else 0)

    def idle_at(self, name: str, idle_unload_s: float | None) -> float | None:
        """When a resident model reaches its idle_unload_s, if nothing uses it before."""
        last = self.demand_of(name).last_used
        if name not in self.models or last is None or idle_unload_s is None:
            return None
        return last + idle_unload_s

    def want(self, name: str) -> None:
        """A request waits for `name` to load: ask the daemon to bring it in."""
        record = self.demand_of(name)
        record.waiting += 1
        self.waiting += 1
        record.wanted_at = record.wanted_at or time.time()
        record.last_used = time.time()  # a load nobody ends up using still goes idle
        record.refused = None  # decided afresh for this request
        self.wake()

    def unwant(self, name: str) -> None:
        record = self.demand_of(name)
        if record.waiting:
            record.waiting -= 1
            self.waiting -= 1
        if not record.waiting:
            record.wanted_at = None

    def refuse(self, name: str, why: str | None) -> None:
        """The daemon's answer to waiting requests when nothing can make room (None: no longer)."""
        record = self.demand_of(name)
        if record.refused != why:
            record.refused = why
            if why is not None:
                log.warning("%s", why)
                self.publish("refused", {"model": name, "reason": why})
            self._notify()

    def put(self, info: ModelInfo) -> None:
        """Record a model entering LOADING from nothing (a load, or the start of a reload)."""
        self.models[info.name] = info
        self._state_event(info, None, "")

    def transition(self, name: str, to: ModelState, reason: str = "", **changes: Any) -> ModelInfo:
        old = self.models[name]
        new = transition(old, to, time.time(), **changes)
        if to is ModelState.GONE:
            del self.models[name]
        else:
            self.models[name] = new
        extra: dict[str, float] = {}
        if to is ModelState.LOADED and old.state is ModelState.LOADING:
            record = self.demand_of(name)
            record.load_s = extra["load_s"] = round(new.since - (new.started_at or new.since), 3)
            if record.wanted_at is not None:  # requests waited for this load: the swap they saw
                record.swap_s = extra["swap_s"] = round(new.since - record.wanted_at, 3)
        self._state_event(new, old.state, reason, extra)
        return new

    def update(self, name: str, **changes: Any) -> None:
        """Change fields that are not the state (measured memory, an adopted spec)."""
        if name in self.models:
            self.models[name] = dataclasses.replace(self.models[name], **changes)

    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        event = Event(next(self._ids), kind, data, time.time())
        if kind in SAMPLES:
            self._samples[(kind, str(data.get("model", "")))] = event
        else:
            self._events.append(event)
            while len(self._events) > self.backlog:
                self._events.popleft()
        for listener in self.listeners:
            listener(kind, data)
        self._notify()
        return event

    def _state_event(
        self, info: ModelInfo, old: ModelState | None, reason: str, extra: dict[str, float] | None = None
    ) -> None:
        msg = f"{info.name}: {old.value if old else '-'} → {info.state.value}"
        why = f" ({reason})" if reason else ""
        (log.warning if info.state is ModelState.ERROR else log.info)("%s%s", msg, why)
        self.publish(
            "state",
            {
                "model": info.name,
                "from": old.value if old else None,
                "to": info.state.value,
                "reason": reason,
                "info": info.to_json(),
                **(extra or {}),
            },
        )

    def _notify(self) -> None:
        if self._changed is None:
            try:
                self._changed = asyncio.Condition()
            except RuntimeError:
                return
        cond = self._changed

        async def wake() -> None:
            async with cond:
                cond.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(wake())

    # ------------------------------------------------ reads

    def close(self) -> None:
        """Shutting down: end every event stream, so open SSE clients do not hold up the drain."""
        self.closed = True
        self._notify()

    @property
    def last_event_id(self) -> int:
        newest = self._events[-1].id if self._events else 0
        return max(newest, *(e.id for e in self._samples.values())) if self._samples else newest

    def events_after(self, last_id: int) -> list[Event]:
        kept = [e for e in self._events if e.id > last_id]
        samples = [e for e in self._samples.values() if e.id > last_id]
        return sorted(kept + samples, key=lambda e: e.id) if samples else kept

    async def follow(self, last_id: int, idle_s: float) -> AsyncIterator[Event | None]:
        """Events after `last_id`, then each new one as it is published (for SSE);
        None after `idle_s` without one, so the caller can send a keep-alive."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        while not self.closed:
            pending = self.events_after(last_id)
            for event in pending:
                last_id = event.id
                yield event
            idle = False
            async with self._changed:
                if not self.events_after(last_id) and not self.closed:
                    try:
                        await asyncio.wait_for(self._changed.wait(), idle_s)
                    except TimeoutError:
                        idle = True
            if idle:  # yield outside the lock: a slow client must not block publishers
                yield None

    async def wait_for(
        self,
        name: str,
        timeout: float,
        passing: frozenset[ModelState | None] = frozenset({ModelState.LOADING}),
        until: Callable[[], bool] = lambda: False,
    ) -> ModelInfo | None:
        """Wait while `name` is in one of the `passing` states (None: not known yet), up to the
        timeout or until `until()`; return its info then."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        deadline = time.monotonic() + timeout
        while True:
            info = self.models.get(name)
            left = deadline - time.monotonic()
            if (info.state if info else None) not in passing or left <= 0 or self.closed or until():
                return info
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def set_settling(self, settling: bool) -> None:
        if self.settling != settling:
            self.settling = settling
            self._notify()

    async def wait_settled(self, timeout: float) -> None:
        """Until the file has settled (its new routing is in place), or the timeout."""
        await self.wait_until(lambda: not self.settling, timeout)

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Until `done()` holds after a change to the store (or at once), the store closes, or the timeout."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        deadline = time.monotonic() + timeout
        while not done() and not self.closed and (left := deadline - time.monotonic()) > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    @property
    def converged(self) -> bool:
        return self.generation is not None and self.generation == self.observed_generation

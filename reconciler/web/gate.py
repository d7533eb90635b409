"""Admission to one model under `max_concurrent`: that many requests at once, the others wait
their turn in arrival order, at most `max_queue` of them for at most `queue_timeout_s` each;
a client that goes away leaves the queue at once. Beyond that, the proxy answers 429.

The limit is read from the spec at every arrival, so a change applies in place: a raised limit
lets waiting requests in as soon as the next one arrives or leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from reconciler.web import metrics


class Gate:
    def __init__(self, model: str) -> None:
        self.model = model
        self.limit = 1
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.queued = metrics.QUEUED.labels(model)  # at 0 from the start: a gated model shows it

    async def enter(
        self, limit: int, queue: int, timeout_s: float, gone: Callable[[], Awaitable[object]] | None = None
    ) -> str | None:
        """None once the request may go (call leave() when it is done), else why not. `gone`
        makes an awaitable that ends when the client goes away (awaited only while waiting)."""
        if self.try_enter(limit):
            return None
        if len(self.waiting) >= queue:
            metrics.REJECTED.labels(self.model, "queue_full").inc()
            return (
                f"model '{self.model}' is busy: {self.running} request(s) running (max_concurrent {limit}) and "
                f"{len(self.waiting)} waiting (max_queue {queue}); retry shortly"
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        self.queued.inc()
        t0 = time.perf_counter()
        watcher: asyncio.Future[Any] | None = asyncio.ensure_future(gone()) if gone is not None else None
        waits: list[asyncio.Future[Any]] = [turn, *([watcher] if watcher else [])]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the request was cancelled while it waited
            self._give_up(turn)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            self.queued.dec()
        if turn in done:
            metrics.QUEUE_SECONDS.labels(self.model).observe(time.perf_counter() - t0)
            return None
        self._give_up(turn)
        if watcher is not None and watcher in done:
            return "the client went away while waiting for a turn"
        metrics.REJECTED.labels(self.model, "queue_timeout").inc()
        return (
            f"model '{self.model}' is busy: no turn within queue_timeout_s ({timeout_s:g} s); "
            f"{self.running} running (max_concurrent {limit}), {len(self.waiting)} waiting"
        )

    def try_enter(self, limit: int) -> bool:
        """A turn at once if one is free and nobody waits (the fast path); False: enter() queues."""
        self.limit = limit
        self._admit()
        if self.running < limit and not self.waiting:
            self.running += 1
            return True
        return False

    def leave(self) -> None:
        self.running -= 1
        self._admit()

    def _admit(self) -> None:
        while self.waiting and self.running < self.limit:
            turn = self.waiting.popleft()
            if not turn.done():
                self.running += 1
                turn.set_result(None)

    def _give_up(self, turn: asyncio.Future[None]) -> None:
        """Leave the queue; a turn granted in the same instant is passed on."""
        if turn.done() and not turn.cancelled():
            self.leave()
            return
        turn.cancel()
        with contextlib.suppress(ValueError):
            self.waiting.remove(turn)

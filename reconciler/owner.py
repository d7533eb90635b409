"""One owner per model: the only task that changes a model's processes.

The reconcile pass decides (the plan) and hands each model its actions; the owner runs them.
Owners of different models run in parallel, so one slow load holds back nobody else. A newer
target supersedes the current one at once: the running task is cancelled (a half-started
process is stopped by the supervisor) and the new one starts when that cleanup is done. The same
target handed again while it runs is a no-op, which is what makes handing it every pass safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from reconciler.plan import Action

log = logging.getLogger("xgen.owner")
REPEAT_GUARD_S = 1.0  # the same target done successfully this recently is a planner bug, not work


def target_key(actions: Sequence[Action]) -> str:
    """What the actions converge to (not why: reasons change from pass to pass)."""
    return json.dumps(
        [
            [
                a.kind,
                a.backend,
                a.strategy,
                a.spec.model_dump(mode="json") if a.spec else None,
                a.adapter.model_dump(mode="json") if a.adapter else None,
            ]
            for a in actions
        ],
        sort_keys=True,
    )


class Owner:
    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[Action]], Awaitable[bool]],
        on_done: Callable[[str, bool], None],
    ) -> None:
        self.name = name
        self._run_actions = run
        self._on_done = on_done
        self.task: asyncio.Task[None] | None = None
        self.key: str | None = None
        self._done: tuple[str, float, bool] | None = None  # key, when, ok

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def want(self, actions: Sequence[Action], after: Sequence[asyncio.Task[None]] = ()) -> asyncio.Task[None] | None:
        """Converge to `actions` (latest wins). Returns the task doing it, or None when there is
        nothing new to do."""
        key = target_key(actions)
        if self.busy and key == self.key:
            return self.task
        if not self.busy and self._done is not None:
            done_key, when, ok = self._done
            if ok and done_key == key and time.monotonic() - when < REPEAT_GUARD_S:
                log.error("%s: the plan repeats an action that just succeeded; leaving it to the resync", self.name)
                return None
        previous = self.task if self.busy else None
        if previous is not None:
            log.info("%s: a newer spec supersedes the change in progress", self.name)
            previous.cancel("superseded by a newer spec")
        self.key = key
        self.task = asyncio.get_running_loop().create_task(self._converge(actions, key, previous, after))
        return self.task

    async def _converge(
        self,
        actions: Sequence[Action],
        key: str,
        previous: asyncio.Task[None] | None,
        after: Sequence[asyncio.Task[None]],
    ) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)  # its cleanup first
        if after:
            await asyncio.gather(*after, return_exceptions=True)  # e.g. unloads that free our GPU
        ok = False
        try:
            ok = await self._run_actions(actions)
        finally:
            self._done = (key, time.monotonic(), ok)
            self._on_done(self.name, ok)

    async def cancel(self, why: str) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel(why)
            await asyncio.gather(self.task, return_exceptions=True)

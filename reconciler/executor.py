"""Runs a Plan: unloads first (free memory), then reloads and loads, then activate.

Actions on different models run concurrently (asyncio.TaskGroup); one model's actions never
overlap (a lock per model). An unload or reload first stops routing to the model, then drains its
in-flight /v1 requests (bounded) before the old process stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from reconciler.plan import Action, Plan
from reconciler.state import ModelState
from reconciler.store import StateStore
from reconciler.supervisor import Supervisor

log = logging.getLogger("xgen.executor")
# Free memory first, start processes next, then adapters on the processes that now run.
PHASE = {"unload": 0, "remove_adapter": 0, "reload": 1, "load": 1, "add_adapter": 2, "update": 2, "activate": 3}


@dataclass
class Outcome:
    ok: bool = True
    failed: list[str] = field(default_factory=list)


class Executor:
    def __init__(self, store: StateStore, supervisor: Supervisor, drain_s: float = 30.0) -> None:
        self.store = store
        self.supervisor = supervisor
        self.drain_s = drain_s
        self.inflight: dict[str, int] = {}  # /v1 requests in flight per model (the proxy counts)
        self._locks: dict[str, asyncio.Lock] = {}

    async def apply(self, plan: Plan) -> Outcome:
        outcome = Outcome()
        phases = [[a for a in plan.actions if PHASE[a.kind] == i] for i in range(3)]
        for phase in phases:
            if phase:
                async with asyncio.TaskGroup() as tg:
                    for action in phase:
                        tg.create_task(self._run(action, outcome))
        for action in plan.actions:
            if action.kind == "activate":
                self.store.active = action.model or None
                log.info("active model → %s", action.model or "none")
                self.store.publish("active", {"model": action.model or None})
        return outcome

    async def _run(self, action: Action, outcome: Outcome) -> None:
        lock = self._locks.setdefault(action.model, asyncio.Lock())
        t0 = time.monotonic()
        async with lock:
            ok = True
            if action.kind == "unload":
                await self._retire(action.model, action.reason)
            elif action.kind == "update":
                if action.model:  # a model's aliases or timeouts; server settings apply with the spec
                    self.store.update(action.model, spec=action.spec)
            elif action.adapter is not None:
                ok = await self._adapter(action)
            else:
                assert action.spec is not None, "load and reload carry the spec"
                if action.kind == "reload":
                    await self._retire(action.model, "reload: " + ", ".join(map(str, action.changes)))
                ok = await self.supervisor.start(action.model, action.spec, action.backend)
        log.info("%s %s: %s in %.2f s", action.kind, action.model, "ok" if ok else "failed", time.monotonic() - t0)
        if not ok:
            outcome.ok = False
            outcome.failed.append(action.model)

    async def _adapter(self, action: Action) -> bool:
        """Load or unload a LoRA adapter in a running vLLM (VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
        assert action.adapter is not None
        info = self.store.models.get(action.model)
        if info is None or info.port is None:
            return False
        adding = action.kind == "add_adapter"
        path, body = (
            ("load_lora_adapter", {"lora_name": action.adapter.name, "lora_path": action.adapter.path})
            if adding
            else ("unload_lora_adapter", {"lora_name": action.adapter.name})
        )
        try:
            async with httpx.AsyncClient(timeout=120) as http:
                resp = await http.post(f"http://127.0.0.1:{info.port}/v1/{path}", json=body)
            failure = "" if resp.status_code == 200 else f"HTTP {resp.status_code}: {resp.text[:300]}"
        except httpx.HTTPError as exc:
            failure = repr(exc)
        if failure:
            self.store.update(action.model, error_message=f"{path} {action.adapter.name}: {failure}")
            return False
        kept = [a for a in info.spec.lora if a.name != action.adapter.name]
        self.store.update(
            action.model,
            spec=info.spec.model_copy(update={"lora": [*kept, action.adapter] if adding else kept}),
            error_message=None,
        )
        return True

    async def _retire(self, name: str, why: str) -> None:
        """Stop routing new requests to the model (UNLOADING), let those in flight finish, stop it."""
        info = self.store.models.get(name)
        if info is not None and info.state is ModelState.LOADED:
            self.store.transition(name, ModelState.UNLOADING, why)
            await self._drain(name)
        await self.supervisor.stop(name, why)

    async def _drain(self, name: str) -> None:
        """Let /v1 requests already sent to the old process finish (bounded by drain_s)."""
        deadline = time.monotonic() + self.drain_s
        while self.inflight.get(name, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

"""Runs a Plan by handing each model's actions to that model's owner (owner.py), and applies what
needs no process at once (activate, updates in place).

`apply()` does not wait for loads: owners of different models converge in parallel and call back
when done, which asks for a confirming pass. Memory alone orders work across models: a load or a
surge on a device waits for the unloads and recreates of this plan that free that device.

Memory orders work across models on the CPU too: an on-demand load waits for the evictions that
make its room, whichever device that is.

A replacement (reload) surges when the plan says so: the new process starts beside the old one,
routing switches when it is ready, the old one drains and stops; if the new one never becomes
ready the old one keeps serving. Otherwise it recreates: drain, stop, start, and if the new
process fails, start the previous version again. Either way a failed update is recorded on the
model (`update_*`) with a backoff before the same spec is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import httpx

from reconciler.demand import devices_of
from reconciler.owner import Owner
from reconciler.plan import Action, Plan
from reconciler.spec import ModelSpec
from reconciler.state import FailedUpdate, ModelState
from reconciler.store import StateStore
from reconciler.supervisor import Supervisor

log = logging.getLogger("xgen.executor")


class Executor:
    def __init__(
        self,
        store: StateStore,
        supervisor: Supervisor,
        drain_s: float = 30.0,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.drain_s = drain_s
        self.on_done = on_done  # a model's owner finished: ask for a confirming pass
        self.inflight: dict[int, int] = {}  # /v1 requests in flight per backend port (the proxy counts)
        self.owners: dict[str, Owner] = {}

    @property
    def busy(self) -> bool:
        return any(o.busy for o in self.owners.values())

    def apply(self, plan: Plan) -> None:
        """Hand every model its actions; activate and in-place updates take effect now."""
        per_model: dict[str, list[Action]] = {}
        for action in plan.actions:
            if action.kind == "activate":
                self.store.active = action.model or None
                log.info("active model → %s", action.model or "none")
                self.store.publish("active", {"model": action.model or None})
            elif action.kind == "update":
                if action.model:  # a model's aliases or timeouts; server settings apply with the spec
                    self.store.update(action.model, spec=action.spec)
            else:
                per_model.setdefault(action.model, []).append(action)
        freeing: dict[str, list[asyncio.Task[None]]] = {}
        first = [n for n, acts in per_model.items() if any(self._frees(a) for a in acts)]
        for name in [*first, *(n for n in per_model if n not in first)]:
            actions = per_model[name]
            devices = {d for a in actions if a.spec for d in devices_of(a.spec.gpus)}
            after = [t for d in devices for t in freeing.get(d, [])] if name not in first else []
            task = self._owner(name).want(actions, after)
            if task is not None and name in first:
                for device in self._devices(name, actions):
                    freeing.setdefault(device, []).append(task)

    def _frees(self, action: Action) -> bool:
        return action.kind == "unload" or (action.kind == "reload" and action.strategy != "surge")

    def _devices(self, name: str, actions: Sequence[Action]) -> set[str]:
        info = self.store.models.get(name)
        return {
            *(devices_of(info.spec.gpus) if info else ()),
            *(d for a in actions if a.spec for d in devices_of(a.spec.gpus)),
        }

    def _owner(self, name: str) -> Owner:
        owner = self.owners.get(name)
        if owner is None:
            owner = self.owners[name] = Owner(name, lambda actions: self._run(name, actions), self._finished)
        return owner

    def _finished(self, name: str, ok: bool) -> None:
        self.on_done()

    async def shutdown(self) -> None:
        """Stop every change in progress (half-started processes are stopped)."""
        await asyncio.gather(*(o.cancel("xgen is shutting down") for o in self.owners.values()))

    async def _run(self, name: str, actions: Sequence[Action]) -> bool:
        ok = True
        for action in actions:
            t0 = time.monotonic()
            if action.kind in ("load", "unload") and action.adapter is None:
                self._record_cause(action)
            if action.kind == "unload":
                await self._retire(name, action.reason)
                done = True
            elif action.adapter is not None:
                done = await self._adapter(action)
            elif action.kind == "reload":
                done = await self._replace(action)
                self.store.publish("replaced", {"model": name, "strategy": action.strategy, "ok": done})
            else:
                assert action.spec is not None, "load carries the spec"
                done = await self.supervisor.start(name, action.spec, action.backend)
            log.info("%s %s: %s in %.2f s", action.kind, name, "ok" if done else "failed", time.monotonic() - t0)
            ok = ok and done
        return ok

    def _record_cause(self, action: Action) -> None:
        """Why a model is loaded or unloaded, for status, the page and the metrics."""
        record = self.store.demand_of(action.model)
        if action.kind == "load":
            record.loaded_because = action.cause
        else:
            record.unloaded_because = action.reason
        self.store.publish(action.kind, {"model": action.model, "cause": action.cause, "reason": action.reason})

    async def _replace(self, action: Action) -> bool:
        name, spec = action.model, action.spec
        assert spec is not None, "reload carries the spec"
        info = self.store.models.get(name)
        why = "replace: " + ", ".join(map(str, action.changes))
        if action.strategy == "surge" and info is not None and info.state is ModelState.LOADED:
            old_port = info.port
            old, failure = await self.supervisor.surge(name, spec, action.backend)
            if failure is not None:
                self._update_failed(name, spec, failure, "the old process kept serving")
                return False
            if old is not None:
                await self._drain(name, old_port)
                await self.supervisor.stop_child(name, old)
            return True
        previous = (info.spec, info.backend) if info is not None and info.state is ModelState.LOADED else None
        await self._retire(name, why)
        if await self.supervisor.start(name, spec, action.backend):
            return True
        if previous is None:
            return False
        failure = self.store.models[name].error_message or "the new process failed"
        if await self.supervisor.start(name, *previous):
            self._update_failed(name, spec, failure, "the previous version was started again")
        return False

    def _update_failed(self, name: str, target: ModelSpec, why: str, then: str) -> None:
        last = self.store.models[name].failed_update
        failures = last.failures + 1 if last is not None and last.target == target else 1
        retry_at = time.time() + self.supervisor.policy.backoff_s(failures)
        error = f"update failed: {why}"
        self.store.update(name, failed_update=FailedUpdate(target, error, failures, retry_at))
        log.warning("%s: %s; %s", name, error, then)
        self.store.publish(
            "rolled_back",
            {
                "model": name,
                "reason": why,
                "then": then,
                "retry_at": retry_at,
                "generation": self.store.generation,  # the update that failed
                "serving_generation": self.store.observed_generation,  # the last one fully applied
            },
        )

    async def _retire(self, name: str, why: str) -> None:
        """Stop routing new requests to the model (UNLOADING), let those in flight finish, stop it."""
        info = self.store.models.get(name)
        if info is not None and info.state is ModelState.LOADED:
            self.store.transition(name, ModelState.UNLOADING, why)
            await self._drain(name, info.port)
        await self.supervisor.stop(name, why)

    async def _drain(self, name: str, port: int | None) -> None:
        """Let /v1 requests already sent to `port` finish (bounded by drain_s). The `drained` event
        has the proxy close its idle connections there: llama-server waits for open keep-alive
        connections when it stops (measured: 122 ms with one open, 14 ms without)."""
        t0 = time.monotonic()
        while port is not None and self.inflight.get(port, 0) > 0 and time.monotonic() - t0 < self.drain_s:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - t0
        log.info("%s: drained in %.2f s", name, waited)
        self.store.publish("drained", {"model": name, "port": port, "waited_s": round(waited, 3)})

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

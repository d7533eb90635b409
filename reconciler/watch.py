"""The watch loop: file events, process exits and a resync timer all ask for a reconcile pass.

A pass reads models.yaml, plans against what runs, and applies the plan. Passes never overlap.
An invalid file keeps the last good spec running; the error is reported and the next valid save
converges. Editors save by rename, by truncate-then-write, or in pieces: watch the directory,
debounce, and re-read the whole file every pass (a half-written file is just invalid for a moment).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from watchfiles import awatch

from reconciler import memory
from reconciler.executor import Executor
from reconciler.gpu import GpuMonitor
from reconciler.plan import Observed, plan, restart_changes
from reconciler.spec import Spec, SpecError, load
from reconciler.state import ModelState
from reconciler.store import StateStore

log = logging.getLogger("xgen")
DEBOUNCE_MS = 50
RESYNC_S = 10.0
GPU_SAMPLE_S = 5.0


class Reconciler:
    def __init__(self, path: Path, store: StateStore, executor: Executor, gpu: GpuMonitor) -> None:
        self.path = path.resolve()
        self.shown = path  # as the operator named it: error messages quote this
        self.store = store
        self.executor = executor
        self.gpu = gpu
        self.spec: Spec | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def request_pass(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Until stop(): watch, resync, sample GPUs, and run passes one at a time."""
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._watch_file()),
                tg.create_task(self._timer()),
                tg.create_task(self._sample_gpus()),
            ]
            self._wake.set()
            while not self._stop.is_set():
                await self._wake.wait()
                self._wake.clear()
                if self._stop.is_set():
                    break
                await self.reconcile()
            for task in tasks:
                task.cancel()

    async def _watch_file(self) -> None:
        async for changes in awatch(
            self.path.parent, debounce=DEBOUNCE_MS, step=10, stop_event=self._stop, recursive=False
        ):
            if any(Path(p).name == self.path.name for _, p in changes):
                self._wake.set()

    async def _timer(self) -> None:
        """Periodic resync, and a pass when the earliest backoff of a failed model expires."""
        while True:
            retry = [i.retry_at for i in self.store.models.values() if i.retry_at]
            wait = min([RESYNC_S, *(r - time.time() for r in retry)])
            await asyncio.sleep(max(0.05, wait))
            self._wake.set()

    async def _sample_gpus(self) -> None:
        while True:
            snapshot = await asyncio.to_thread(self.gpu.sample)
            self.store.gpu = snapshot.to_json()
            pids = {i.pid: name for name, i in self.store.models.items() if i.pid}
            if pids and snapshot.gpus:
                used = await asyncio.to_thread(self.gpu.process_memory, list(pids))
                for pid, name in pids.items():
                    self.store.update(name, measured_bytes=used.get(pid))
            self.store.publish("gpu", self.store.gpu)
            await asyncio.sleep(GPU_SAMPLE_S)

    def observe(self, spec: Spec) -> Observed:
        gpus = tuple(self.gpu.sample().gpus)
        return Observed(
            self.executor.supervisor.observed(),
            self.store.active,
            gpus,
            self.gpu.detector,
            memory.spec_estimates(spec, gpus),
        )

    async def reconcile(self) -> None:
        """One pass: load the file, plan, apply, record the outcome."""
        try:
            fresh = await asyncio.to_thread(load, self.shown)
        except (SpecError, OSError) as exc:
            self._spec_failed(exc)
        else:
            if self.store.spec_error is not None or self.spec is None:
                self.store.publish("spec_ok", {"generation": fresh.generation})
            self.store.spec_error = None
            self.spec = fresh
        spec = self.spec  # the last good one when the file is invalid now
        if spec is None:
            return
        self.store.generation = spec.generation
        observed = await asyncio.to_thread(self.observe, spec)
        p = plan(spec, observed)
        self._adopt_routing_fields(spec)
        shown = p.to_json()
        self.store.last_plan = shown
        if p.errors:
            for error in p.errors:
                log.error("plan refused: %s", error)
            self.store.publish("plan", {**shown, "applied": False})
            self.store.last_pass = {"generation": spec.generation, "ok": False, "errors": list(p.errors)}
            return
        if p.empty:
            ok = not any(i.state is ModelState.ERROR for i in self.store.models.values())
        else:
            repeated = self.store.last_pass is not None and self.store.last_pass.get("applied") == shown
            self.store.publish("plan", {**shown, "applied": True})
            ok = (await self.executor.apply(p)).ok
            if repeated and ok:
                # the same plan again after it succeeded: a bug, not a reason to spin; resync later
                log.error("the plan did not converge after it was applied; retrying at the next resync")
            else:
                self.request_pass()  # confirm convergence with a fresh observation
        for name, estimate in observed.estimates.items():  # after apply: new models exist now
            self.store.update(name, estimated_bytes=estimate)
        self.store.last_pass = {
            "generation": spec.generation,
            "ok": ok,
            "applied": None if p.empty else shown,
            "failed": [n for n, i in self.store.models.items() if i.state is ModelState.ERROR],
        }
        if ok and p.empty:
            self.store.observed_generation = spec.generation

    def _adopt_routing_fields(self, spec: Spec) -> None:
        """Fields that need no restart (aliases, timeouts) take effect at once."""
        for name, info in list(self.store.models.items()):
            want = spec.models.get(name)
            if want is not None and want != info.spec and not restart_changes(want, info.spec):
                self.store.update(name, spec=want)

    def _spec_failed(self, exc: SpecError | OSError) -> None:
        problems = [str(p) for p in exc.problems] if isinstance(exc, SpecError) else [f"{self.shown}: {exc}"]
        if self.store.spec_error != problems:
            log.error(
                "%s is invalid; still running generation %s:\n%s",
                self.path,
                self.spec.generation if self.spec else "none",
                "\n".join(problems),
            )
            self.store.publish("spec_error", {"problems": problems})
        self.store.spec_error = problems

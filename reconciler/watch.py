"""The watch loop: file events, process exits, backoff expiries and a resync timer all ask for a
reconcile pass.

A pass reads models.yaml, plans against what runs, and applies the plan. Passes never overlap,
and no failure inside one ends the loop: an invalid file keeps the last good spec running (the
error is reported, the next valid save converges), and an unexpected exception is logged,
reported as `pass_error`, and retried.

Editors save by rename, by truncate-then-write, or in pieces, so a pass may read a half-written
file that happens to be valid. Such a read must never take anything away: actions that only add
(a new model's load) run at once, while everything that removes or replaces a running model, or
changes routing, waits until the file's bytes have stood still for `server.settle_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil
from watchfiles import awatch

from reconciler import last_good, memory
from reconciler.executor import Executor
from reconciler.gpu import GpuMonitor
from reconciler.memory import MeasuredMemory
from reconciler.plan import Observed, Plan, plan, server_view
from reconciler.spec import MAX_SPEC_BYTES, Problem, Spec, SpecError, loads, size_of
from reconciler.state import ModelState
from reconciler.store import StateStore
from reconciler.supervisor import RestartPolicy, tree_rss

log = logging.getLogger("xgen")
DEBOUNCE_MS = 50
DUE_SLACK_S = 0.005
RESYNC_S = 10.0
GPU_SAMPLE_S = 5.0
PASS_RETRY_S = 1.0  # after a pass failed unexpectedly
# Actions a half-written file may trigger: they add and take nothing away.
ADDITIVE = frozenset({"load", "add_adapter"})


@dataclass
class Settle:
    """How long the file's bytes have stood still, by the daemon's own clock."""

    digest: str | None = None
    since: float = 0.0

    def stable_for(self, digest: str, now: float, age: float) -> float:
        """Seconds the content `digest` has been unchanged. `age` (from the file's mtime) is
        trusted only for the first read, so a daemon starting on an old file need not wait."""
        if digest != self.digest:
            self.since = now - (age if self.digest is None else 0.0)
            self.digest = digest
        return now - self.since


class Reconciler:
    def __init__(
        self,
        path: Path,
        store: StateStore,
        executor: Executor,
        gpu: GpuMonitor,
        state_dir: Path,
        spec: Spec | None = None,
    ) -> None:
        self.path = path.absolute()  # not resolved: a symlink (a ConfigMap) is re-read through
        self.shown = path  # as the operator named it: error messages quote this
        self.store = store
        self.executor = executor
        self.gpu = gpu
        self.state_dir = state_dir
        self.spec: Spec | None = spec  # the last good, settled spec: what routing and plans use
        self._kept = spec.generation if spec else None
        self._settle = Settle()
        self.measured = MeasuredMemory(state_dir / "memory.json")
        self._due: float | None = None  # monotonic time of a pass asked for ahead (settle, retry)
        self._applied: dict[str, object] | None = None  # the plan the last pass handed out
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._changed = True  # the file may differ from the last read (the watcher sets it)
        self._read_at = -RESYNC_S  # monotonic time of the last read

    def request_pass(self) -> None:
        self._wake.set()

    def reread(self) -> None:
        """A pass that reads the file again now, changed or not (SIGHUP: a reload by convention)."""
        self._changed = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Until stop(): watch, sample GPUs, and run passes one at a time."""
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._watch_file()),
                tg.create_task(self._sample_gpus()),
                tg.create_task(self.executor.supervisor.rotate_logs()),
            ]
            self._wake.set()
            while not self._stop.is_set():
                # woken, or timed out: resync, a backoff that expired, or a settle window that closed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._sleep_s())
                self._wake.clear()
                if self._stop.is_set():
                    break
                await self.reconcile()
            for task in tasks:
                task.cancel()

    def _sleep_s(self) -> float:
        """Until the next pass nobody will ask for: resync, the earliest retry, a pass due."""
        now = time.time()
        due = [
            t
            for i in self.store.models.values()
            for t in (i.retry_at, i.failed_update.retry_at if i.failed_update else None)
            if t and t > now
        ]
        if self.spec is not None:
            idle = (self.store.idle_at(n, m.idle_unload_s) for n, m in self.spec.on_demand.items())
            due += [t for t in idle if t is not None and t > now]
        # a little after each due time: a timer may fire a millisecond early (uvloop counts whole
        # ms), and a pass that starts just before a retry is due leaves it for the next resync
        waits = [RESYNC_S, *(t - now + DUE_SLACK_S for t in due)]
        if self._due is not None:
            waits.append(self._due - time.monotonic() + DUE_SLACK_S)
        return max(0.01, min(waits))

    async def _watch_file(self) -> None:
        async for changes in awatch(
            self.path.parent, debounce=DEBOUNCE_MS, step=10, stop_event=self._stop, recursive=False
        ):
            # a symlinked file (Kubernetes swaps a `..data` link beside it) changes without an
            # event of its own name: then any change in its directory may be it
            if self.path.is_symlink() or any(Path(p).name == self.path.name for _, p in changes):
                self._changed = True
                self._wake.set()

    async def _sample_gpus(self) -> None:
        """GPU facts, and measured memory per model: NVML's for GPU models, the process tree's
        RSS for CPU ones."""
        while True:
            snapshot = await asyncio.to_thread(self.gpu.sample)
            self.store.gpu = snapshot.to_json()
            on_gpu = {i.pid: name for name, i in self.store.models.items() if i.pid and i.spec.gpus}
            on_cpu = {i.pid: name for name, i in self.store.models.items() if i.pid and not i.spec.gpus}
            used = await asyncio.to_thread(self.gpu.process_memory, list(on_gpu)) if on_gpu and snapshot.gpus else {}
            rss = await asyncio.to_thread(tree_rss, list(on_cpu)) if on_cpu else {}
            used.update({pid: {"cpu": b} for pid, b in rss.items()})
            for pid, name in {**on_gpu, **on_cpu}.items():
                self.store.update(name, measured=used.get(pid))
                info = self.store.models.get(name)
                if info is not None and info.state is ModelState.LOADED:  # what the next plan trusts
                    key = MeasuredMemory.key(info.spec, info.backend)
                    for device, value in used.get(pid, {}).items():
                        self.measured.record(key, device, value)
            self.store.publish("gpu", self.store.gpu)
            await asyncio.sleep(GPU_SAMPLE_S)

    def observe(self, spec: Spec) -> Observed:
        gpus = tuple(self.gpu.sample().gpus)
        return Observed(
            self.executor.supervisor.observed(),
            self.store.active,
            gpus,
            self.gpu.detector,
            memory.spec_estimates(spec, gpus, self.measured),
            server_view(self.spec.server) if self.spec else None,  # adopted when the file settled
            os.cpu_count() or 1,
            psutil.virtual_memory().total,
            {name: self.store.usage(name, self.executor.inflight) for name in spec.on_demand},
            time.time(),
        )

    async def reconcile(self) -> None:
        """One pass. Nothing raised in it ends the daemon: it is reported and the pass retried."""
        self._due = None
        try:
            await self._pass()
        except Exception as exc:
            log.exception("a reconcile pass failed; retrying in %.0f s", PASS_RETRY_S)
            self.store.pass_error = {
                "at": time.time(),
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc().splitlines()[-12:],
            }
            self.store.publish("pass_error", self.store.pass_error)
            self._ask_at(time.monotonic() + PASS_RETRY_S)
        else:
            self.store.pass_error = None

    def _ask_at(self, when: float) -> None:
        self._due = when if self._due is None else min(self._due, when)

    async def _pass(self) -> None:
        spec = self.spec
        if self._file_may_differ():
            fresh, problems, settled = await self._read()
            if fresh is not None and settled:
                self._adopt(fresh)
            elif problems is not None and settled:
                self._spec_failed(problems)
            spec = fresh or self.spec  # an unsettled valid file may already add what it adds
        if spec is None:
            return
        self.executor.supervisor.policy = RestartPolicy(spec.server.backoff_max_s, spec.server.backoff_reset_s)
        self.executor.supervisor.remote_check_s = spec.server.remote_check_s
        self.executor.supervisor.log_max_bytes = size_of(spec.server.log_max_bytes, 0)
        self.executor.supervisor.hung_after_s = spec.server.hung_after_s
        if spec is self.spec:
            self._forget_abandoned_updates(spec)
        observed = await asyncio.to_thread(self.observe, spec)
        p = plan(spec, observed)
        if spec is not self.spec:
            p = dataclasses.replace(p, actions=tuple(a for a in p.actions if a.kind in ADDITIVE))
        shown = p.to_json()
        self.store.last_plan = shown
        for standing in p.on_demand:
            self.store.refuse(standing.model, standing.reason if standing.status == "refused" else None)
        if p.errors:
            for name in spec.on_demand:  # requests waiting for a load that will not come: answer them now
                if self.store.demand_of(name).waiting:
                    self.store.refuse(name, f"model '{name}' cannot be loaded: the plan is refused: {p.errors[0]}")
            if self.store.plan_errors != list(p.errors):  # once per refusal, not every resync
                for error in p.errors:
                    log.error("plan refused, nothing changed: %s", error)
                self.store.publish("plan", {**shown, "applied": False})
            self.store.plan_errors = list(p.errors)
            self.store.last_pass = {"generation": spec.generation, "ok": False, "errors": list(p.errors)}
            return
        self.store.plan_errors = None
        ok = self._apply(p, shown)
        if spec is self.spec:
            self.store.routed = True
        for name, estimate in observed.estimates.items():  # after apply: new models exist now
            self.store.update(name, estimated=dict(estimate))
        self._reset_failures(spec)
        self.store.last_pass = {
            "generation": spec.generation,
            "ok": ok,
            "applied": None if p.empty else shown,
            "failed": self._failing(),
        }
        if ok and p.matches and spec is self.spec:
            self.store.observed_generation = spec.generation

    def _apply(self, p: Plan, shown: dict[str, object]) -> bool:
        """Hand the plan to the owners (they run in the background and ask for the next pass when
        done); True when nothing is failing or still in progress."""
        if not p.empty:
            self.store.publish("plan", {**shown, "applied": True})
            self.executor.apply(p)
            if not self.executor.busy:  # all done in place: confirm with a fresh observation
                if shown == self._applied:  # the same plan again right after it was applied: a bug
                    log.error("the plan did not converge after it was applied; retrying at the next resync")
                else:
                    self.request_pass()
        self._applied = None if p.empty else shown
        return not self.executor.busy and not self._failing()

    def _failing(self) -> list[str]:
        """Models in ERROR, or whose last update failed (the old version serves)."""
        return [n for n, i in self.store.models.items() if i.state is ModelState.ERROR or i.failed_update]

    def _file_may_differ(self) -> bool:
        """Whether a pass must read the file again: it changed (the watcher said so), a resync is
        due, a save is still settling, or the last read was not a good spec. A pass that a
        request or an owner asked for does not re-read and re-parse an unchanged file (2-3 ms
        before every on-demand load)."""
        return (
            self._changed
            or self.spec is None
            or self.store.settling
            or self.store.spec_error is not None
            or time.monotonic() - self._read_at >= RESYNC_S
        )

    async def _read(self) -> tuple[Spec | None, list[Problem] | None, bool]:
        """The file's spec (or its problems), and whether its bytes have settled."""
        now = time.monotonic()
        self._changed, self._read_at = False, now  # a change from here on asks again
        try:
            data, age = await asyncio.to_thread(_read_file, self.path)
        except OSError as exc:  # e.g. gone for a moment between an editor's unlink and rename
            data, age = f"unreadable: {exc}".encode(), 0.0
            problems: list[Problem] | None = [Problem(str(self.shown), 1, 1, "", f"cannot read: {exc.strerror or exc}")]
            fresh = None
        else:
            problems, fresh = None, None
            try:
                fresh = await asyncio.to_thread(loads, data, self.shown)
            except SpecError as error:
                problems = error.problems
        server = (fresh or self.spec or Spec()).server
        stable = self._settle.stable_for(hashlib.sha256(data).hexdigest(), now, age)
        settled = stable >= server.settle_ms / 1000
        if not settled:
            self._ask_at(now + server.settle_ms / 1000 - stable)
        self.store.set_settling(not settled)
        return fresh, problems, settled

    def _adopt(self, fresh: Spec) -> None:
        """A valid file that has settled becomes the spec: routing, status, the kept copy."""
        if self.store.spec_error is not None or self.spec is None or self.spec.generation != fresh.generation:
            self.store.publish("spec_ok", {"generation": fresh.generation})
        self.store.spec_error = None
        self.spec = fresh
        self.store.generation = fresh.generation
        self.store.serving = {"generation": fresh.generation, "source": "file", "file": str(self.shown)}
        if self._kept != fresh.generation:
            try:
                last_good.save(self.state_dir, fresh, str(self.shown))
                self._kept = fresh.generation
            except OSError as exc:
                log.warning("could not keep the last good spec in %s: %s", self.state_dir, exc)

    def _reset_failures(self, spec: Spec) -> None:
        """A model that has stayed up long enough starts its next crash from a clean count."""
        now = time.time()
        for name, info in list(self.store.models.items()):
            if (
                info.failures
                and info.state is ModelState.LOADED
                and now - (info.started_at or now) >= spec.server.backoff_reset_s
            ):
                self.store.update(name, failures=0)

    def _forget_abandoned_updates(self, spec: Spec) -> None:
        """A failed update whose target the file no longer asks for (it went back, or on) is no
        longer a failure of this spec."""
        for name, info in list(self.store.models.items()):
            if info.failed_update is not None and spec.models.get(name) != info.failed_update.target:
                self.store.update(name, failed_update=None)

    def _spec_failed(self, problems: list[Problem]) -> None:
        shown = [str(p) for p in problems]
        if self.store.spec_error != shown:
            log.error(
                "%s is invalid; still running generation %s:\n%s",
                self.shown,
                self.spec.generation if self.spec else "none",
                "\n".join(shown),
            )
            self.store.publish("spec_error", {"problems": shown})
        self.store.spec_error = shown


def _read_file(path: Path) -> tuple[bytes, float]:
    """The file's bytes (at most one past the limit, which the loader reports) and its age."""
    with path.open("rb") as f:
        age = time.time() - path.stat().st_mtime
        return f.read(MAX_SPEC_BYTES + 1), max(0.0, age)

"""`xgen serve`: the reconciler and the HTTP app in one event loop, with a clean shutdown.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded), stop every child, exit 0.
A second signal forces: children get SIGKILL at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from reconciler import last_good, statedir
from reconciler.drivers.registry import default_drivers
from reconciler.executor import Executor
from reconciler.gpu import GpuMonitor
from reconciler.ports import PortAllocator
from reconciler.spec import Spec
from reconciler.store import StateStore
from reconciler.supervisor import Supervisor, cleanup_orphans
from reconciler.watch import Reconciler
from reconciler.web.app import create_app

log = logging.getLogger("xgen")
DRAIN_S = 30.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are ours (see serve); uvicorn must not re-raise them at exit


def uvicorn_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    """No access log or proxy-headers middleware on the hot path (we log actions ourselves);
    in-flight requests get DRAIN_S at shutdown."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        proxy_headers=False,
        timeout_graceful_shutdown=int(DRAIN_S),
        lifespan="on",
        backlog=2048,
    )


def serve(
    file: Path, spec: Spec, directory: Path, host: str | None, port: int | None, kept: last_good.Kept | None = None
) -> int:
    """Run the daemon on `spec` (from the file, or `kept`: the last good one when the file is invalid)."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / "daemon.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        log.error(
            "another xgen serve (pid %s) uses the state dir %s; stop it or pass --state-dir",
            lock.read().strip() or "?",
            directory,
        )
        return 1
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return asyncio.run(_serve(file, spec, host or spec.server.host, port or spec.server.port, directory, kept))


async def _serve(file: Path, spec: Spec, host: str, port: int, state_dir: Path, kept: last_good.Kept | None) -> int:
    await cleanup_orphans(state_dir)
    store = StateStore()
    if kept is not None:
        store.generation = spec.generation
        store.serving = {
            "generation": spec.generation,
            "source": "last_good",
            "file": kept.source,
            "saved_at": kept.saved_at,
        }
    drivers = default_drivers()
    backends = {name: await asyncio.to_thread(d.availability) for name, d in drivers.items()}
    low, high = spec.server.port_range
    reconciler: Reconciler | None = None
    supervisor = Supervisor(
        store,
        drivers,
        state_dir,
        PortAllocator(low, high),
        spec.server.stop_grace_s,
        on_exit=lambda: reconciler.request_pass() if reconciler else None,
    )
    executor = Executor(store, supervisor, DRAIN_S, on_done=lambda: reconciler.request_pass() if reconciler else None)
    reconciler = Reconciler(file, store, executor, GpuMonitor(), state_dir, spec if kept else None)
    store.wake = reconciler.request_pass  # a request waits for an on-demand model
    app = create_app(
        store, lambda: reconciler.spec if reconciler else None, executor.inflight, backends, state_dir / "logs"
    )
    server = _Server(uvicorn_config(app, host, port))
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining requests and stopping models (send again to force)", sig.name)
            server.should_exit = True
            store.close()
            reconciler.stop()
        else:
            log.warning("%s again: killing every backend now", sig.name)
            supervisor.kill_all_now()
            server.force_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("xgen serving %s on http://%s:%d (state dir %s)", file, host, port, state_dir)
    statedir.write_address(state_dir, statedir.local_url(host, port), file)  # for the CLI, whatever --port said
    web = asyncio.create_task(server.serve())
    loop_task = asyncio.create_task(reconciler.run())
    done, _ = await asyncio.wait({web, loop_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in done:
        if task.exception() is not None:
            log.error("xgen stopped on an error: %r", task.exception())
            code = 1
    server.should_exit = True
    reconciler.stop()
    with contextlib.suppress(Exception):
        await web
    loop_task.cancel()
    with contextlib.suppress(BaseException):
        await loop_task
    await executor.shutdown()
    await supervisor.shutdown()
    statedir.remove_address(state_dir)
    log.info("xgen stopped; no backend left running")
    return code

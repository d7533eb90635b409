"""`xgen serve`: the reconciler and the HTTP app in one event loop, with a clean shutdown.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded), stop every child, exit 0.
A second signal forces: children get SIGKILL at once. SIGHUP reads models.yaml again (and no
longer ends the daemon without a drain, as Python's default did).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import resource
import signal
import socket
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

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
from reconciler.web.front import Front, app_socket_name

log = logging.getLogger("xgen")
DRAIN_S = 30.0
T = TypeVar("T")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are ours (see serve); uvicorn must not re-raise them at exit


def uvicorn_config(app: Starlette) -> uvicorn.Config:
    """The app behind the front (front.py), on its own socket: no access log (we log actions
    ourselves); the client's address from the front's x-forwarded-for (the socket is an abstract
    unix socket: only this host reaches it, and a process here is a loopback client anyway);
    idle connections kept longer than the front keeps them, so the front never sends on one
    uvicorn is closing; in-flight requests get DRAIN_S at shutdown."""
    return uvicorn.Config(
        app,
        access_log=False,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips="*",
        timeout_keep_alive=3600,
        timeout_graceful_shutdown=int(DRAIN_S),
        lifespan="on",
        backlog=2048,
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """The event loop: uvloop where installed (the proxy's numbers are measured on it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def open_files_limit() -> int:
    """The soft limit on open files raised to the hard one, as Go's runtime does for llama-swap:
    each client and each backend connection is a file, and a service's usual soft limit (1024)
    would cap xgen near 500 concurrent requests, the rest dropped unexplained. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # the kernel's usual nr_open
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning(
                "cannot raise the open files limit from %d to %d (%s): about %d clients at once",
                soft,
                wanted,
                exc,
                soft // 2,
            )
    return wanted if soft == resource.RLIM_INFINITY else int(soft)


def bind(host: str, port: int) -> socket.socket:
    """The public socket, bound before anything starts; raises OSError with what to do."""
    try:
        return socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"port {port} on {host} is taken: stop what uses it, or pass --port") from exc
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc


class Http:
    """The public socket (the front) and, behind it, the app (uvicorn on a private unix socket)."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self.sock = sock
        self.name = app_socket_name()
        self.inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.inner.bind(self.name)
        self.inner.listen(2048)
        self.server = _Server(uvicorn_config(app))
        self.front = Front(app.state.proxy, self.name, open_files_limit())
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Serve until stop(); then drain (bounded by DRAIN_S) and end both."""
        app = asyncio.create_task(self.server.serve(sockets=[self.inner]))
        await self.front.start(self.sock)
        stopping = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({app, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await self.front.drain(DRAIN_S)
        self.server.should_exit = True
        await app

    def stop(self) -> None:
        self.stopping.set()

    def force(self) -> None:
        self.front.close()
        self.server.force_exit = True


def serve_app(app: Starlette, host: str, port: int) -> None:
    """The app behind the front as `xgen serve` runs them, without the reconciler (benchmarks)."""

    async def main() -> None:
        await Http(app, bind(host, port)).run()

    run(main())


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
    host, port = host or spec.server.host, port or spec.server.port
    try:
        sock = bind(host, port)
    except OSError as exc:
        log.error("%s", exc.strerror)
        return 1
    return run(_serve(file, spec, host, sock, directory, kept))


async def _serve(
    file: Path, spec: Spec, host: str, sock: socket.socket, state_dir: Path, kept: last_good.Kept | None
) -> int:
    port = sock.getsockname()[1]
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
    http = Http(app, sock)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining requests and stopping models (send again to force)", sig.name)
            http.stop()
            store.close()
            reconciler.stop()
        else:
            log.warning("%s again: killing every backend now", sig.name)
            supervisor.kill_all_now()
            http.force()

    def on_hangup() -> None:  # a reload by convention (systemctl reload, a closed terminal): not an exit
        log.info("SIGHUP: reading %s again", file)
        reconciler.reread()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    log.info(
        "xgen serving %s on http://%s:%d (state dir %s, %d open files at most)",
        file,
        host,
        port,
        state_dir,
        http.front.files,
    )
    statedir.write_address(state_dir, statedir.local_url(host, port), file)  # for the CLI, whatever --port said
    web = asyncio.create_task(http.run())
    loop_task = asyncio.create_task(reconciler.run())
    done, _ = await asyncio.wait({web, loop_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in done:
        if task.exception() is not None:
            log.error("xgen stopped on an error: %r", task.exception())
            code = 1
    http.stop()
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

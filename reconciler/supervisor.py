"""Owns the backend child processes: start, readiness, stop, crash detection, backoff, cleanup.

Children get an argv list (never a shell), their own process group, a parent-death signal (set
by util-linux `setpriv` where it works, else by a pre-exec hook), and their output in a
per-model log file under the state dir. A pid file per child (pid, start time,
argv) lets the next `xgen serve` clean up what a crashed daemon left behind. Stop = SIGTERM to
the group, a grace period, then SIGKILL. Every state change goes through the StateStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
import psutil

from reconciler.drivers.base import Driver, filled, ready_timeout
from reconciler.plan import ObservedModel
from reconciler.ports import PortAllocator, PortsExhausted
from reconciler.spec import ModelSpec
from reconciler.state import CRASH_LOOP_AFTER, ModelInfo, ModelState
from reconciler.store import StateStore

log = logging.getLogger("xgen.supervisor")
ROTATE_CHECK_S = 5.0  # how often running backends' logs are measured (a stat each)
TAIL_LINES = 20
LEFTOVER_GRACE_S = 5.0  # what a crashed backend's own children get before SIGKILL
REMOTE_TIMEOUT_S = 10.0
ALIVE_EVERY_S = 10.0  # how often a loaded process is asked whether it is alive (server.hung_after_s)
IDLE_CPU_SHARE = 0.1  # a silent process using less of a core than this is stuck, not computing


@dataclass(frozen=True)
class RestartPolicy:
    """Crash recovery, as Kubernetes' CrashLoopBackOff: 1, 2, 4 … s, capped; a model that has
    stayed up `reset_s` counts its next crash as a first failure again."""

    cap_s: float = 300.0
    reset_s: float = 60.0

    def backoff_s(self, failures: int) -> float:
        return float(min(self.cap_s, 2 ** min(30, max(0, failures - 1))))


_CAUSE_WORDS = ("error", "failed", "invalid", "unknown", "unrecognized", "not found", "cannot", "unable", "no such")


def with_cause(why: str, tail: tuple[str, ...]) -> str:
    """`why`, followed by the last log line that says what went wrong, so the reason reaches
    `xgen status` and `xgen apply --wait` instead of only the log (e.g. llama.cpp's "invalid
    argument: --nope")."""
    for line in reversed(tail):
        text = line.strip()
        if any(word in text.lower() for word in _CAUSE_WORDS):
            return f"{why}: {text[:300]}"
    return why


def tree_cpu_s(pid: int) -> float:
    """CPU seconds a process and its descendants have used so far, those that ended included (a
    reaped process's times are in its parent's children_* times), so the count never goes back."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:4]) for p in [proc, *proc.children(recursive=True)])
    return 0.0


def tree_rss(pids: list[int]) -> dict[int, int]:
    """Resident memory of each process with its children (a backend's whole footprint on CPU)."""
    out: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            out[pid] = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    return out


def read_tail(path: Path, size: int, end: int | None = None) -> str:
    """The last `size` bytes of a log file (of its first `end` bytes) as text ("" when it cannot
    be read)."""
    try:
        with path.open("rb") as f:
            end = path.stat().st_size if end is None else end
            f.seek(max(0, end - size))
            return f.read(end - f.tell()).decode(errors="replace")
    except OSError:
        return ""


def rotate_in_place(path: Path, limit: int) -> bool:
    """logrotate's copytruncate, for the log of a running backend: the process holds the file
    open for appending, so a rename would leave it writing to .log.1. The file is copied (with
    what was appended during the copy) and emptied; a line written in the instant between is
    lost. True when rotated."""
    try:
        if path.stat().st_size <= limit:
            return False
        with path.open("rb") as source, path.with_suffix(".log.1").open("wb") as kept:
            shutil.copyfileobj(source, kept)
            kept.write(source.read())
            os.truncate(path, 0)
        with path.open("ab") as log_file:
            log_file.write(
                f"===== xgen: log rotated at {time.strftime('%Y-%m-%d %H:%M:%S')}; earlier lines in "
                f"{path.name}.1 =====\n".encode()
            )
    except OSError as exc:
        log.warning("cannot rotate %s: %s", path, exc)
        return False
    return True


def exit_reason(code: int) -> str:
    """`exited with code 1`, or `killed by SIGKILL` for a negative return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


def launch_hash(argv: list[str], env: dict[str, str]) -> str:
    """Identity of a launch description: a different hash means a different process."""
    return hashlib.sha256(json.dumps([argv, sorted(env.items())]).encode()).hexdigest()[:12]


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    argv: list[str]
    started: float
    port: int
    launch_hash: str
    pidfile: Path | None = None
    log_from: int = 0  # where this process's output starts in the model's log
    stop_signal: int = signal.SIGTERM  # the driver's: how a drained process is stopped
    stopping: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    alive_url: str = ""  # the driver's: what the loaded process must answer
    hung: str | None = None  # why it was killed as hung (reported as its exit)


def _die_with_parent() -> None:
    """In the child before exec: die with the daemon, however it dies (Linux PR_SET_PDEATHSIG).

    SIGKILL, not SIGTERM: a daemon that died cannot drain anything, and llama-server treats a
    second SIGTERM as `exit()` from a signal handler, which was seen to hang with its threads."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def pdeathsig_launcher() -> tuple[str, ...]:
    """util-linux `setpriv --pdeathsig KILL --` when it works here: the same parent-death signal
    set in the child by an exec'd helper, so Python can spawn with vfork instead of forking the
    whole daemon to run `_die_with_parent` (measured: 4-15 ms of a blocked event loop per start,
    on every on-demand swap). Empty where it is missing or refused (then the hook runs)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    argv = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        ok = subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return argv if ok else ()


def remote_auth(model: ModelSpec) -> dict[str, str]:
    """The header a remote model's server is sent: its key, read from `api_key_env` when asked
    (so it never sits in the spec), as a Bearer token; none without one."""
    key = os.environ.get(model.api_key_env) if model.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


async def spawn_dying_with_us(
    argv: list[str], launcher: tuple[str, ...], output: BinaryIO | int, env: dict[str, str]
) -> asyncio.subprocess.Process:
    """A child in its own session (process group) that gets SIGKILL when the daemon dies:
    through `launcher` (see pdeathsig_launcher), else through the pre-exec hook."""
    return await asyncio.create_subprocess_exec(
        *launcher,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=output,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=None if launcher else _die_with_parent,
    )


class Supervisor:
    def __init__(
        self,
        store: StateStore,
        drivers: dict[str, Driver],
        state_dir: Path,
        ports: PortAllocator,
        grace_s: float = 30.0,
        on_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.drivers = drivers
        self.state_dir = state_dir
        self.ports = ports
        self.grace_s = grace_s
        self.on_exit = on_exit
        self.policy = RestartPolicy()  # the reconciler sets it from the spec every pass
        self.children: dict[str, Child] = {}
        self.last_port: dict[str, int] = {}  # a model keeps its port across restarts while it is free
        self.launcher = pdeathsig_launcher()
        self.remote_checks: dict[str, asyncio.Task[None]] = {}  # remote models: their periodic check
        self.remote_check_s = 10.0  # the reconciler sets it from the spec every pass
        self.log_max_bytes = 10 * 2**20  # likewise
        self.hung_after_s = 60.0  # likewise
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        (state_dir / "pids").mkdir(parents=True, exist_ok=True)
        # no keep-alive: llama-server waits for open connections when it stops (122 ms with one)
        self._http = httpx.AsyncClient(timeout=2.0, limits=httpx.Limits(max_keepalive_connections=0))

    # ------------------------------------------------ observe

    def observed(self) -> dict[str, ObservedModel]:
        now = time.time()
        return {
            name: ObservedModel(
                info.spec,
                info.backend,
                info.state,
                info.failures,
                info.retry_at is None or info.retry_at <= now,
                info.error_message,
                info.failed_update.target if info.failed_update else None,
                info.failed_update is None or info.failed_update.retry_at <= now,
                info.failed_update.error if info.failed_update else None,
            )
            for name, info in self.store.models.items()
        }

    # ------------------------------------------------ start

    async def start(self, name: str, model: ModelSpec, backend: str) -> bool:
        """Start the model's process and wait until it is ready. True when LOADED. Cancelled (a
        newer spec superseded this load, xgen stops: the cancel's message says which), it stops
        the half-started process first."""
        old = self.store.models.get(name)
        prev_port = old.port if old and old.port else self.last_port.get(name)
        failures = old.failures if old else 0
        restarts = old.restarts if old else 0
        if old is not None and old.spec != model:
            failures = 0  # a changed spec gets a fresh set of retries
        if old is None:
            self.store.put(ModelInfo(name, model, backend, ModelState.LOADING, since=time.time(), restarts=restarts))
        else:
            restarts += old.state is ModelState.ERROR
            self.store.transition(
                name,
                ModelState.LOADING,
                "retry" if old.state is ModelState.ERROR else "",
                spec=model,
                backend=backend,
                error_message=None,
                log_tail=(),
                progress=0.0,
                pid=None,
                restarts=restarts,
                retry_at=None,
            )
        t0 = time.monotonic()
        if backend == "remote":
            return await self._connect(name, model, failures, t0)
        spawned = await self._spawn(name, name, model, backend, prev_port)
        if isinstance(spawned, str):
            return self._fail(name, failures, spawned)
        child = spawned
        self.children[name] = child
        self.store.update(
            name,
            pid=child.proc.pid,
            port=child.port,
            started_at=child.started,
            launch_hash=child.launch_hash,
            argv=tuple(child.argv),
        )
        log.info("%s: started %s pid %d on port %d", name, backend, child.proc.pid, child.port)
        try:
            why = await self._ready(name, child, backend, model)
        except asyncio.CancelledError as exc:
            why = str(exc.args[0]) if exc.args and exc.args[0] else "its load was cancelled"
            self.store.transition(name, ModelState.UNLOADING, why)
            self.store.transition(name, ModelState.GONE, why)
            raise
        if why is not None:
            return self._fail(name, failures, why)
        child.watcher = asyncio.get_running_loop().create_task(self._watch(name, child))
        self.store.transition(name, ModelState.LOADED, f"ready in {time.monotonic() - t0:.2f} s")
        return True

    async def _connect(self, name: str, model: ModelSpec, failures: int, t0: float) -> bool:
        """A remote model: nothing to start. LOADED once its server lists it, then checked every
        server.remote_check_s; a failed check is ERROR with the reason, retried with the backoff."""
        why = await self.probe_remote(name, model)
        if why is not None:
            return self._fail(name, failures, why)
        self.store.update(name, started_at=time.time())
        self.remote_checks[name] = asyncio.get_running_loop().create_task(self._watch_remote(name, model))
        self.store.transition(name, ModelState.LOADED, f"{model.url} answered in {time.monotonic() - t0:.2f} s")
        return True

    async def probe_remote(self, name: str, model: ModelSpec) -> str | None:
        """None when the remote's model list (`GET {url}/models`) names the model, else why not.
        Never says the key: only which variable holds it."""
        url = f"{(model.url or '').rstrip('/')}/models"
        try:
            resp = await self._http.get(url, headers=remote_auth(model), timeout=REMOTE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"cannot reach {url}: {type(exc).__name__} {exc}".rstrip()
        if resp.status_code in (401, 403):
            held = f"the key in {model.api_key_env}" if model.api_key_env else "no key (set api_key_env)"
            return f"{url} refused {held}: HTTP {resp.status_code}"
        if resp.status_code != 200:
            return f"{url} answered HTTP {resp.status_code}: {resp.text[:200]}"
        try:
            served = [str(m["id"]) for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return f"{url} did not answer an OpenAI model list"
        wanted = model.remote_model or name
        if wanted not in served:
            return f"{url} does not serve '{wanted}' (it serves: {', '.join(served[:10]) or 'nothing'})"
        return None

    async def _watch_remote(self, name: str, model: ModelSpec) -> None:
        while True:
            await asyncio.sleep(self.remote_check_s)
            why = await self.probe_remote(name, model)
            if why is None:
                continue
            self.remote_checks.pop(name, None)
            up = time.time() - (self.store.models[name].started_at or time.time())
            self._to_error(name, self._failures_after(name, up), why, ())
            self.on_exit()
            return

    async def surge(self, name: str, model: ModelSpec, backend: str) -> tuple[Child | None, str | None]:
        """Start `model` beside the running process and, once it is ready, make it the model's
        process (routing follows the port in one assignment). Returns the old child, to be
        drained and stopped by the caller, or the reason the new process never became ready
        (the old one is untouched and keeps serving)."""
        key = f"{name}+next"
        spawned = await self._spawn(name, key, model, backend, None)
        if isinstance(spawned, str):
            return None, spawned
        child = spawned
        self.children[key] = child
        log.info("%s: started the replacement (%s pid %d on port %d)", name, backend, child.proc.pid, child.port)
        self.store.publish("replace_started", {"model": name, "pid": child.proc.pid, "port": child.port})
        t0 = time.monotonic()
        why = await self._ready(key, child, backend, model)
        if why is not None:
            return None, with_cause(why, self.log_tail(name))
        log.info("%s: the replacement is ready in %.2f s; switching to it", name, time.monotonic() - t0)
        self.store.publish("ready", {"model": name, "pid": child.proc.pid, "port": child.port})
        old = self.children.pop(name, None)
        self.children.pop(key, None)
        self.children[name] = child
        self.ports.move(name, f"{name}+old")
        self.ports.move(key, name)
        info = self.store.models[name]
        if info.state is not ModelState.LOADED:  # the old process died meanwhile
            self.store.transition(name, ModelState.LOADING, "replacement ready", retry_at=None)
            self.store.transition(name, ModelState.LOADED, "replacement ready")
        self.store.update(
            name,
            spec=model,
            backend=backend,
            pid=child.proc.pid,
            port=child.port,
            started_at=child.started,
            launch_hash=child.launch_hash,
            argv=tuple(child.argv),
            error_message=None,
            log_tail=(),
            failed_update=None,
        )
        child.watcher = asyncio.get_running_loop().create_task(self._watch(name, child))
        self.store.publish("switched", {"model": name, "pid": child.proc.pid, "port": child.port})
        return old, None

    async def stop_child(self, name: str, child: Child) -> None:
        """Stop a process that no longer serves the model (the old one after a surge)."""
        await self._kill(name, child)
        self.ports.release(f"{name}+old")

    async def _spawn(self, name: str, key: str, model: ModelSpec, backend: str, prefer_port: int | None) -> Child | str:
        """Start the process (not yet ready), holding a port under `key`; or why it could not."""
        driver = self.drivers.get(backend)
        if driver is None:
            return f"backend {backend} is not available in this xgen"
        try:
            port = self.ports.allocate(key, model.port, prefer_port)
        except PortsExhausted as exc:
            return str(exc)
        try:
            argv = driver.command(name, model, port)
        except FileNotFoundError as exc:
            self.ports.release(key)
            return str(exc)
        # the model's own last (the spec refuses the names the driver must set), placeholders filled
        # in: a server told its port by a variable (OLLAMA_HOST: "{host}:{port}")
        extra = {**driver.environment(model), **{k: filled(v, name, model, port) for k, v in model.env.items()}}
        logfile = self._open_log(name)
        log_from = logfile.tell()
        try:
            proc = await spawn_dying_with_us(argv, self.launcher, logfile, {**os.environ, **extra})
        except OSError as exc:
            self.ports.release(key)
            return f"could not start {argv[0]}: {exc}"
        finally:
            logfile.close()
        self.last_port[name] = port
        pidfile = self._write_pidfile(name, proc.pid, argv)
        return Child(
            proc,
            argv,
            time.time(),
            port,
            launch_hash(argv, extra),
            pidfile,
            log_from,
            driver.stop_signal,
            alive_url=driver.alive_url(port, model),
        )

    async def _ready(self, key: str, child: Child, backend: str, model: ModelSpec) -> str | None:
        """Wait for readiness: None when ready, else why not (the process is stopped then, and
        also when the wait is cancelled)."""
        driver = self.drivers[backend]
        try:
            watch = LoadProgress(self.state_dir / "logs" / f"{key.split('+')[0]}.log", child.log_from, driver.progress)
            ok, why = await self._wait_ready(
                key, child, driver.health_url(child.port, model), ready_timeout(driver, model), watch
            )
        except asyncio.CancelledError:
            await asyncio.shield(self._kill(key, child))
            self.ports.release(key)
            raise
        if not ok:
            await self._kill(key, child)
            self.ports.release(key)
            return why
        return None

    async def _wait_ready(
        self, key: str, child: Child, url: str, timeout: float, watch: LoadProgress
    ) -> tuple[bool, str]:
        """Health is asked when the log shows a load marker, else every 50 ms (250 ms after the
        first 3 s: a 60 s vLLM load need not be asked 1,200 times); the log is looked at every
        2 ms meanwhile (every 250 ms after 3 s), a stat() each. A request waits for this on every
        on-demand swap: the marker cuts the wait after the engine is up to about one health
        request, and the engine loads without a poll competing for its cores every 10 ms."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        expected = self.store.demand_of(key).load_s  # the last load of this model, if any
        shown, asked = 0.0, -1.0
        while (now := time.monotonic()) < deadline:
            elapsed = now - t0
            progress = watch.read(elapsed, expected)
            if progress >= shown + 0.05 and key in self.store.models:  # a replacement's is not the model's
                shown = progress
                self.store.update(key, progress=progress)
                self.store.publish("progress", {"model": key, "progress": progress})
            if child.proc.returncode is not None:
                return False, f"{exit_reason(child.proc.returncode)} while loading"
            early = elapsed < 3
            if watch.marked or elapsed - asked >= (0.05 if early else 0.25):
                watch.marked, asked = False, elapsed
                with contextlib.suppress(httpx.HTTPError):
                    if (await self._http.get(url)).status_code == 200:
                        return True, ""
            await asyncio.sleep(0.002 if early else 0.25)
        return False, f"not ready after {timeout:.0f} s (health: {url}); raise ready_timeout_s if it is just slow"

    def _fail(self, name: str, failures: int, why: str) -> bool:
        tail = self.log_tail(name)
        self._to_error(name, failures + 1, with_cause(why, tail), tail)
        return False

    def _to_error(self, name: str, failures: int, why: str, tail: tuple[str, ...]) -> None:
        self.ports.release(name)
        info = self.store.transition(
            name,
            ModelState.ERROR,
            why,
            error_message=why,
            last_failure=(time.time(), why),
            log_tail=tail,
            failures=failures,
            retry_at=time.time() + self.policy.backoff_s(failures),
            pid=None,
        )
        if info.failures == CRASH_LOOP_AFTER:
            self.store.publish(
                "crash_loop", {"model": name, "failures": failures, "reason": why, "retry_at": info.retry_at}
            )

    # ------------------------------------------------ crash detection

    async def _watch(self, name: str, child: Child) -> None:
        checks = asyncio.get_running_loop().create_task(self._check_alive(name, child))
        try:
            code = await child.proc.wait()
        finally:
            checks.cancel()
        if child.stopping or self.children.get(name) is not child:
            return
        self.children.pop(name, None)
        # what the backend started itself (vLLM's engine processes) must not outlive it
        await terminate_group(child.proc.pid, lambda: True, LEFTOVER_GRACE_S)
        if child.pidfile is not None:
            child.pidfile.unlink(missing_ok=True)
        up = time.time() - child.started
        why = child.hung or f"process {exit_reason(code)} after {up:.0f} s"
        self._to_error(name, self._failures_after(name, up), why, self.log_tail(name))
        self.on_exit()

    async def _check_alive(self, name: str, child: Child) -> None:
        """While the process runs: it is asked `alive_url` every ALIVE_EVERY_S (a third of
        hung_after_s when that is shorter); any answer counts, whatever its status, and an answer
        is waited for until hung_after_s has passed since the first unanswered question (a pause
        that ends within it is no hang). Silent that long, it is hung only if it also used almost
        no CPU meanwhile: a stopped, deadlocked or blocked process; one that computes (a batch
        longer than the limit: a long prompt for a big model on CPU) is left alone and asked
        again. A hung one gets SIGKILL to its group (it may never act on SIGTERM, and there is
        nothing to drain), and _watch reports the exit as a crash with the reason."""
        silent_since: float | None = None
        cpu_since = 0.0
        while True:
            if silent_since is None:
                limit = self.hung_after_s
                await asyncio.sleep(min(ALIVE_EVERY_S, limit / 3) if limit else ALIVE_EVERY_S)
            limit = self.hung_after_s
            if not limit:
                silent_since = None
                continue
            asked = time.monotonic()
            if silent_since is None:
                cpu_since = tree_cpu_s(child.proc.pid)
            since = silent_since or asked
            try:
                await self._http.get(child.alive_url, timeout=max(0.1, since + limit - asked))
                silent_since = None
                continue
            except httpx.TimeoutException:
                pass
            except httpx.HTTPError:
                await asyncio.sleep(1.0)  # refused at once: asked again in a second
            silent_since = since
            silent = time.monotonic() - since
            if silent < limit or child.stopping:  # a process being stopped may stop answering first
                continue
            path = httpx.URL(child.alive_url).path
            used = tree_cpu_s(child.proc.pid) - cpu_since
            if used >= IDLE_CPU_SHARE * silent:
                log.info(
                    "%s: pid %d answered nothing on %s for %.0f s but computed (%.1f CPU s): not hung; raise "
                    "server.hung_after_s if its batches take this long",
                    name,
                    child.proc.pid,
                    path,
                    silent,
                    used,
                )
                silent_since = None
                continue
            child.hung = (
                f"hung: answered nothing on {path} for {silent:.0f} s and used {used:.1f} CPU s "
                "(server.hung_after_s); killed"
            )
            log.warning("%s: pid %d %s", name, child.proc.pid, child.hung)
            self.store.publish(
                "hung", {"model": name, "pid": child.proc.pid, "silent_s": round(silent, 1), "asked": path}
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            return

    def _failures_after(self, name: str, up: float) -> int:
        """The failure count once a model that was up `up` seconds fails: a fresh first failure
        after a long enough run (RestartPolicy.reset_s), else one more."""
        return 1 if up >= self.policy.reset_s else self.store.models[name].failures + 1

    # ------------------------------------------------ stop

    async def stop(self, name: str, reason: str) -> None:
        """UNLOADING → stop the process group → GONE. Idempotent."""
        info = self.store.models.get(name)
        if info is None:
            return
        if info.state is not ModelState.UNLOADING:
            self.store.transition(name, ModelState.UNLOADING, reason)
        check = self.remote_checks.pop(name, None)
        if check is not None:
            check.cancel()
        child = self.children.get(name)
        if child is not None:
            t0 = time.monotonic()
            await self._kill(name, child)
            log.info("%s: stopped in %.2f s", name, time.monotonic() - t0)
        self.ports.release(name)
        self.store.transition(name, ModelState.GONE, reason)

    async def _kill(self, name: str, child: Child) -> None:
        child.stopping = True
        await terminate_group(
            child.proc.pid, lambda: child.proc.returncode is not None, self.grace_s, child.proc.wait, child.stop_signal
        )
        with contextlib.suppress(ProcessLookupError):
            await child.proc.wait()
        if child.watcher is not None:
            child.watcher.cancel()
        if self.children.get(name) is child:
            del self.children[name]
        if child.pidfile is not None:
            child.pidfile.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        """Stop every child concurrently."""
        async with asyncio.TaskGroup() as tg:
            for name in list(self.store.models):
                tg.create_task(self.stop(name, "xgen is shutting down"))
        await self._http.aclose()

    def kill_all_now(self) -> None:
        """Second signal: SIGKILL every child group at once."""
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)

    # ------------------------------------------------ files

    def _open_log(self, name: str) -> BinaryIO:
        path = self.state_dir / "logs" / f"{name}.log"
        if path.exists():  # in place: during a surge the old process still writes to it
            rotate_in_place(path, self.log_max_bytes)
        handle = path.open("ab")
        handle.write(f"\n===== xgen: starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        handle.flush()
        return handle

    async def rotate_logs(self) -> None:
        """Forever: the log of a running backend past log_max_bytes is rotated in place (a
        backend logs each request: ~1 KB for llama-server, hundreds of MB a day under load)."""
        while True:
            await asyncio.sleep(ROTATE_CHECK_S)
            for name in {key.split("+")[0] for key in self.children}:
                if await asyncio.to_thread(
                    rotate_in_place, self.state_dir / "logs" / f"{name}.log", self.log_max_bytes
                ):
                    log.info("%s: log rotated (over %d bytes)", name, self.log_max_bytes)

    def log_tail(self, name: str, lines: int = TAIL_LINES) -> tuple[str, ...]:
        """The last lines the model's current process wrote (after the last start marker)."""
        text = read_tail(self.state_dir / "logs" / f"{name}.log", 16384)
        text = text.rsplit("===== xgen: starting", 1)[-1]
        return tuple(text.splitlines()[1:][-lines:])

    def _write_pidfile(self, name: str, pid: int, argv: list[str]) -> Path | None:
        """One file per child (a model has two during a surge), for the next daemon's cleanup."""
        path = self.state_dir / "pids" / f"{name}.{pid}.json"
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        path.write_text(json.dumps({"pid": pid, "create_time": created, "argv": argv}))
        return path


async def terminate_group(
    pid: int,
    exited: Callable[[], bool],
    grace_s: float,
    wait: Callable[[], Awaitable[object]] | None = None,
    first: int = signal.SIGTERM,
) -> None:
    """Signal the process group of `pid` (`first`: SIGTERM, or SIGKILL for a backend with nothing
    to shut down), wait up to `grace_s`, then SIGKILL it. `wait` (the leader's own exit, when it
    is our child) ends the wait the moment it exits: an eviction or a swap waits for that, so no
    polling interval is added to it."""
    try:
        os.killpg(pid, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    if wait is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait(), grace_s)
    while time.monotonic() < deadline:
        if exited() and not _group_alive(pid):
            return
        await asyncio.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


class NewLines:
    """The lines a log file gains from `offset` on, one read at a time: a half-written last line
    waits for its end, and a file that shrank (rotated) is read again from its start. With
    `carriage_returns`, a `\\r` ends a line too (progress bars redraw with it)."""

    def __init__(self, path: Path, offset: int, carriage_returns: bool = False, limit: int | None = None) -> None:
        self.path = path
        self.offset = offset
        self.carriage_returns = carriage_returns
        self.limit = limit  # bytes a read takes at most
        self._partial = b""

    def read(self) -> list[bytes]:
        try:
            size = self.path.stat().st_size
            if size < self.offset:
                self.offset = 0
            if size == self.offset:
                return []
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset if self.limit is None else min(size - self.offset, self.limit))
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        if self.carriage_returns:
            data = data.replace(b"\r", b"\n")
        *lines, self._partial = data.split(b"\n")
        return lines


class LoadProgress:
    """How far a loading process is, from what it wrote to its log since it started (the
    driver knows its markers) and, for a model loaded before, the time its last load took.
    `marked` says a marker line came since the last look: the backend moved on, so readiness
    is worth asking for now (its last markers are "model loaded", "listening on", ...)."""

    def __init__(self, path: Path, offset: int, marker: Callable[[str], float | None]) -> None:
        self.lines = NewLines(path, offset, carriage_returns=True, limit=256 * 1024)
        self.marker = marker
        self.value = 0.0
        self.marked = False

    def read(self, elapsed: float, expected_s: float | None) -> float:
        for line in self.lines.read():  # one stat() when nothing was written
            found = self.marker(line.decode(errors="replace"))
            if found is not None:
                self.value = max(self.value, found)
                self.marked = True
        if expected_s:  # smooth between markers: never past 0.95 on time alone
            self.value = max(self.value, min(0.95, elapsed / expected_s))
        return round(self.value, 2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _all_gone(procs: list[psutil.Process]) -> bool:
    return all(_gone(p) for p in procs)


def _gone(proc: psutil.Process) -> bool:
    """Exited, counting a zombie that nobody has reaped yet."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _group_members(pgid: int, not_before: float) -> list[psutil.Process]:
    """Processes in group `pgid` started no earlier than its leader was: what a backend
    started itself (its leader may be gone: the parent-death signal kills only the leader)."""
    members = []
    for proc in psutil.process_iter(["create_time"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= not_before - 1:
                members.append(proc)
    return members


async def cleanup_orphans(state_dir: Path, grace_s: float = 10.0) -> list[int]:
    """Stop children that a crashed daemon left behind, and their own children, known by pid files.

    A pid is only touched when its start time and command line match the file, and a process
    group only when its members started after the recorded leader, so a reused pid belonging to
    something else is left alone. Returns the pids stopped.
    """
    stopped: list[int] = []
    for pidfile in sorted((state_dir / "pids").glob("*.json")):
        try:
            record = json.loads(pidfile.read_text())
            pid, created = int(record["pid"]), float(record["create_time"])
        except (OSError, ValueError, KeyError, TypeError):
            pidfile.unlink(missing_ok=True)
            continue
        try:
            proc = psutil.Process(pid)
            same = abs(proc.create_time() - created) < 1 and proc.cmdline() == record["argv"]
        except psutil.Error:
            same = False
        members = [p for p in _group_members(pid, created) if p.pid != pid]
        if same or members:
            log.warning(
                "stopping %s (process group %d, %d process(es)) left behind by an earlier xgen",
                pidfile.stem,
                pid,
                len(members) + same,
            )
            everyone = [*members, proc] if same else members
            await terminate_group(pid, functools.partial(_all_gone, everyone), grace_s)
            stopped.extend(p.pid for p in everyone)
        pidfile.unlink(missing_ok=True)
    return stopped

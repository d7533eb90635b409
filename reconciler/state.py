"""Model states, the one table of allowed transitions, and the per-model record.

`LOADING → LOADED → UNLOADING → GONE`, `LOADING → ERROR`, `LOADED → ERROR` (process died),
`ERROR → LOADING` (retry). Anything else is a bug and raises.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any

from reconciler.spec import ModelSpec


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    LOADED = "LOADED"
    UNLOADING = "UNLOADING"
    ERROR = "ERROR"
    GONE = "GONE"


S = ModelState
ALLOWED: frozenset[tuple[ModelState, ModelState]] = frozenset(
    {
        (S.LOADING, S.LOADED),
        (S.LOADING, S.ERROR),
        (S.LOADING, S.UNLOADING),  # spec changed while loading: stop the half-started process
        (S.LOADED, S.UNLOADING),
        (S.LOADED, S.ERROR),  # the process died
        (S.ERROR, S.LOADING),  # retry with backoff, or a changed spec
        (S.ERROR, S.UNLOADING),  # removed while failed: make sure nothing is left
        (S.UNLOADING, S.GONE),
        (S.UNLOADING, S.ERROR),  # could not be stopped cleanly
    }
)


CRASH_LOOP_AFTER = 3  # consecutive failures after which a model is shown as crash-looping


class TransitionError(RuntimeError):
    """A state change outside the table: a bug in xgen, never a user error."""


@dataclass(frozen=True)
class FailedUpdate:
    """A replacement that never became ready: the spec it was for, why, and when to try again."""

    target: ModelSpec
    error: str
    failures: int
    retry_at: float


@dataclass(frozen=True)
class ModelInfo:
    """What xgen knows about one model's process; replaced, never mutated."""

    name: str
    spec: ModelSpec
    backend: str
    state: ModelState
    launch_hash: str = ""
    port: int | None = None
    pid: int | None = None
    started_at: float | None = None
    error_message: str | None = None
    log_tail: tuple[str, ...] = ()
    restarts: int = 0
    failures: int = 0  # consecutive failures of this launch description
    retry_at: float | None = None
    estimated: dict[str, int] | None = None  # bytes per device (gpu0 …, cpu), before it runs
    measured: dict[str, int] | None = None  # bytes per device: NVML for GPUs, the process tree's RSS for RAM
    since: float = 0.0
    failed_update: FailedUpdate | None = None  # the last replacement failed; the old version serves
    progress: float = 0.0  # how far a load is (0-1), from the backend's own output
    argv: tuple[str, ...] = ()  # the running process's command line
    last_failure: tuple[float, str] | None = None  # (when, why): kept after it recovers

    @property
    def endpoint(self) -> str | None:
        if self.backend == "remote":
            return self.spec.url
        return f"http://127.0.0.1:{self.port}/v1" if self.port else None

    @property
    def crash_looping(self) -> bool:
        """Failing again and again: down now, or up again too briefly to have reset its count."""
        return self.failures >= CRASH_LOOP_AFTER

    @property
    def device(self) -> str:
        if self.backend == "remote":
            return "remote"
        return placement(self.spec.gpus)

    def to_json(self) -> dict[str, Any]:
        """The status API's shape for one model."""
        return {
            "name": self.name,
            "aliases": list(self.spec.aliases),
            "backend": self.backend,
            "server_type": self.spec.server_type,
            "model_path": self.spec.source,
            "state": self.state.value,
            "port": self.port,
            "endpoint": self.endpoint,
            "launch_hash": self.launch_hash,
            "pid": self.pid,
            "started_at": self.started_at,
            "since": self.since,
            "restarts": self.restarts,
            "failures": self.failures,
            "crash_looping": self.crash_looping,
            "retry_at": self.retry_at,
            "error_message": self.error_message,
            "last_failure": {"at": self.last_failure[0], "reason": self.last_failure[1]} if self.last_failure else None,
            "progress": self.progress if self.state is ModelState.LOADING else None,
            "log_tail": list(self.log_tail),
            "launch": shown_argv(self.argv),
            "gpu_index": list(self.spec.gpus),
            "config": {  # a command's flags are its own: xgen passes it neither
                "n_ctx": None if self.spec.command else self.spec.n_ctx,
                "n_gpu_layers": None if self.spec.command else self.spec.n_gpu_layers,
                "device": self.device,
            },
            "memory": {
                "estimated": self.estimated,
                "measured": self.measured,
                "estimated_bytes": sum(self.estimated.values()) if self.estimated else None,
                "measured_bytes": sum(self.measured.values()) if self.measured else None,
            },
            "update": {
                "target": self.failed_update.target.model_dump(mode="json") if self.failed_update else None,
                "error": self.failed_update.error if self.failed_update else None,
                "failures": self.failed_update.failures if self.failed_update else 0,
                "retry_at": self.failed_update.retry_at if self.failed_update else None,
            },
            "spec": self.spec.model_dump(mode="json"),
        }


def placement(gpus: tuple[int, ...]) -> str:
    """Where a process runs, as status and the plan show it: `cpu`, `gpu:0`, `gpu:0,gpu:1`."""
    return ",".join(f"gpu:{g}" for g in gpus) or "cpu"


_SECRET = re.compile(r"key|token|secret|password|passwd|auth", re.IGNORECASE)


def shown_argv(argv: tuple[str, ...]) -> list[str]:
    """A command line fit to show: the value of any flag that names a secret (`--api-key X`,
    `--hf-token=X`) is masked."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg.startswith("-") and _SECRET.search(arg.split("=", 1)[0]):
            flag, eq, _ = arg.partition("=")
            shown.append(f"{flag}=***" if eq else arg)
            hide_next = not eq
        else:
            shown.append(arg)
    return shown


def transition(info: ModelInfo, to: ModelState, at: float, **changes: Any) -> ModelInfo:
    """Return `info` moved to state `to` (with other fields changed); raise on a move not in ALLOWED."""
    if (info.state, to) not in ALLOWED:
        raise TransitionError(f"{info.name}: {info.state.value} → {to.value} is not an allowed transition")
    return dataclasses.replace(info, state=to, since=at, **changes)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as a detector reports it. None means unknown, never a made-up 0."""

    index: int
    name: str
    vendor: str  # nvidia | amd
    memory_total: int
    memory_used: int | None = None
    memory_free: int | None = None
    utilization: float | None = None
    uuid: str | None = None
    driver: str | None = None
    detector: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

"""The Driver protocol: how a backend is launched and probed. The supervisor does the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from reconciler.spec import ModelSpec


@dataclass(frozen=True)
class Availability:
    ok: bool
    detail: str  # what was found, or why the backend cannot run here and what to do


class Driver(Protocol):
    name: str
    ready_timeout_s: float
    stop_signal: int  # what a drained process is stopped with (SIGKILL follows after the grace period)

    def command(self, name: str, model: ModelSpec, port: int) -> list[str]:
        """argv for the child (never a shell), bound to 127.0.0.1 on `port`."""
        ...

    def environment(self, model: ModelSpec) -> dict[str, str]:
        """Variables added to the child's environment (GPU pinning and the like)."""
        ...

    def health_url(self, port: int, model: ModelSpec) -> str:
        """What answers 200 once the process serves."""
        ...

    def alive_url(self, port: int, model: ModelSpec) -> str:
        """What a loaded process must answer to count as alive: a path its inference engine
        serves, where the backend has one (a health endpoint may answer while the engine is stuck)."""
        ...

    def progress(self, line: str) -> float | None:
        """How far a load is (0-1) when the backend writes `line` to its log, if the line says."""
        ...

    def availability(self) -> Availability: ...


def filled(text: str, name: str, model: ModelSpec, port: int) -> str:
    """`text` with {port}, {host}, {name} and {path} filled in (a command's arguments, `env` values)."""
    for key, value in (("{port}", str(port)), ("{host}", "127.0.0.1"), ("{name}", name), ("{path}", model.path or "")):
        text = text.replace(key, value)
    return text


def gpu_environment(model: ModelSpec) -> dict[str, str]:
    """Pin the child to the model's GPUs; an empty list hides every GPU from a CPU model."""
    visible = ",".join(str(i) for i in model.gpus)
    return {"CUDA_VISIBLE_DEVICES": visible, "HIP_VISIBLE_DEVICES": visible}


def ready_timeout(driver: Driver, model: ModelSpec) -> float:
    return model.ready_timeout_s or driver.ready_timeout_s

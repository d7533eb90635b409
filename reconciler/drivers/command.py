"""Any other server, run from the command line the model's `command` gives (whisper.cpp, a
llama.cpp fork with its own flags, an OpenAI-compatible server of any kind). xgen knows nothing
of its flags: it fills in the port, watches the health path, and does the rest as for any backend."""

from __future__ import annotations

import signal

from reconciler.drivers.base import Availability, filled, gpu_environment
from reconciler.spec import ModelSpec


class CommandDriver:
    name = "command"
    ready_timeout_s = 300.0  # an unknown server may load for long: ready_timeout_s per model says otherwise
    stop_signal: int = signal.SIGTERM  # an unknown server may have state to save; SIGKILL follows the grace period

    def command(self, name: str, model: ModelSpec, port: int) -> list[str]:
        assert model.command is not None, "the spec guarantees a command for backend: command"
        return [filled(arg, name, model, port) for arg in model.command.argv] + list(model.extra_args)

    def environment(self, model: ModelSpec) -> dict[str, str]:
        return gpu_environment(model)

    def progress(self, line: str) -> float | None:
        return None  # its log's words are its own

    def health_url(self, port: int, model: ModelSpec) -> str:
        return f"http://127.0.0.1:{port}{model.command.health if model.command else '/v1/models'}"

    def alive_url(self, port: int, model: ModelSpec) -> str:
        return self.health_url(port, model)

    def availability(self) -> Availability:
        return Availability(True, "runs the program each model's command names (checked when the file is read)")

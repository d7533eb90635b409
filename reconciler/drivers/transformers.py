"""HF transformers: the universal fallback for a Hugging Face model directory, served by xgen's
own small OpenAI-compatible server (drivers/hf_server.py) as the child process.

`transformers serve` was not used: it needs the hub for model discovery and has no embeddings
route; our server loads a local directory offline and meets the same contract as the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys

from reconciler.drivers.base import Availability, gpu_environment
from reconciler.spec import ModelSpec


class TransformersDriver:
    name = "transformers"
    ready_timeout_s = 300.0
    stop_signal: int = signal.SIGTERM

    def python(self) -> str:
        return os.environ.get("XGEN_TRANSFORMERS_PYTHON") or sys.executable

    def command(self, name: str, model: ModelSpec, port: int) -> list[str]:
        return [
            self.python(),
            "-m",
            "reconciler.drivers.hf_server",
            "--model",
            model.source,
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--server-type",
            model.server_type,
            "--max-len",
            str(model.n_ctx),
            "--dtype",
            model.transformers.dtype or "auto",
            *model.extra_args,
        ]

    def environment(self, model: ModelSpec) -> dict[str, str]:
        return {**gpu_environment(model), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def progress(self, line: str) -> float | None:
        """hf_server.py's own milestones: `xgen-load-progress 0.30 tokenizer loaded`."""
        if line.startswith("xgen-load-progress "):
            with contextlib.suppress(ValueError, IndexError):
                return float(line.split()[1])
        return None

    def health_url(self, port: int, model: ModelSpec) -> str:
        return f"http://127.0.0.1:{port}/health"

    def alive_url(self, port: int, model: ModelSpec) -> str:
        return self.health_url(port, model)

    def availability(self) -> Availability:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed: pip install 'xgen[transformers]'")
        from importlib.metadata import version

        return Availability(True, f"transformers {version('transformers')}, torch {version('torch')}")

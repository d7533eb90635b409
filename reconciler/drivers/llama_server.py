"""llama.cpp `llama-server`: GGUF models, chat and embeddings, CPU or GPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from reconciler.drivers.base import Availability, gpu_environment
from reconciler.install import cached_llama_server
from reconciler.spec import ModelSpec

_LLAMA_STAGES = (  # markers of llama-server's load (default verbosity), and how far each is
    ("listening on", 0.99),
    ("model loaded", 0.95),
    ("warming up", 0.85),
    ("load_model: initializing", 0.8),
    ("llama_kv_cache", 0.75),
    ("llama_context", 0.7),
    ("threadpool init", 0.6),
    ("offloaded", 0.6),
    ("load_tensors", 0.3),
    ("loading model", 0.05),
)


def find_binary() -> Path | None:
    """`XGEN_LLAMA_SERVER`, else `llama-server` on PATH, else the one `xgen install` built."""
    if env := os.environ.get("XGEN_LLAMA_SERVER"):
        return Path(env)
    if found := shutil.which("llama-server"):
        return Path(found)
    for flavor in ("cuda", "cpu"):
        if (cached := cached_llama_server(flavor)).exists():
            return cached
    return None


class LlamaServerDriver:
    name = "llama-server"
    ready_timeout_s = 120.0
    # nothing to save or flush once drained, and its SIGTERM path waits on open connections and
    # threads (14 ms at best): on the way of every swap, so it is killed outright
    stop_signal: int = signal.SIGKILL

    def __init__(self, binary: Path | None = None) -> None:
        self._binary = binary

    @property
    def binary(self) -> Path:
        found = self._binary or find_binary()
        if found is None:
            raise FileNotFoundError("llama-server not found: run `xgen install`, or set XGEN_LLAMA_SERVER")
        return found

    def command(self, name: str, model: ModelSpec, port: int) -> list[str]:
        assert model.path is not None, "the spec guarantees a path for llama-server"
        o = model.llama
        argv = [
            o.binary or str(self.binary),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-m",
            model.path,
            "--alias",
            name,
            "-c",
            str(model.n_ctx),
            "-ngl",
            "all" if model.n_gpu_layers < 0 else str(model.n_gpu_layers),
            "--no-webui",
        ]
        for flag, value in (
            ("-t", o.threads),
            ("-tb", o.threads_batch),
            ("-b", o.batch_size),
            ("-ub", o.ubatch_size),
            ("-np", o.parallel),
            ("-fa", o.flash_attn),
        ):
            if value is not None:
                argv += [flag, str(value)]
        load_mode = {(True, False): None, (False, False): "none", (True, True): "mmap+mlock", (False, True): "mlock"}
        if mode := load_mode[(o.mmap, o.mlock)]:
            argv += ["--load-mode", mode]
        if model.server_type == "embedding":
            argv += ["--embeddings", "--pooling", o.pooling or "mean"]
        elif model.server_type == "rerank":
            argv += ["--reranking"]  # /v1/rerank, with the model's rank pooling
        if model.lora:
            # loaded but not applied: the proxy selects one per request
            argv += ["--lora-scaled", ",".join(f"{a.path}:{a.scale}" for a in model.lora), "--lora-init-without-apply"]
        return argv + list(model.extra_args)

    def environment(self, model: ModelSpec) -> dict[str, str]:
        return gpu_environment(model)

    def progress(self, line: str) -> float | None:
        """llama-server's load messages: the model file opened, tensors placed, the context
        (KV cache) made, the HTTP server up."""
        return next((p for marker, p in _LLAMA_STAGES if marker in line), None)

    def health_url(self, port: int, model: ModelSpec) -> str:
        return f"http://127.0.0.1:{port}/health"

    def alive_url(self, port: int, model: ModelSpec) -> str:
        """/slots: its inference loop answers it (a high-priority task between two batches), where
        /health is answered by an HTTP thread even while that loop is stuck. It waits for the batch
        in progress: 0.03-0.09 s with 20 requests in flight on 2 HTTP threads, over 3 s with 12 on
        2 busy cores (measured), hence the supervisor's look at the CPU before it calls it hung."""
        return f"http://127.0.0.1:{port}/slots"

    def availability(self) -> Availability:
        binary = self._binary or find_binary()
        if binary is None:
            return Availability(
                False, "llama-server not found (PATH, XGEN_LLAMA_SERVER, or the xgen cache): run `xgen install`"
            )
        try:
            out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20)
        except OSError as exc:
            return Availability(False, f"{binary}: {exc}")
        version = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
        return Availability(out.returncode == 0, f"{binary} ({version or 'version unknown'})")

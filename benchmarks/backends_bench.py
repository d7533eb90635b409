"""Time to LOADED and memory per process for each backend, on the tiny models the tests build.

One `xgen serve` loads the same kind of tiny model with every backend: a random-weight GGUF
(llama-server) and a random-weight HF Llama (transformers, and vLLM from its cached CPU
virtualenv). Time to LOADED is spawn → health 200 as the daemon records it; memory is the RSS
of each backend's whole process tree. The baseline, in the same run, is llama-server.

Usage: python benchmarks/backends_bench.py [--no-vllm]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from net import free_port
from tinygguf import write_tiny_llama
from tinyhf import write_tiny_hf_llama


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xgen-backends-"))
    gguf = write_tiny_llama(work / "tiny.gguf")
    hf = write_tiny_hf_llama(work / "tiny-hf")
    port = free_port()
    text = (f"server: {{port: {port}, port_range: [25500, 25510]}}\nmodels:\n"
            f"  llama-server:\n    path: {gguf}\n    n_ctx: 512\n"
            f"  transformers:\n    path: {hf}\n    backend: transformers\n    n_ctx: 512\n")
    if not args.no_vllm:
        from vllm_env import vllm_python

        text += (f"  vllm:\n    path: {hf}\n    backend: vllm\n    n_ctx: 512\n    ready_timeout_s: 600\n"
                 f"    vllm: {{python: {vllm_python()}, dtype: float32, gpu_memory_utilization: 0.2}}\n")
    (work / "models.yaml").write_text(text + "active: llama-server\n")
    daemon = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "serve", "models.yaml"], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status: dict[str, object] = {}
        for _ in range(6000):
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/api/management/status").json()
                if status["status"] == "converged":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        models = {m["name"]: m for m in status["loaded_models"]}  # type: ignore[union-attr]
        base = models["llama-server"]
        base_load = base["since"] - base["started_at"]
        base_rss = tree_rss(base["pid"])
        print("backend        time to LOADED        memory (RSS of the process tree)")
        for name, m in models.items():
            load = m["since"] - m["started_at"]
            rss = tree_rss(m["pid"])
            ratios = f"{load:6.2f} s ({load / base_load:5.1f}x)   {rss / 2**20:7.0f} MB ({rss / base_rss:5.1f}x)"
            print(f"{name:<14} {ratios}")
        print(f"(baseline: llama-server on a {gguf.stat().st_size // 1024} KB GGUF; the HF model is the same "
              "shape: hidden 128, 2 layers; 2 CPU cores)")
    finally:
        daemon.terminate()
        daemon.wait(120)


if __name__ == "__main__":
    main()

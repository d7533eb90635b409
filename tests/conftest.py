"""Shared fixtures: the real llama-server and default model that `xgen install` provides,
tiny GGUF models made on the spot, and a real `xgen serve` daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinygguf import write_tiny_llama  # tests/ is on sys.path (pytest's rootdir conftest)

from reconciler.drivers.llama_server import find_binary
from reconciler.install import default_model_path


@pytest.fixture(scope="session")
def default_model() -> Path:
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the default model is missing at {path}: run `xgen install` (the README's test command does)")
    return path


@pytest.fixture(scope="session")
def llama_server() -> Path:
    binary = find_binary()
    if binary is None:
        pytest.fail("llama-server not found: run `xgen install` (the README's test command does)")
    return binary


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")

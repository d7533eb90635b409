"""The transition table: what is allowed, and that anything else raises."""

from __future__ import annotations

import itertools

import pytest

from reconciler.spec import ModelSpec
from reconciler.state import ALLOWED, ModelInfo, ModelState, TransitionError, transition

S = ModelState


def info(state: ModelState) -> ModelInfo:
    return ModelInfo("m", ModelSpec(path="/m.gguf"), "llama-server", state, port=8001)


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED))
def test_allowed_transitions(old: ModelState, new: ModelState) -> None:
    moved = transition(info(old), new, at=5.0, error_message="x")
    assert (moved.state, moved.since, moved.error_message) == (new, 5.0, "x")


@pytest.mark.parametrize(("old", "new"), sorted(set(itertools.product(S, S)) - ALLOWED))
def test_everything_else_raises(old: ModelState, new: ModelState) -> None:
    with pytest.raises(TransitionError, match=f"m: {old.value} → {new.value} is not an allowed transition"):
        transition(info(old), new, at=0.0)


def test_lifecycle_of_the_design() -> None:
    path = [S.LOADING, S.LOADED, S.ERROR, S.LOADING, S.LOADED, S.UNLOADING, S.GONE]
    for old, new in itertools.pairwise(path):
        assert (old, new) in ALLOWED


def test_status_shape() -> None:
    row = info(S.LOADED).to_json()
    assert row["endpoint"] == "http://127.0.0.1:8001/v1"
    assert row["config"] == {"n_ctx": 4096, "n_gpu_layers": 0, "device": "cpu"}
    assert row["spec"]["path"] == "/m.gguf"


def test_a_launch_is_shown_with_its_secrets_masked() -> None:
    from reconciler.state import shown_argv

    argv = ("llama-server", "-m", "m.gguf", "--api-key", "s3cret", "--hf-token=abc", "--port", "8001")
    assert shown_argv(argv) == ["llama-server", "-m", "m.gguf", "--api-key", "***", "--hf-token=***", "--port", "8001"]

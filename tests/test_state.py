"""The transition table: what is allowed, and that anything else raises."""

from __future__ import annotations

import itertools

import pytest

from reconciler.spec import ModelSpec
from reconciler.state import ALLOWED, ModelInfo, ModelState, TransitionError, transition
from reconciler.store import StateStore

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


def test_samples_do_not_push_the_history_out_of_the_backlog() -> None:
    """GPU samples every 5 s filled a 1,000-event backlog in 83 minutes: a crash at night was gone
    by the morning. Samples are kept as the latest of each; everything else as before."""
    store = StateStore(backlog=10)
    crash = store.publish("crash", {"model": "a"})
    for i in range(2000):
        store.publish("gpu", {"detector": "nvml", "i": i})
        store.publish("progress", {"model": "a", "progress": i / 2000})
    store.publish("progress", {"model": "b", "progress": 0.5})
    after = store.events_after(0)
    assert [e.kind for e in after] == ["crash", "gpu", "progress", "progress"]
    assert after[0] is crash and after[1].data["i"] == 1999 and after[2].data["progress"] == 1999 / 2000
    assert store.last_event_id == after[-1].id
    assert store.events_after(after[1].id) == after[2:]

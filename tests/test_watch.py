"""The watch loop's own decisions, with the executor and GPUs stubbed: a failing pass is reported
and retried, never raised; the settle window; the kept last good spec."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from reconciler import last_good
from reconciler.plan import Plan
from reconciler.spec import load
from reconciler.store import StateStore
from reconciler.watch import Reconciler, Settle


class FlakyExecutor:
    """Raises on the first apply, as a bug in an action would."""

    def __init__(self) -> None:
        self.supervisor = SimpleNamespace(observed=dict, policy=None)
        self.calls = 0
        self.busy = False

    def apply(self, plan: Plan) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom in an action")


def reconciler(tmp_path: Path, text: str, executor: Any) -> tuple[Reconciler, StateStore]:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "models.yaml").write_text(text.format(model=model))
    gpu = SimpleNamespace(sample=lambda: SimpleNamespace(gpus=[]), detector="cpu")
    store = StateStore()
    return Reconciler(tmp_path / "models.yaml", store, executor, gpu, tmp_path), store  # type: ignore[arg-type]


SPEC = "server: {{settle_ms: 0}}\nmodels:\n  a:\n    path: {model}\n"


def test_a_pass_that_raises_is_reported_and_the_next_one_runs(tmp_path: Path) -> None:
    r, store = reconciler(tmp_path, SPEC, FlakyExecutor())
    events: list[tuple[str, dict[str, Any]]] = []
    store.listeners.append(lambda kind, data: events.append((kind, data)))

    async def two_passes() -> None:
        await r.reconcile()
        assert store.pass_error is not None and store.pass_error["error"] == "RuntimeError: boom in an action"
        assert any("boom in an action" in line for line in store.pass_error["traceback"])
        await r.reconcile()

    asyncio.run(two_passes())
    assert [k for k, _ in events if k == "pass_error"] == ["pass_error"]
    assert store.pass_error is None


def test_a_valid_settled_file_is_kept_as_the_last_good_spec(tmp_path: Path) -> None:
    r, store = reconciler(tmp_path, SPEC, FlakyExecutor())
    asyncio.run(r.reconcile())
    kept = last_good.load(tmp_path)
    assert kept is not None and kept.spec.generation == load(tmp_path / "models.yaml").generation
    assert kept.source.endswith("models.yaml") and store.serving is not None and store.serving["source"] == "file"


def test_a_damaged_last_good_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / last_good.FILE).write_text('{"spec": {"models": {"a": {"n_ctx": "banana"}}}}')
    assert last_good.load(tmp_path) is None


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        ([("a", 0.0, 5.0)], 5.0),  # first read of an old file: settled already
        ([("a", 0.0, 5.0), ("b", 1.0, 0.0)], 0.0),  # changed: the clock starts again
        ([("a", 0.0, 0.0), ("b", 0.1, 0.0), ("b", 0.5, 9.0)], 0.4),  # mtime ignored after the first read
        ([("a", 0.0, 0.0), ("a", 2.0, 0.0)], 2.0),  # touched, same bytes: still settled
    ],
)
def test_settle_counts_from_the_last_change_of_bytes(reads: list[tuple[str, float, float]], expected: float) -> None:
    settle = Settle()
    stable = [settle.stable_for(digest, now, age) for digest, now, age in reads]
    assert stable[-1] == pytest.approx(expected)

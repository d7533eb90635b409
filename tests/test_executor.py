"""How the executor orders owners (the supervisor stubbed: only the order is under test): a load
waits for the unloads that free its GPU and for nothing else; a newer target supersedes."""

from __future__ import annotations

import asyncio
from typing import Any

from reconciler.executor import Executor
from reconciler.plan import Action, Plan
from reconciler.spec import ModelSpec
from reconciler.state import ModelInfo, ModelState
from reconciler.store import StateStore
from reconciler.supervisor import RestartPolicy


class Recorder:
    """Stands in for the supervisor: starts and stops take `delay` seconds and are logged."""

    def __init__(self, store: StateStore, delay: float) -> None:
        self.store = store
        self.delay = delay
        self.log: list[str] = []
        self.policy = RestartPolicy()

    async def start(self, name: str, model: ModelSpec, backend: str) -> bool:
        self.log.append(f"start {name}")
        await asyncio.sleep(self.delay)
        self.log.append(f"started {name}")
        return True

    async def stop(self, name: str, reason: str) -> None:
        self.log.append(f"stop {name}")
        await asyncio.sleep(self.delay)
        self.store.models.pop(name, None)
        self.log.append(f"stopped {name}")


def gpu(index: int) -> ModelSpec:
    return ModelSpec(path="/m/x.gguf", gpu_index=index, n_gpu_layers=-1)


def run(actions: list[Action], running: dict[str, ModelSpec], delay: float = 0.05) -> list[str]:
    async def go() -> list[str]:
        store = StateStore()
        for name, spec in running.items():
            store.models[name] = ModelInfo(name, spec, "llama-server", ModelState.ERROR)
        recorder = Recorder(store, delay)
        executor = Executor(store, recorder, drain_s=0)  # type: ignore[arg-type]
        executor.apply(Plan("g", tuple(actions)))
        while executor.busy:
            await asyncio.sleep(0.01)
        return recorder.log

    return asyncio.run(go())


def test_a_load_waits_for_the_unload_that_frees_its_gpu_and_nothing_else() -> None:
    log = run(
        [
            Action("unload", "old0", "removed"),
            Action("load", "new0", "new", "llama-server", gpu(0)),
            Action("load", "new1", "new", "llama-server", gpu(1)),
        ],
        {"old0": gpu(0)},
    )
    assert log.index("stopped old0") < log.index("start new0")
    assert log.index("start new1") < log.index("stopped old0")  # GPU 1 did not wait


def test_the_same_target_again_is_not_started_twice_and_a_new_one_supersedes() -> None:
    async def go() -> tuple[list[str], Any]:
        store = StateStore()
        recorder = Recorder(store, 0.2)
        executor = Executor(store, recorder, drain_s=0)  # type: ignore[arg-type]
        first = Action("load", "m", "new", "llama-server", ModelSpec(path="/m/a.gguf"))
        executor.apply(Plan("g", (first,)))
        await asyncio.sleep(0.05)
        executor.apply(Plan("g", (first,)))  # the next pass hands the same target: a no-op
        await asyncio.sleep(0.05)
        executor.apply(Plan("g", (Action("load", "m", "new", "llama-server", ModelSpec(path="/m/b.gguf")),)))
        while executor.busy:
            await asyncio.sleep(0.01)
        return recorder.log, executor

    log, _ = asyncio.run(go())
    assert log == ["start m", "start m", "started m"]  # the first load was cancelled mid-way


def test_every_action_kind_but_adapters_is_carried_out() -> None:
    """Adapters need a running vLLM: tests/test_vllm.py covers them."""
    async def go() -> tuple[list[str], StateStore]:
        store = StateStore()
        spec = ModelSpec(path="/m/a.gguf")
        for name in ("gone", "changed", "renamed"):
            store.models[name] = ModelInfo(name, spec, "llama-server", ModelState.ERROR)
        recorder = Recorder(store, 0.01)
        executor = Executor(store, recorder, drain_s=0)  # type: ignore[arg-type]
        executor.apply(Plan("g", (
            Action("unload", "gone", "removed"),
            Action("reload", "changed", "n_ctx", "llama-server", spec.model_copy(update={"n_ctx": 512}),
                   strategy="recreate"),
            Action("load", "new", "new", "llama-server", spec),
            Action("update", "renamed", "aliases", "llama-server", spec.model_copy(update={"aliases": ["x"]})),
            Action("activate", "new", "was none"),
        )))
        while executor.busy:
            await asyncio.sleep(0.01)
        return recorder.log, store

    log, store = asyncio.run(go())
    assert {"stopped gone", "stopped changed", "started changed", "started new"} <= set(log)
    assert store.active == "new" and store.models["renamed"].spec.aliases == ["x"]

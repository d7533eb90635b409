"""The pure choices of on-demand models: what fits, what to evict, what is idle (demand.py), and
how plan() turns them into actions, refusals and budgets."""

from __future__ import annotations

from reconciler.demand import Candidate, Room, Usage, decide
from reconciler.plan import Observed, ObservedModel, plan
from reconciler.spec import parse
from reconciler.state import GpuInfo, ModelState

GIB = 2**30
NOW = 1_000_000.0


def cand(
    name: str, need: int | None = GIB, *, resident: bool = False, device: str = "cpu", **usage: float
) -> Candidate:
    idle = usage.pop("idle_unload_s", None)
    needs = {device: need} if need is not None else None
    return Candidate(name, (device,), needs, resident, Usage(**usage), idle)  # type: ignore[arg-type]


def test_a_wanted_model_that_fits_is_loaded() -> None:
    d = decide([cand("a", waiting=1, wanted_at=NOW)], {"cpu": Room("cpu", 4 * GIB)}, NOW)
    assert d.keep == {"a": "demand"} and not d.unload and not d.refused


def test_the_least_valuable_idle_model_is_evicted() -> None:
    """Idle for long and quick to reload goes first: cost per second of idleness."""
    rooms = {"cpu": Room("cpu", 2 * GIB)}
    old_cheap = cand("old", resident=True, last_used=NOW - 100, load_s=1.0)  # 0.01 s/s
    recent = cand("recent", resident=True, last_used=NOW - 5, load_s=1.0)  # 0.2 s/s
    d = decide([old_cheap, recent, cand("new", waiting=1, wanted_at=NOW)], rooms, NOW)
    assert set(d.keep) == {"recent", "new"}
    assert d.unload["old"][0] == "evict" and d.unload["old"][1].startswith("evicted for new (idle 100 s")
    # the same recency, but "old" costs 60 s to bring back: the cheap one goes instead
    slow = cand("old", resident=True, last_used=NOW - 100, load_s=60.0)  # 0.6 s/s
    d = decide([slow, recent, cand("new", waiting=1, wanted_at=NOW)], rooms, NOW)
    assert set(d.unload) == {"recent"}


def test_busy_models_go_after_idle_ones_and_waited_for_ones_never() -> None:
    rooms = {"cpu": Room("cpu", 2 * GIB)}
    busy = cand("busy", resident=True, last_used=NOW - 1000, inflight=3)
    idle = cand("idle", resident=True, last_used=NOW - 1)
    d = decide([busy, idle, cand("new", waiting=1, wanted_at=NOW)], rooms, NOW)
    assert set(d.unload) == {"idle"}
    # both loaded models have requests waiting on them: nothing may go now, the new one waits its
    # turn (it is not refused: once those are served they can be evicted)
    waited = cand("w1", resident=True, waiting=1), cand("w2", resident=True, waiting=2)
    d = decide([*waited, cand("new", waiting=1, wanted_at=NOW)], rooms, NOW)
    assert not d.unload and not d.refused and set(d.keep) == {"w1", "w2"}
    assert d.queued["new"] == "waiting for room: w1, w2 must serve the requests waiting for them first"


def test_pinned_memory_is_never_given_up_and_the_refusal_has_numbers() -> None:
    rooms = {"gpu0": Room("gpu0", 10 * GIB, {"big": 9 * GIB})}
    d = decide([cand("new", 2 * GIB, device="gpu0", waiting=1, wanted_at=NOW)], rooms, NOW)
    assert d.refused["new"] == (
        "model 'new' cannot be loaded now: needs 2.00 GiB on gpu0, 1.00 GiB free of a 10.00 GiB budget; "
        "pinned models hold 9.00 GiB (big)"
    )


def test_no_eviction_when_it_would_not_make_room() -> None:
    """Evicting the 1 GiB model cannot fit a 4 GiB one in 3 GiB: keep it, refuse the request."""
    rooms = {"cpu": Room("cpu", 3 * GIB)}
    small = cand("small", resident=True, last_used=NOW - 50)
    d = decide([small, cand("huge", 4 * GIB, waiting=1, wanted_at=NOW)], rooms, NOW)
    assert d.keep == {"small": "demand"} and not d.unload and "huge" in d.refused


def test_only_models_on_the_needed_device_are_evicted() -> None:
    rooms = {"cpu": Room("cpu", 8 * GIB), "gpu0": Room("gpu0", GIB)}
    on_cpu = cand("on_cpu", resident=True, last_used=NOW - 500)
    on_gpu = cand("on_gpu", resident=True, device="gpu0", last_used=NOW - 5)
    d = decide([on_cpu, on_gpu, cand("new", device="gpu0", waiting=1, wanted_at=NOW)], rooms, NOW)
    assert set(d.unload) == {"on_gpu"} and "on_cpu" in d.keep


def test_max_loaded_counts_pinned_models_and_evicts_by_the_same_rule() -> None:
    rooms = {"cpu": Room("cpu", 100 * GIB)}
    models = [cand("a", resident=True, last_used=NOW - 10), cand("b", waiting=1, wanted_at=NOW)]
    assert decide(models, rooms, NOW, pinned_count=1, max_loaded=3).keep.keys() == {"a", "b"}
    d = decide(models, rooms, NOW, pinned_count=1, max_loaded=2)
    assert d.keep == {"b": "demand"} and d.unload["a"][0] == "evict"


def test_idle_models_unload_unless_in_use_or_asked_for() -> None:
    rooms = {"cpu": Room("cpu", 100 * GIB)}
    stale = cand("stale", resident=True, last_used=NOW - 301, idle_unload_s=300)
    fresh = cand("fresh", resident=True, last_used=NOW - 299, idle_unload_s=300)
    busy = cand("busy", resident=True, last_used=NOW - 900, inflight=1, idle_unload_s=300)
    never = cand("never", resident=True, last_used=NOW - 9000)  # no idle_unload_s: only evicted
    d = decide([stale, fresh, busy, never], rooms, NOW)
    assert d.unload == {"stale": ("idle", "idle for 301 s (idle_unload_s 300)")}
    assert set(d.keep) == {"fresh", "busy", "never"}


def test_first_come_first_served_when_two_want_the_last_room() -> None:
    rooms = {"cpu": Room("cpu", GIB)}
    d = decide([cand("late", waiting=1, wanted_at=NOW - 1), cand("early", waiting=1, wanted_at=NOW - 2)], rooms, NOW)
    assert d.keep == {"early": "demand"} and "late" in d.queued and not d.refused


# ---------------------------------------------------------------- through plan()

SPEC = """
server: {max_loaded: 2}
models:
  pinned: {path: /m/p.gguf}
  a: {path: /m/a.gguf, desired: on_demand, idle_unload_s: 60}
  b: {path: /m/b.gguf, desired: on_demand}
"""


def loaded(spec_text: str, *names: str) -> dict[str, ObservedModel]:
    spec = parse(spec_text)
    return {n: ObservedModel(spec.models[n], "llama-server", ModelState.LOADED) for n in names}


def test_plan_standby_models_are_not_drift_and_requests_load_them() -> None:
    spec = parse(SPEC)
    running = loaded(SPEC, "pinned")
    p = plan(spec, Observed(running, "pinned", now=NOW))
    assert p.matches and [o.status for o in p.on_demand] == ["standby", "standby"]
    p = plan(spec, Observed(running, "pinned", usage={"a": Usage(waiting=2, wanted_at=NOW)}, now=NOW))
    [load] = p.actions
    assert (load.kind, load.model, load.cause) == ("load", "a", "demand")
    assert load.reason.startswith("on demand: 2 request(s) wait")


def test_plan_evicts_and_unloads_idle_with_causes() -> None:
    spec = parse(SPEC)
    running = loaded(SPEC, "pinned", "a")
    usage = {"a": Usage(last_used=NOW - 30), "b": Usage(waiting=1, wanted_at=NOW)}
    p = plan(spec, Observed(running, "pinned", usage=usage, now=NOW))
    assert [(a.kind, a.model, a.cause) for a in p.actions] == [("unload", "a", "evict"), ("load", "b", "demand")]
    p = plan(spec, Observed(running, "pinned", usage={"a": Usage(last_used=NOW - 61)}, now=NOW))
    assert [(a.kind, a.model, a.cause) for a in p.actions] == [("unload", "a", "idle")]


def test_plan_refuses_a_file_whose_on_demand_model_could_never_fit(tiny_gguf: object) -> None:
    text = f"""
server: {{budgets: {{gpu0: 10GiB}}}}
models:
  big: {{path: {tiny_gguf}, gpu_index: 0, n_gpu_layers: -1}}
  extra: {{path: {tiny_gguf}, gpu_index: 0, n_gpu_layers: -1, desired: on_demand}}
"""
    spec = parse(text)
    h100 = GpuInfo(0, "H100", "nvidia", 80 * GIB, memory_used=0)
    p = plan(spec, Observed(gpus=(h100,), estimates={"big": {"gpu0": 7 * GIB}, "extra": {"gpu0": 4 * GIB}}))
    assert p.errors == (
        "models.extra: on demand it needs 4.00 GiB on GPU 0 (H100), but the budget of 10.00 GiB leaves 3.00 GiB "
        "beside the pinned models (big); it could never be loaded",
    )
    ok = plan(spec, Observed(gpus=(h100,), estimates={"big": {"gpu0": 7 * GIB}, "extra": {"gpu0": 3 * GIB}}))
    assert not ok.errors
    [gpu0] = ok.budgets
    assert (gpu0["budget_bytes"], gpu0["pinned"], gpu0["on_demand"]) == (10 * GIB, {"big": 7 * GIB}, {})


def test_plan_refuses_max_loaded_below_the_pinned_models() -> None:
    text = SPEC.replace("max_loaded: 2", "max_loaded: 1")
    assert plan(parse(text), Observed()).errors == (
        "server.max_loaded: 1, but 1 models are pinned and on-demand models need room for one more",
    )


def test_budget_settings() -> None:
    from reconciler.plan import budget_of

    server = parse("server: {budgets: {gpu: 90%, gpu1: 20GiB, cpu: 1000}, memory_reserve: 2GiB}\n").server
    assert budget_of(server, "gpu0", 80 * GIB) == 72 * GIB
    assert budget_of(server, "gpu1", 80 * GIB) == 20 * GIB
    assert budget_of(server, "cpu", 64 * GIB) == 1000
    assert budget_of(parse("server: {memory_reserve: 2GiB}\n").server, "cpu", 64 * GIB) == 62 * GIB

"""The pure planner: what changes restart a model, the order of actions, retries, placement,
golden renderings, and properties (deterministic; applying a plan converges)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.plan import (
    Change,
    Drift,
    Observed,
    ObservedModel,
    Plan,
    choose_backend,
    plan,
    render_json,
    render_text,
    server_view,
)
from reconciler.spec import ModelSpec, Spec, parse
from reconciler.state import GpuInfo, ModelState

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parent.parent
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "nvidia", 80 * 2**30, memory_used=1 * 2**30, detector="pynvml")

SPEC = """
models:
  chat:
    path: /m/chat.gguf
    n_ctx: 4096
    aliases: [default]
  embed:
    path: /m/embed.gguf
    server_type: embedding
  big:
    path: /m/big.gguf
    gpu_index: 0
    n_gpu_layers: -1
    desired: unloaded
active: chat
"""


def spec_of(text: str = SPEC) -> Spec:
    return parse(text, "m.yaml", {})


def running(spec: Spec, state: ModelState = ModelState.LOADED, **over: object) -> Observed:
    """Observed state in which every loaded model of `spec` runs as specified."""
    models = {n: ObservedModel(m, choose_backend(m, ())[0], state) for n, m in spec.loaded.items()}
    active = spec.resolve(spec.active) if spec.active else None
    return Observed(models, active, **over)  # type: ignore[arg-type]


def edit(spec: Spec, name: str, **changes: object) -> Spec:
    models = dict(spec.models)
    models[name] = models[name].model_copy(update=changes)
    return spec.model_copy(update={"models": models})


def kinds(p: Plan) -> list[tuple[str, str]]:
    return [(a.kind, a.model) for a in p.actions]


def test_fresh_spec_loads_everything_then_activates() -> None:
    assert kinds(plan(spec_of(), Observed())) == [("load", "chat"), ("load", "embed"), ("activate", "chat")]


def test_converged_state_plans_nothing() -> None:
    spec = spec_of()
    p = plan(spec, running(spec))
    assert p.empty and not p.notes and not p.errors


@pytest.mark.parametrize(
    ("field", "value", "changed"),
    [("n_ctx", 8192, "n_ctx"), ("n_gpu_layers", 10, "n_gpu_layers"), ("path", "/m/other.gguf", "path"),
     ("extra_args", ["--flash-attn", "on"], "extra_args"), ("gpu_index", 1, "gpu_index")],
)
def test_launch_changes_reload_with_a_field_diff(field: str, value: object, changed: str) -> None:
    spec = spec_of()
    p = plan(edit(spec, "chat", **{field: value}), running(spec))
    assert kinds(p) == [("reload", "chat")]
    assert [c.field for c in p.actions[0].changes] == [changed]


def test_alias_change_is_an_update_in_place() -> None:
    spec = spec_of()
    p = plan(edit(spec, "chat", aliases=["default", "gpt-4o"]), running(spec))
    assert kinds(p) == [("update", "chat")]
    assert [str(c) for c in p.actions[0].changes] == ['aliases: ["default"] → ["default", "gpt-4o"]']
    assert "  ~ update in place chat: applies without a restart" in render_text(p)
    assert "Plan: 1 to update in place." in render_text(p)


def test_a_reload_lists_in_place_changes_too() -> None:
    spec = spec_of()
    p = plan(edit(spec, "chat", aliases=["default", "gpt-4o"], n_ctx=8192), running(spec))
    assert kinds(p) == [("reload", "chat")]
    assert [c.field for c in p.actions[0].changes] == ["n_ctx", "aliases"]


def test_server_setting_changes_are_updates_and_keys_never_show() -> None:
    before = spec_of("server:\n  api_key: old-secret\n  load_wait_s: 30\n" + SPEC)
    after = spec_of("server:\n  api_key: new-secret\n  load_wait_s: 60\n  port: 9000\n" + SPEC)
    p = plan(after, running(before, server=server_view(before.server)))
    assert kinds(p) == [("update", "")]
    assert [c.field for c in p.actions[0].changes] == ["server.api_key", "server.load_wait_s"]
    text, shown = render_text(p), render_json(p)
    assert "~ update in place server settings" in text and "server.api_key: (set) → (changed)" in text
    assert "server.port: 8000 → 9000 takes effect when `xgen serve` restarts" in text
    assert "secret" not in text and "secret" not in shown
    assert plan(before, running(before, server=server_view(before.server))).matches


def test_active_change_only_activates() -> None:
    text = SPEC.replace("    server_type: embedding\n", "")  # two llms
    before, after = spec_of(text), spec_of(text.replace("active: chat", "active: embed"))
    assert kinds(plan(after, running(before))) == [("activate", "embed")]


def test_unloads_come_first_then_reloads_loads_activate() -> None:
    spec = spec_of()
    observed = running(spec)
    stale = ObservedModel(ModelSpec(path="/m/old.gguf"), "llama-server", ModelState.LOADED)
    observed = Observed({**observed.models, "old": stale}, "old")
    target = edit(spec, "chat", n_ctx=1024)
    models = dict(target.models)
    models["new"] = ModelSpec(path="/m/new.gguf")
    p = plan(target.model_copy(update={"models": models}), observed)
    assert kinds(p) == [("unload", "old"), ("reload", "chat"), ("load", "new"), ("activate", "chat")]


def test_desired_unloaded_unloads() -> None:
    spec = spec_of()
    p = plan(edit(spec, "embed", desired="unloaded"), running(spec))
    assert kinds(p) == [("unload", "embed")]
    assert p.actions[0].reason == "desired: unloaded"


def test_error_with_unchanged_spec_is_retried_when_backoff_is_due() -> None:
    spec = spec_of()
    ok = running(spec)
    failed = ObservedModel(spec.models["chat"], "llama-server", ModelState.ERROR, 2, True, "exit code 1")
    p = plan(spec, Observed({**ok.models, "chat": failed}, "chat"))
    assert kinds(p) == [("load", "chat")]
    assert p.actions[0].reason == "retry 2 after: exit code 1"  # the 2nd retry, after 2 failures


def test_error_waits_for_backoff_and_by_default_never_gives_up() -> None:
    spec = spec_of()
    ok = running(spec)
    waiting = ObservedModel(spec.models["chat"], "llama-server", ModelState.ERROR, 1, False, "boom")
    p = plan(spec, Observed({**ok.models, "chat": waiting}, "chat"))
    assert p.empty and not p.matches
    assert p.drift == (Drift("chat", "ERROR", "boom; retry 1 after the backoff"),)
    assert "  ! chat: ERROR: boom; retry 1 after the backoff" in render_text(p)
    many = ObservedModel(spec.models["chat"], "llama-server", ModelState.ERROR, 500, True, "boom")
    assert kinds(plan(spec, Observed({**ok.models, "chat": many}, "chat"))) == [("load", "chat")]


def test_max_restarts_is_an_opt_in_limit() -> None:
    spec = spec_of("server:\n  max_restarts: 5\n" + SPEC)
    ok = running(spec)
    waiting = ObservedModel(spec.models["chat"], "llama-server", ModelState.ERROR, 1, False, "boom")
    assert plan(spec, Observed({**ok.models, "chat": waiting}, "chat")).drift == (
        Drift("chat", "ERROR", "boom; retry 1 of 5 after the backoff"),
    )
    exhausted = ObservedModel(spec.models["chat"], "llama-server", ModelState.ERROR, 5, True, "boom")
    p = plan(spec, Observed({**ok.models, "chat": exhausted}, "chat"))
    assert p.empty and "not retrying" in p.drift[0].reason
    assert "No actions, but 1 model(s) do not run as specified yet" in render_text(p)


def test_backend_auto_choices() -> None:
    gguf, hf_gpu, hf_cpu = ModelSpec(path="a.gguf"), ModelSpec(hf_id="org/m", gpu_index=0), ModelSpec(hf_id="org/m")
    assert choose_backend(gguf, (H100,))[0] == "llama-server"
    assert choose_backend(hf_gpu, (H100,)) == ("vllm", "an HF model placed on a nvidia GPU is served by vLLM")
    assert choose_backend(hf_gpu, ())[0] == "transformers"
    assert choose_backend(hf_cpu, (H100,))[0] == "transformers"


def test_missing_gpu_is_a_plan_error_naming_the_gpus_that_exist() -> None:
    spec = spec_of(SPEC.replace("    desired: unloaded\n", "").replace("gpu_index: 0", "gpu_index: 3"))
    p = plan(spec, Observed(gpus=(H100,), detector="pynvml"))
    assert p.errors == ("models.big.gpu_index: GPU 3 does not exist; GPUs on this host: 0 (NVIDIA H100 80GB HBM3)",)
    assert "Plan refused (1 error): nothing will be changed." in render_text(p)


def test_cpu_only_host_names_the_detector() -> None:
    spec = spec_of(SPEC.replace("    desired: unloaded\n", ""))
    assert plan(spec, Observed()).errors == (
        "models.big.gpu_index: GPU 0 does not exist; GPUs on this host: none (detector: cpu)",
    )


def test_memory_that_does_not_fit_is_refused_with_the_shortfall() -> None:
    spec = spec_of(SPEC.replace("    desired: unloaded\n", ""))
    p = plan(spec, Observed(gpus=(H100,), detector="pynvml", estimates={"big": {"gpu0": 90 * 2**30}}))
    assert p.errors == (
        "GPU 0 (NVIDIA H100 80GB HBM3): the models placed on it need 90.00 GiB but 79.00 GiB is available "
        "(big 90.00 GiB); short by 11.00 GiB",
    )


def test_too_few_ports_is_a_plan_error() -> None:
    spec = spec_of("server:\n  port_range: [9000, 9000]\n" + SPEC)
    assert plan(spec, Observed()).errors == (
        "server.port_range: 2 models need a port but 9000-9000 has 1; widen the range",
    )


VLLM = """
models:
  base:
    hf_id: org/llama
    backend: vllm
    gpu_index: 0
    lora:
      - {name: sql, path: /l/sql}
      - {name: chat, path: /l/chat}
"""


def test_vllm_adapter_changes_need_no_restart() -> None:
    before = spec_of(VLLM)
    after = spec_of(VLLM.replace("      - {name: chat, path: /l/chat}", "      - {name: law, path: /l/law}"))
    observed = Observed({"base": ObservedModel(before.models["base"], "vllm", ModelState.LOADED)}, "base", (H100,))
    p = plan(after, observed)
    assert [(a.kind, a.adapter.name if a.adapter else "") for a in p.actions] == [
        ("remove_adapter", "chat"), ("add_adapter", "law")]
    text = render_text(p)
    assert "  - adapter base/chat (/l/chat): removed from the spec" in text
    assert "  + adapter base/law (/l/law): added to the spec" in text
    assert "Plan: 2 adapter changes." in text


def test_adapter_changes_restart_where_the_backend_cannot_do_them_live() -> None:
    vllm_plain = spec_of(VLLM.split("    lora:")[0])
    observed = Observed({"base": ObservedModel(vllm_plain.models["base"], "vllm", ModelState.LOADED)}, "base")
    assert kinds(plan(spec_of(VLLM), observed)) == [("reload", "base")]  # --enable-lora needs a start
    gguf = spec_of("models:\n  g:\n    path: /g.gguf\n")
    with_lora = spec_of("models:\n  g:\n    path: /g.gguf\n    lora: [{name: a, path: /a.gguf}]\n")
    observed = Observed({"g": ObservedModel(gguf.models["g"], "llama-server", ModelState.LOADED)}, "g")
    assert kinds(plan(with_lora, observed)) == [("reload", "g")]


# ---------------------------------------------------------------- golden renderings


def golden_plan() -> Plan:
    spec = spec_of()
    stale = ObservedModel(ModelSpec(path="/m/old.gguf"), "llama-server", ModelState.LOADED)
    observed = Observed({"chat": ObservedModel(spec.models["chat"].model_copy(update={"n_ctx": 2048}),
                                               "llama-server", ModelState.LOADED), "old": stale}, "old")
    return plan(spec, observed)


@pytest.mark.parametrize(("name", "render"), [("plan.txt", render_text), ("plan.json", render_json)])
def test_golden_renderings(name: str, render: object) -> None:
    text = render(golden_plan())  # type: ignore[operator]
    path = GOLDEN / name
    if os.environ.get("XGEN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_plan_json_matches_its_published_schema() -> None:
    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    jsonschema.validate(json.loads(render_json(golden_plan())), schema)
    jsonschema.validate(json.loads(render_json(plan(spec_of(), Observed()))), schema)


# ---------------------------------------------------------------- properties

names = st.sampled_from(["a", "b", "c", "d"])
model_specs = st.builds(
    lambda ctx, ngl, aliases, desired, emb: ModelSpec(path="/m/x.gguf", n_ctx=ctx, n_gpu_layers=ngl,
                                                      aliases=aliases, desired=desired,
                                                      server_type="embedding" if emb else "llm"),
    st.sampled_from([512, 1024, 4096]), st.sampled_from([-1, 0, 8]),
    st.lists(st.sampled_from(["x1", "x2"]), max_size=1, unique=True),
    st.sampled_from(["loaded", "unloaded"]), st.booleans(),
)
specs = st.dictionaries(names, model_specs, max_size=4).map(lambda ms: Spec(models=ms))
observeds = st.builds(
    lambda ms, states: Observed({n: ObservedModel(m, "llama-server", states) for n, m in ms.items()}),
    st.dictionaries(names, model_specs, max_size=4), st.sampled_from([ModelState.LOADED, ModelState.ERROR]),
)


def apply(p: Plan, observed: Observed) -> Observed:
    """What a successful execution of `p` leaves behind (the executor's contract)."""
    models = dict(observed.models)
    active = observed.active
    for a in p.actions:
        if a.kind == "unload":
            del models[a.model]
        elif a.kind in ("load", "reload", "add_adapter", "remove_adapter", "update"):
            assert a.spec is not None
            models[a.model] = ObservedModel(a.spec, a.backend, ModelState.LOADED)
        else:
            active = a.model or None
    return Observed(models, active)


@settings(max_examples=300, deadline=None)
@given(specs, observeds)
def test_plan_is_deterministic(spec: Spec, observed: Observed) -> None:
    assert render_json(plan(spec, observed)) == render_json(plan(spec, observed))


@settings(max_examples=300, deadline=None)
@given(specs, observeds)
def test_applying_a_plan_converges(spec: Spec, observed: Observed) -> None:
    after = apply(plan(spec, observed), observed)
    assert plan(spec, after).matches


GPU_SPEC = "models:\n  big:\n    path: /m/big.gguf\n    gpu_index: 0\n    n_gpu_layers: -1\n"


@pytest.mark.parametrize(
    ("text", "state", "estimate", "used", "expected"),
    [
        (SPEC, ModelState.LOADED, None, 0,
         ("recreate", "recreate: two processes of 2 thread(s) each would oversubscribe 2 CPU core(s)")),
        (SPEC.replace("n_ctx: 4096", "n_ctx: 4096\n    llama: {threads: 1}"), ModelState.LOADED, None, 0,
         ("surge", "surge")),
        (SPEC.replace("n_ctx: 4096", "n_ctx: 4096\n    replace: recreate"), ModelState.LOADED, None, 0,
         ("recreate", "recreate: replace: recreate")),
        (SPEC, ModelState.ERROR, None, 0, ("recreate", "recreate: nothing serves now (ERROR)")),
        (SPEC.replace("n_ctx: 4096", "n_ctx: 4096\n    port: 9100"), ModelState.LOADED, None, 0,
         ("recreate", "recreate: a fixed port cannot serve two processes")),
        (GPU_SPEC, ModelState.LOADED, None, 0, ("recreate", "recreate: no memory estimate to prove that both fit")),
        (GPU_SPEC, ModelState.LOADED, 30 * 2**30, 0, ("surge", "surge")),  # 30 + 30 GiB fit in 80
        (GPU_SPEC, ModelState.LOADED, 50 * 2**30, 0,
         ("recreate", "recreate: needs 50.00 GiB more on GPU 0, 29.00 GiB free")),  # 1 GiB reserve
    ],
    ids=["cpu-too-few-cores", "cpu-one-thread-each", "forced-recreate", "not-serving", "fixed-port",
         "gpu-no-estimate", "gpu-fits", "gpu-short"],
)
def test_replace_strategy(text: str, state: ModelState, estimate: int | None, used: int,
                          expected: tuple[str, str]) -> None:
    spec = spec_of(text)
    name = next(iter(spec.loaded))
    want = spec.models[name]
    have = ObservedModel(want.model_copy(update={"n_ctx": 1024}), "llama-server", state)
    gpu = GpuInfo(0, "H100", "nvidia", 80 * 2**30, memory_used=(estimate or 0) + used)
    observed = Observed({name: have}, name, (gpu,), "pynvml", {name: {"gpu0": estimate}} if estimate else {}, None, 2)
    [reload] = [a for a in plan(spec, observed).actions if a.kind == "reload"]
    assert (reload.strategy, reload.reason) == (expected[0], f"replace ({expected[1]})")


def test_a_failed_update_waits_for_its_backoff_then_retries() -> None:
    spec = spec_of()
    old = spec.models["chat"].model_copy(update={"n_ctx": 1024})
    failed = ObservedModel(old, "llama-server", ModelState.LOADED, failed_target=spec.models["chat"],
                           update_retry_due=False, update_error="update failed: exited with code 1")
    p = plan(spec, Observed({**running(spec).models, "chat": failed}, "chat"))
    assert p.empty and p.drift == (
        Drift("chat", "LOADED", "update failed: exited with code 1; serving the previous version; retry after the "
              "backoff"),
    )
    due = ObservedModel(old, "llama-server", ModelState.LOADED, failed_target=spec.models["chat"],
                        update_retry_due=True, update_error="update failed: exited with code 1")
    [reload] = plan(spec, Observed({**running(spec).models, "chat": due}, "chat")).actions
    assert reload.reason.startswith("replace (recreate: ") and reload.reason.endswith(
        "; retry after: update failed: exited with code 1")
    newer = spec_of(SPEC.replace("n_ctx: 4096", "n_ctx: 8192"))  # a later save is tried at once
    assert kinds(plan(newer, Observed({**running(spec).models, "chat": failed}, "chat"))) == [("reload", "chat")]


def test_a_long_list_change_shows_its_edits_not_both_lists() -> None:
    """A command line of a dozen arguments where one changed: the plan shows that one, with the
    argument before it; a short list (aliases) is still shown whole."""
    argv = ["/opt/srv", "--host", "{host}", "--port", "{port}", "-m", "{path}", "-c", "600", "-t", "1"]
    assert str(Change("command.argv", argv, [*argv[:8], "700", *argv[9:]])) == "command.argv: 600 → 700 after -c"
    assert str(Change("extra_args", argv, [*argv, "--verbose"])) == "extra_args: + --verbose after 1"
    assert str(Change("extra_args", argv, argv[1:])) == "extra_args: - /opt/srv at the start"
    assert str(Change("aliases", ["a"], ["a", "b"])) == 'aliases: ["a"] → ["a", "b"]'

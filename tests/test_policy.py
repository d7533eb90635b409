"""Request policy, pure parts: parameter rules, variants, routing names, spec checks, in-place
plan changes, and the concurrency gate's queue (asyncio, no processes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reconciler.plan import in_place_changes, restart_changes
from reconciler.policy import apply_params
from reconciler.spec import ModelSpec, ParamRules, SpecError, parse
from reconciler.web.gate import Gate
from reconciler.web.proxy import routable_names, route


def rules(**kw: Any) -> ParamRules:
    return ParamRules(**kw)


def test_strip_then_default_then_set_then_the_variant() -> None:
    payload: dict[str, Any] = {"model": "m", "temperature": 1.0, "seed": 5, "extra": {"a": 1, "b": 2}}
    changed = apply_params(
        payload,
        rules(strip=["seed", "extra.b"], default={"top_k": 7, "temperature": 0.1}, set={"top_p": 0.9}),
        {"temperature": 0.3},
    )
    assert changed
    assert payload == {"model": "m", "temperature": 0.3, "extra": {"a": 1}, "top_k": 7, "top_p": 0.9}


def test_objects_meet_key_by_key_and_the_spec_is_never_shared() -> None:
    rule = rules(set={"chat_template_kwargs": {"enable_thinking": False}}, default={"stop": ["\n"]})
    payload: dict[str, Any] = {"chat_template_kwargs": {"custom": 1}}
    assert apply_params(payload, rule)
    assert payload["chat_template_kwargs"] == {"custom": 1, "enable_thinking": False}
    payload["stop"].append("x")  # the request's copy, not the rule's
    assert rule.default == {"stop": ["\n"]}


def test_model_is_never_touched_and_no_rules_change_nothing() -> None:
    payload: dict[str, Any] = {"model": "m", "temperature": 0.5}
    assert not apply_params(payload, rules())
    assert not apply_params(payload, rules(default={"temperature": 0.1}))  # the client sent one
    assert not apply_params(payload, rules(set={"temperature": 0.5}))  # already that value
    assert payload == {"model": "m", "temperature": 0.5}


SPEC = """\
models:
  qwen:
    path: {model}
    aliases: [q]
    params: {{set: {{temperature: 0.2}}}}
    variants: {{high: {{reasoning_effort: high}}, creative: {{temperature: 1.1}}}}
active: qwen
"""


def test_variants_route_by_name_and_alias_and_are_listed(tiny_gguf: Any) -> None:
    spec = parse(SPEC.format(model=tiny_gguf))
    assert route(spec, "qwen:high", "chat/completions", None, {}).variant == "high"  # type: ignore[union-attr]
    decision = route(spec, "q:creative", "chat/completions", None, {})
    assert (decision.model, decision.upstream_model, decision.variant) == ("qwen", "qwen", "creative")  # type: ignore[union-attr]
    assert isinstance(route(spec, "qwen:nope", "chat/completions", None, {}), str)  # unknown: 404 with the names
    assert routable_names("qwen", spec.models["qwen"]) == ["qwen", "q", "qwen:high", "q:high", "qwen:creative",
                                                           "q:creative"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("params: {set: {model: x}}", "params.set.model: `model` is routed by xgen"),
        ("params: {strip: [model]}", "params.strip.0: `model` (or an empty name) cannot be stripped"),
        ("variants: {'a b': {top_k: 1}}", "variants.a b: found 'a b': a variant name is letters, digits"),
        ("variants: {x: {model: y}}", "variants.x.model: `model` is routed by xgen"),
        ("url: http://h/v1", "url: 'url' is for models served elsewhere"),
        ("backend: remote, url: http://h/v1", "path: a remote model has no local weights"),
    ],
)
def test_policy_mistakes_are_reported_with_their_place(tiny_gguf: Any, model: str, expected: str) -> None:
    text = f"models:\n  m: {{path: {tiny_gguf}, {model}}}\n"
    with pytest.raises(SpecError) as caught:
        parse(text)
    assert any(expected in str(p) for p in caught.value.problems), caught.value.problems


def test_remote_models_need_a_url_and_their_key_variable(tiny_gguf: Any) -> None:
    with pytest.raises(SpecError) as caught:
        parse("models:\n  far: {backend: remote}\n")
    assert "needs `url`" in str(caught.value.problems[0])
    with pytest.raises(SpecError) as caught:
        parse("models:\n  far: {backend: remote, url: http://h/v1, api_key_env: NOPE}\n", env={})
    assert "environment variable NOPE is not set" in str(caught.value.problems[0])
    with pytest.raises(SpecError) as caught:
        parse("models:\n  far: {backend: remote, url: http://h/v1, desired: on_demand}\n")
    assert "use desired: loaded" in str(caught.value.problems[0])
    spec = parse("models:\n  far: {backend: remote, url: http://h/v1, api_key_env: K, remote_model: gpt}\n",
                 env={"K": "secret"})
    assert route(spec, "far", "chat/completions", None, {}).upstream_model == "gpt"  # type: ignore[union-attr]
    assert "secret" not in spec.model_dump_json()  # only the variable's name is in the spec


def test_a_variant_that_shadows_a_name_is_refused(tiny_gguf: Any) -> None:
    text = f"models:\n  m: {{path: {tiny_gguf}, variants: {{x: {{}}}}}}\n  'm:x': {{path: {tiny_gguf}}}\n"
    with pytest.raises(SpecError) as caught:
        parse(text)
    assert any("'m:x' is already a model" in str(p) for p in caught.value.problems)


def test_policy_changes_apply_in_place() -> None:
    have = ModelSpec(path="/m.gguf")
    want = have.model_copy(update={"max_concurrent": 2, "params": ParamRules(set={"top_k": 3}),
                                   "variants": {"hi": {"temperature": 1.0}}, "queue_timeout_s": 5.0})
    assert restart_changes(want, have) == ()
    assert {c.field.split(".")[0] for c in in_place_changes(want, have)} == {
        "max_concurrent", "params", "variants", "queue_timeout_s"}


# ---------------------------------------------------------------- the gate


def test_the_gate_admits_in_arrival_order_and_refuses_past_the_queue() -> None:
    async def main() -> None:
        gate = Gate("m")
        assert await gate.enter(1, 2, 5) is None  # runs
        order: list[int] = []

        async def wait(i: int) -> None:
            assert await gate.enter(1, 2, 5) is None
            order.append(i)

        waiters = [asyncio.create_task(wait(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        full = await gate.enter(1, 2, 5)
        assert full is not None and "max_queue 2" in full and "1 request(s) running" in full
        gate.leave()
        await asyncio.sleep(0.01)
        gate.leave()
        await asyncio.gather(*waiters)
        assert order == [0, 1] and gate.running == 1

    asyncio.run(main())


def test_the_gate_times_out_and_lets_a_gone_client_leave_at_once() -> None:
    async def main() -> None:
        gate = Gate("m")
        assert await gate.enter(1, 5, 5) is None
        late = await gate.enter(1, 5, 0.05)
        assert late is not None and "queue_timeout_s" in late
        gone = asyncio.Event()
        leaving = asyncio.create_task(gate.enter(1, 5, 30, gone.wait))
        await asyncio.sleep(0.01)
        assert len(gate.waiting) == 1
        gone.set()
        assert "went away" in (await asyncio.wait_for(leaving, 1) or "")
        assert not gate.waiting
        cancelled = asyncio.create_task(gate.enter(1, 5, 30))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert not gate.waiting
        gate.leave()
        assert gate.running == 0  # nobody left holding a turn

    asyncio.run(main())


def test_a_raised_limit_lets_waiting_requests_in() -> None:
    async def main() -> None:
        gate = Gate("m")
        assert await gate.enter(1, 5, 5) is None
        waiting = asyncio.create_task(gate.enter(1, 5, 5))
        await asyncio.sleep(0.01)
        assert await gate.enter(3, 5, 5) is None  # the spec now allows 3: both go
        assert await asyncio.wait_for(waiting, 1) is None
        assert gate.running == 3

    asyncio.run(main())


def test_only_a_model_without_rules_takes_requests_as_sent(tiny_gguf: Any) -> None:
    """`as_sent`: the proxy's fast path sends the client's bytes unchanged only where no rule,
    adapter or remote name would change them (route() and _rewrite() decide the rest)."""
    plain = ModelSpec(path=str(tiny_gguf))
    assert plain.as_sent
    assert not plain.model_copy(update={"params": ParamRules(set={"temperature": 0.2})}).as_sent
    assert not ModelSpec(path=str(tiny_gguf), lora=[{"name": "tilt", "path": str(tiny_gguf)}]).as_sent
    spec = parse("models:\n  far: {backend: remote, url: http://h/v1, remote_model: gpt}\n")
    assert not spec.models["far"].as_sent

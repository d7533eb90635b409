"""The proxy's cheap `model` lookup: whatever the body, it agrees with a full JSON parse, and a
rewritten body differs from the client's only in `model`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.web.jsonbody import SCAN_LIMIT, JsonBody, scan_model

TRICKY = st.sampled_from(['"model"', '"model": "x"', "{", "}", "[", "]", "\\", '\\"', "model", "é", "\n", ":", ","])
TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=5)), max_size=6).map("".join)
KEYS = st.one_of(st.just("model"), TEXT)
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)
BODIES = st.tuples(st.dictionaries(KEYS, VALUES, max_size=5), st.one_of(st.none(), TEXT, LEAVES))
FORMATS = st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2}, {"ensure_ascii": False}])


def body_of(top: dict[str, Any], model: Any, style: dict[str, Any], pad: bool) -> tuple[dict[str, Any], bytes]:
    obj = dict(top)
    obj.pop("model", None)
    if pad:  # past SCAN_LIMIT: the scan's turn
        obj["pad"] = "x" * SCAN_LIMIT
    if model is not None:
        obj = {**obj, "model": model} if len(obj) % 2 else {"model": model, **obj}  # first or last
    return obj, json.dumps(obj, **style).encode()


@settings(max_examples=400, deadline=None)
@given(BODIES, FORMATS, st.booleans())
def test_the_lookup_agrees_with_the_parser_and_a_rewrite_changes_only_model(
    case: Any, style: dict[str, Any], pad: bool
) -> None:
    obj, raw = body_of(*case, style, pad)
    found = scan_model(raw)
    if found is not None:  # sure when it answers, and its span is the name's JSON string
        start, end = found[1]
        assert found[0] == obj.get("model") == json.loads(raw[start:end])
    doc = JsonBody(raw)
    assert doc.model == obj.get("model")
    if isinstance(doc.model, str) or doc.model is None:
        assert json.loads(doc.encode("routed")) == {**obj, "model": "routed"}
        assert doc.encode(doc.model) == raw  # nothing to change: the client's own bytes


def test_only_the_top_level_counts_and_unusual_names_are_parsed() -> None:
    nested = b'{"tools": [{"parameters": {"properties": {"model": {"type": "string"}}}}]}'
    assert scan_model(nested) is None and JsonBody(nested).model is None
    assert scan_model(b'{"tools": {"model": "inner"}, "model": "outer"}')[0] == "outer"  # type: ignore[index]
    assert scan_model(b'{"model": "q\\u0077en"}') is None  # an escape: the parser reads it
    assert JsonBody(b'{"model": "q\\u0077en"}').model == "qwen"
    assert scan_model(b"[1, 2]") is None
    # a key that ends in an escaped quote and `model` is one string, not the key `model`
    assert scan_model(b'{"x\\"model": "evil", "model": "good"}') == ("good", (30, 36))
    assert scan_model(b'{"\\"model\\"model": ""}') is None


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'"text"', b"{broken"])
def test_what_is_not_an_object_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        JsonBody(raw)


def test_a_200_kb_prompt_is_not_parsed_to_route_it() -> None:
    prompt = "word " * 40_000
    messages = [{"role": "user", "content": prompt}]
    raw = json.dumps({"model": "alias", "messages": messages}).encode()
    doc = JsonBody(raw)  # `model` first: the scan finds it
    assert doc.model == "alias" and doc._payload is None and doc._top is None
    assert doc.encode("real") == raw.replace(b'"model": "alias"', b'"model": "real"')
    raw = json.dumps({"messages": messages, "model": "alias"}).encode()
    doc = JsonBody(raw)  # after the prompt (as the OpenAI SDK sends it): the top level is read, not the prompt
    assert doc.model == "alias" and doc._payload is None and doc._top is None
    routed = doc.encode("real")
    assert json.loads(routed) == {"messages": messages, "model": "real"} and doc._payload is None
    assert json.dumps(messages).encode() in routed  # the prompt's own bytes, not encoded again


def test_past_the_scan_limit_the_top_level_decides() -> None:
    nested = {"tools": [{"model": "inner", "pad": "x" * 5000}], "model": "outer"}
    assert scan_model(json.dumps(nested).encode()) is None
    assert JsonBody(json.dumps(nested).encode()).model == "outer"
    assert JsonBody(json.dumps({"pad": "x" * 5000}).encode()).model is None

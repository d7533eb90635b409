"""A model's parameter rules and variants applied to a request body. Pure: a dict in, changed
in place, and whether anything changed (an unchanged body is forwarded as the client's bytes).

Order: `strip` removes, `default` fills what is missing, `set` overrides, then the variant's
values override (a variant is a named `set`). An object value meets an object the client sent
key by key, so `set: {chat_template_kwargs: {enable_thinking: false}}` keeps the client's other
template arguments. `model` is never touched: routing owns it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.spec import ParamRules


def apply_params(payload: dict[str, Any], rules: ParamRules, variant: Mapping[str, Any] | None = None) -> bool:
    """Apply `rules`, then `variant`, to `payload`; True when it changed."""
    before = _snapshot(payload) if (not rules.empty or variant) else None
    if before is None:
        return False
    for dotted in rules.strip:
        _strip(payload, dotted.split("."))
    _fill(payload, rules.default)
    _override(payload, rules.set)
    if variant:
        _override(payload, variant)
    return _snapshot(payload) != before


def _snapshot(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy deep enough to compare: the rules only replace values, never edit them in place,
    except objects, which are copied here."""
    return {k: _snapshot(v) if isinstance(v, dict) else v for k, v in payload.items()}


def _strip(target: dict[str, Any], path: list[str]) -> None:
    head, *rest = path
    if not rest:
        target.pop(head, None)
    elif isinstance(inner := target.get(head), dict):
        _strip(inner, rest)


def _fill(target: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if key == "model":
            continue
        if key not in target:
            target[key] = _copy(value)
        elif isinstance(value, Mapping) and isinstance(target[key], dict):
            target[key] = dict(target[key])
            _fill(target[key], value)


def _override(target: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if key == "model":
            continue
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            target[key] = dict(target[key])
            _override(target[key], value)
        else:
            target[key] = _copy(value)


def _copy(value: Any) -> Any:
    """The spec's own objects are never handed to a request (a later rule would edit them)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value

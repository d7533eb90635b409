"""A JSON request body routed without parsing all of it.

Routing needs one field, the top-level `model`; a chat request is mostly its prompt (a 200 KB
prompt took 215 µs to parse, then as long again to re-encode when `model` was rewritten). A
scan finds the field: string tokens (however long) are skipped by one regex step each, so it
costs about one step per bracket, key and value, not per byte. `"model"` cannot occur inside a
JSON string (a quote there is escaped), so a match is a real key or value; the scan counts
brackets to keep only the top level. Anything unusual (escapes in the name, a non-string value,
no `model` at all, not an object) falls back to the full parse, which reports a malformed body;
a body the scan routes is not otherwise checked: its backend says what else is wrong with it,
as it would to a client that called it directly.

A rewrite of `model` splices the new name into the original bytes; the body is parsed only
when a rule must read or change other fields (parameter rules, variants, LoRA selection).
"""

from __future__ import annotations

import json
import re
from typing import Any

_OPEN = re.compile(rb"\s*\{")
_KEY = re.compile(rb'"model"\s*:\s*')
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SIMPLE_STRING = re.compile(rb'"([^"\\]*)"')


class NotAnObject(ValueError):
    pass


def scan_model(body: bytes) -> tuple[str | None, tuple[int, int] | None] | None:
    """(the top-level `model`, the span of its JSON string) — (None, None) when the object has
    none — or None when the scan cannot be sure and the body must be parsed."""
    if _OPEN.match(body) is None:
        return None
    depth, at = 0, 0
    for key in _KEY.finditer(body):
        for token in _TOKEN.finditer(body, at, key.start()):
            first = token.group()[:1]
            depth += 1 if first in b"{[" else -1 if first in b"}]" else 0
        at = key.end()  # the key and its colon; its value is scanned with what follows
        if depth == 1:
            value = _SIMPLE_STRING.match(body, key.end())
            if value is None:
                return None  # null, a number, escapes: the parser decides
            try:
                return value.group(1).decode("utf-8", "strict"), value.span()
            except UnicodeDecodeError:
                return None  # not UTF-8: the parser says so
    return None, None


class JsonBody:
    """The request's bytes, the `model` found in them, and the parsed object once needed."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._payload: dict[str, Any] | None = None
        self._span: tuple[int, int] | None = None
        found = scan_model(raw)
        if found is None or found[0] is None:  # unsure, or no `model`: the parser decides (and validates)
            self.model = self._parse().get("model")
        else:
            self.model, self._span = found

    def payload(self) -> dict[str, Any]:
        """The parsed object (parsed now if it was not)."""
        return self._payload if self._payload is not None else self._parse()

    def _parse(self) -> dict[str, Any]:
        payload = json.loads(self.raw)
        if not isinstance(payload, dict):
            raise NotAnObject("not an object")
        self._payload = payload
        return payload

    def encode(self, model: str | None, changed: bool = False) -> bytes:
        """The body to send with `model` set to this (None: as it is): the parsed object
        re-encoded when rules `changed` it (or when the scan did not find `model`), else the
        original bytes with only the name spliced in."""
        if changed:
            payload = self.payload()
            if model is not None:
                payload["model"] = model
            return json.dumps(payload).encode()
        if model is None or model == self.model:
            return self.raw
        name = json.dumps(model).encode()
        if self._span is None:
            return self.encode(model, changed=True)  # the parser found it (or its absence): re-encode
        start, end = self._span
        return self.raw[:start] + name + self.raw[end:]

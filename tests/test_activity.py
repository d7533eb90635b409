"""The page's activity series: bounded ring buckets per model, read oldest first."""

from __future__ import annotations

import jsonschema

from reconciler.web.activity import BUCKET_S, BUCKETS, Activity

SCHEMA = {
    "type": "object",
    "required": ["bucket_s", "until", "models"],
    "properties": {
        "bucket_s": {"type": "integer"},
        "until": {"type": "integer"},
        "models": {"type": "object", "additionalProperties": {
            "type": "object",
            "required": ["requests_per_s", "tokens_per_s", "p50_ms"],
            "properties": {
                "requests_per_s": {"type": "array", "items": {"type": "number"}, "minItems": BUCKETS,
                                   "maxItems": BUCKETS},
                "tokens_per_s": {"type": "array", "items": {"type": "number"}, "minItems": BUCKETS,
                                 "maxItems": BUCKETS},
                "p50_ms": {"type": "array", "items": {"type": ["number", "null"]}, "minItems": BUCKETS,
                           "maxItems": BUCKETS},
            },
        }},
    },
}


def test_requests_tokens_and_median_land_in_their_bucket() -> None:
    a = Activity()
    now = 1_000_000.0
    for seconds, tokens in ((0.02, 20), (0.02, 0), (0.3, 30)):  # two fast, one slow: the median is a fast one
        a.request("m", seconds, tokens, now)
    a.request("m", 1.0, 0, now - BUCKET_S)  # the bucket before
    shown = a.to_json(now)
    jsonschema.validate(shown, SCHEMA)
    series = shown["models"]["m"]
    assert series["requests_per_s"][-1] == 3 / BUCKET_S and series["tokens_per_s"][-1] == 50 / BUCKET_S
    assert series["p50_ms"][-1] == 25.0  # the 10–25 ms bin's upper edge
    assert series["requests_per_s"][-2] == 1 / BUCKET_S and series["p50_ms"][-2] == 1000.0
    assert series["p50_ms"][0] is None  # nothing then


def test_old_buckets_are_reused_and_forgotten_models_dropped() -> None:
    a = Activity()
    a.request("m", 0.1, 0, 0.0)
    later = BUCKETS * BUCKET_S + 1.0  # the same ring slot, ten minutes on
    a.request("m", 0.1, 0, later)
    assert sum(a.to_json(later)["models"]["m"]["requests_per_s"]) == 1 / BUCKET_S  # the old count is gone
    a.request("gone", 0.1, 0, later)
    a.forget({"m"})
    assert set(a.to_json(later)["models"]) == {"m"}
    assert len(a.models["m"]) == BUCKETS  # bounded, however long it runs

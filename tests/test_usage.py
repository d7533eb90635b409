"""Token counts read from backends' answers (pure: bytes in, counts out)."""

from __future__ import annotations

import json

from reconciler.web import metrics


def _total(model: str, kind: str) -> float:
    return metrics.STATS.tokens.get((model, kind), 0)


def test_openai_usage_is_read_without_parsing_the_answer() -> None:
    body = json.dumps({"choices": [{"message": {"content": 'say "usage": {"completion_tokens": 999}'}}],
                      "usage": {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27,
                                "prompt_tokens_details": {"cached_tokens": 3}}}).encode()
    assert metrics.count_tokens("u1", body) == 20
    assert (_total("u1", "prompt"), _total("u1", "completion")) == (7, 20)


def test_anthropic_and_responses_names_and_spacing() -> None:
    body = b'{"type":"message","usage" : {"input_tokens" : 11, "output_tokens":\n 4}}'
    assert metrics.count_tokens("u2", body) == 4
    assert (_total("u2", "prompt"), _total("u2", "completion")) == (11, 4)


def test_no_usage_counts_nothing() -> None:
    assert metrics.count_tokens("u3", b'{"data": [{"embedding": [0.1]}]}') == 0
    assert metrics.count_tokens("u3", b"not json at all") == 0
    assert metrics.count_tokens("u3", b'{"usage": null}') == 0

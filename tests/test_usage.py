"""Token counts read from backends' answers (pure: bytes in, counts out)."""

from __future__ import annotations

import json

from reconciler.web import metrics


def _total(model: str, kind: str) -> float:
    return metrics.STATS.tokens.get((model, kind), 0)


def test_openai_usage_counts_and_a_usage_in_the_text_does_not() -> None:
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
    assert metrics.count_tokens("u3", b'{"usage": "ten"}') == 0
    assert metrics.count_tokens("u3", b'{"usage": {"completion_tokens": "ten"}}') == 0
    assert _total("u3", "prompt") == _total("u3", "completion") == 0


def test_a_stream_counts_the_usage_of_its_last_event() -> None:
    last = b'data: {"choices": []}\n\ndata: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}\n\n'
    assert metrics.count_stream_tokens("u4", last + b"data: [DONE]\n\n") == 9
    assert (_total("u4", "prompt"), _total("u4", "completion")) == (3, 9)

"""The APIs clients speak besides chat, through xgen to a real llama-server, with the official
SDKs: Anthropic Messages (plain, streamed, count_tokens, x-api-key, its error shape), OpenAI
Responses (plain and streamed), llama.cpp's own endpoints, and a clear error for an endpoint the
backend lacks."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from conftest import Daemon
from tinygguf import write_tiny_llama

pytestmark = pytest.mark.integration
KEY = "sk-local-test"
SPEC = """\
server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], api_key: sk-local-test}}
models:
  smollm2:
    path: {MODEL}
    n_ctx: 2048
    aliases: [local-coder]
  ranker:
    path: {RERANKER}
    server_type: rerank
    n_ctx: 512
active: smollm2
"""


@pytest.fixture(scope="module")
def api_daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path, tiny_gguf: Path,
               llama_server: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("apis"), default_model, tiny_gguf)
    d.vars["RERANKER"] = str(write_tiny_llama(d.dir / "reranker.gguf", reranker=True))
    d.http.headers["authorization"] = f"Bearer {KEY}"
    d.launch(SPEC, header=False)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def claude(api_daemon: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api_daemon.url, api_key=KEY, max_retries=0)


def test_anthropic_messages(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model="local-coder", max_tokens=8, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": "Say hi"}])
    assert reply.type == "message" and reply.content[0].type == "text" and reply.content[0].text
    # the model may end its answer before the limit (it did once in a full run): the stop
    # reason must say which happened
    tokens = reply.usage.output_tokens
    assert 0 < tokens <= 8 and reply.stop_reason == ("max_tokens" if tokens == 8 else "end_turn"), reply


def test_anthropic_messages_stream_in_order(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="smollm2", max_tokens=8,
                                messages=[{"role": "user", "content": "Count"}]) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    # llama-server itself leaves out message_start in about 1 stream in 6 (measured against it
    # directly, without xgen): where it is there it is first; the rest is in order either way
    body = kinds[1:] if kinds[0] == "message_start" else kinds
    assert body[0] == "content_block_start" and body[-2:] == ["message_delta", "message_stop"], kinds
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text


def test_anthropic_count_tokens(claude: anthropic.Anthropic) -> None:
    count = claude.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": "hello there"}])
    assert count.input_tokens > 0


def test_anthropic_errors_are_in_anthropic_shape(api_daemon: Daemon) -> None:
    wrong = anthropic.Anthropic(base_url=api_daemon.url, api_key="not-the-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body == {"type": "error", "error": {"type": "authentication_error",
                                 "message": "missing or wrong API key: send `Authorization: Bearer <key>` "
                                            "(or `x-api-key: <key>`)"}}
    right = anthropic.Anthropic(base_url=api_daemon.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        right.messages.create(model="claude-opus-9", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert isinstance(unknown.value.body, dict) and unknown.value.body["error"]["type"] == "not_found_error"


def test_openai_responses_plain_and_streamed(api_daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{api_daemon.url}/v1", api_key=KEY, max_retries=0)
    reply = client.responses.create(model="smollm2", input="Say hi", max_output_tokens=8)
    assert reply.object == "response" and reply.output_text
    events = [e.type for e in client.responses.create(model="smollm2", input="Count", max_output_tokens=8,
                                                      stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events


def test_native_endpoints_and_one_the_backend_lacks(api_daemon: Daemon) -> None:
    tokens = api_daemon.http.post("/tokenize", json={"content": "hello"})  # no model: the active one
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    rerank = api_daemon.http.post("/v1/rerank", json={"model": "smollm2", "query": "a", "documents": ["b"]})
    assert rerank.status_code == 501
    error = rerank.json()["error"]
    assert error["code"] == "endpoint_not_supported"
    assert error["message"].startswith("the llama-server backend of 'smollm2' does not serve /v1/rerank")


def test_rerank_with_a_rerank_model(api_daemon: Daemon) -> None:
    """server_type: rerank (llama-server --reranking) with a reranker the test builds; a request
    naming no model goes to the one rerank model, on every rerank path."""
    documents = ["w1 w2", "w3", "w4 w5 w6"]
    for path in ("/v1/rerank", "/v1/reranking", "/rerank"):
        body = {"query": "w1", "documents": documents, **({"model": "ranker"} if path == "/rerank" else {})}
        answer = api_daemon.http.post(path, json=body)
        assert answer.status_code == 200, (path, answer.text)
        results = answer.json()["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        assert all(isinstance(r["relevance_score"], float) for r in results)
    chat = api_daemon.http.post("/v1/chat/completions", json={"model": "ranker", "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "wrong_model_type"  # it would answer noise


def test_audio_uploads_are_routed_by_their_form_field(api_daemon: Daemon) -> None:
    """A multipart upload goes to the model its `model` field names, before or after an 8 MB
    file (spooled, then streamed); these models take no audio, which the answer says."""
    client = openai.OpenAI(base_url=f"{api_daemon.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="local-coder", file=("a.wav", b"RIFF" + bytes(1000)))
    assert "the llama-server backend of 'smollm2' does not serve /v1/audio/transcriptions" in str(caught.value)
    boundary = "xgen-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
            + bytes(8 * 2**20) + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            "ranker\r\n".encode() + f"--{boundary}--\r\n".encode())
    answer = api_daemon.http.post("/v1/audio/translations", content=body,
                                  headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    # llama-server answers and closes before it reads 8 MB: routed to ranker, and said so
    message = answer.json()["error"]["message"]
    assert answer.status_code in (404, 501, 502), answer.text
    assert "backend of 'ranker'" in message and "/v1/audio/translations" in message, message
    assert api_daemon.http.get("/health").status_code == 200  # the daemon took no harm (it died of SIGPIPE before)


def test_upstream_passthrough_is_read_only_by_default(api_daemon: Daemon) -> None:
    props = api_daemon.http.get("/upstream/smollm2/props")
    assert props.status_code == 200 and "default_generation_settings" in props.json()
    slots = api_daemon.http.get("/upstream/local-coder/slots")  # an alias works too
    assert slots.status_code == 200 and isinstance(slots.json(), list)
    write = api_daemon.http.post("/upstream/smollm2/slots/0?action=erase")
    assert write.status_code == 405 and "server.upstream_write" in write.json()["error"]["message"]
    assert api_daemon.http.get("/upstream/nope/props").json()["error"]["code"] == "model_not_found"
    assert api_daemon.http.get("/upstream/smollm2/props", headers={"authorization": ""}).status_code == 401


def test_a_models_log_over_http_tail_and_follow(api_daemon: Daemon) -> None:
    tail = api_daemon.http.get("/api/logs/smollm2", params={"lines": 20}).json()
    assert tail["model"] == "smollm2" and 0 < len(tail["lines"]) <= 20
    assert any(word in line for line in tail["lines"] for word in ("srv", "slot", "llama"))  # llama-server's own
    assert api_daemon.http.get("/api/logs/..%2F..%2Fetc%2Fpasswd").status_code == 404
    with api_daemon.http.stream("GET", "/api/logs/smollm2", params={"follow": 1}) as stream:
        api_daemon.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2})
        lines = stream.iter_lines()
        new = next(line for line in lines if line.startswith("data: "))
    assert new.startswith("data: ")


def test_xgen_logs_prints_the_tail_then_follows_with_no_line_missed(api_daemon: Daemon) -> None:
    xgen = [sys.executable, "-m", "reconciler.cli", "logs"]
    tail = subprocess.run([*xgen, "smollm2", "-n", "5", "--daemon", api_daemon.url],
                          capture_output=True, text=True, timeout=30)
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 5, tail
    assert tail.stdout.splitlines() == api_daemon.http.get("/api/logs/smollm2", params={"lines": 5}).json()["lines"]
    missing = subprocess.run([*xgen, "nope", "--daemon", api_daemon.url], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "has no model 'nope'" in missing.stderr

    follow = subprocess.Popen([*xgen, "smollm2", "-n", "3", "-f", "--daemon", api_daemon.url],
                              stdout=subprocess.PIPE, text=True,  # Ctrl-C as at a terminal, however the tests run
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert follow.stdout is not None
        before = [follow.stdout.readline().rstrip("\n") for _ in range(3)]  # the backlog, at once
        assert before == api_daemon.http.get("/api/logs/smollm2", params={"lines": 3}).json()["lines"]
        api_daemon.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2})
        assert follow.stdout.readline().strip()  # what the request made llama-server write
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0  # Ctrl-C ends it quietly

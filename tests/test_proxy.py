"""The /v1 proxy with the official openai SDK against real llama-server backends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Daemon, launched

pytestmark = pytest.mark.integration

SPEC = """\
models:
  smollm2:
    path: {MODEL}
    n_ctx: 2048
    aliases: [default, gpt-4o-mini]
    llama: {{parallel: 1}}
  embedder:
    path: {MODEL}
    server_type: embedding
    n_ctx: 512
    aliases: [text-embedding-3-small]
active: smollm2
"""


@pytest.fixture(scope="module")
def proxy_daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path, tiny_gguf: Path,
                 llama_server: Path) -> Iterator[Daemon]:
    with launched(tmp_path_factory.mktemp("proxy"), default_model, tiny_gguf, SPEC) as d:
        yield d


@pytest.fixture(scope="module")
def client(proxy_daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy_daemon.url}/v1", api_key="unused", max_retries=0)


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi"}],
                                           max_tokens=8)
    assert reply.model == "smollm2"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_streamed_chat(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=12, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text


def test_unknown_model_is_404_naming_what_is_served(client: openai.OpenAI, proxy_daemon: Daemon) -> None:
    for name in ("whatever", "../../etc/passwd", "x" * 100_000):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=name, prompt="Once upon a time", max_tokens=6)
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "model_not_found"
        assert "this server serves: smollm2, default, gpt-4o-mini, embedder, text-embedding-3-small" in error["message"]
        assert len(error["message"]) < 300
    no_model = proxy_daemon.http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 6})
    assert no_model.status_code == 200 and no_model.json()["model"] == "smollm2"  # the active model
    wrong_type = proxy_daemon.http.post("/v1/completions", json={"model": 7, "prompt": "x"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["code"] == "invalid_model"


def test_embeddings_by_name_and_by_default(client: openai.OpenAI, proxy_daemon: Daemon) -> None:
    named = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    assert [len(d.embedding) for d in named.data] == [576, 576]
    default = proxy_daemon.http.post("/v1/embeddings", json={"input": "hello"}).json()
    assert default["data"][0]["embedding"] == pytest.approx(named.data[0].embedding, abs=1e-4)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="not-a-model", input="hello")


def test_models_list_has_every_loaded_model_and_alias(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"smollm2", "default", "gpt-4o-mini", "embedder", "text-embedding-3-small"}


def test_client_disconnect_frees_the_backend_slot(proxy_daemon: Daemon) -> None:
    """With one slot, a long generation abandoned mid-stream must not keep the slot busy."""
    port = proxy_daemon.model("smollm2")["port"]  # type: ignore[index]
    body = {"model": "smollm2", "stream": True, "max_tokens": 4000, "messages": [{"role": "user", "content": "Go"}],
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{proxy_daemon.url}/v1/chat/completions",
                                                       json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert _slots_busy(port)
    deadline = time.monotonic() + 10
    while _slots_busy(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _slots_busy(port), "the backend kept generating for a client that left"


def _slots_busy(port: int) -> bool:
    slots = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
    return any(s.get("is_processing") for s in slots)


def test_error_shapes(proxy_daemon: Daemon) -> None:
    http = proxy_daemon.http
    r = http.get("/v1/nope")
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "no route GET /v1/nope", "type": "invalid_request_error",
                                  "param": None, "code": "not_found"}}
    r = http.get("/api/status")  # a guess at where status is
    assert r.json()["error"]["message"] == "no route GET /api/status (did you mean /api/management/status?)"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["message"] == "GET is not served at /v1/chat/completions; it takes POST"
    r = http.post("/v1/chat/completions", content=b"x" * (17 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = http.post("/v1/chat/completions", content=b"not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith("request body is not a JSON object: JSON is malformed: invalid")
    r = http.post("/v1/chat/completions", content=b'{"model": "smollm2", "messages": [}')  # once sent on to the backend
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]


def test_request_for_a_loading_model_waits_then_succeeds(proxy_daemon: Daemon) -> None:
    """Add a model to the file; the moment the event stream says it is LOADING, ask for it:
    the request waits for LOADED instead of failing."""
    spec = SPEC.replace("active: smollm2", "  late:\n    path: {TINY}\n    n_ctx: 256\nactive: smollm2")
    since = str(proxy_daemon.status()["last_event_id"])
    with httpx.Client(timeout=60) as http:
        with http.stream("GET", f"{proxy_daemon.url}/api/events", headers={"Last-Event-ID": since}) as events:
            proxy_daemon.write(spec)
            for line in events.iter_lines():
                if line.startswith("data: ") and '"model": "late"' in line and '"to": "LOADING"' in line:
                    break
        r = http.post(f"{proxy_daemon.url}/v1/chat/completions", json={
            "model": "late", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "late"
    proxy_daemon.converged(proxy_daemon.write(SPEC))


def test_api_key_is_required_when_set(tmp_path: Path, default_model: Path, tiny_gguf: Path) -> None:
    spec = "server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], api_key: s3cret}}\nmodels:\n  t:\n" \
           "    path: {TINY}\n    n_ctx: 256\n"
    with launched(tmp_path, default_model, tiny_gguf, spec, header=False) as d:
        with pytest.raises(openai.AuthenticationError) as denied:
            openai.OpenAI(base_url=f"{d.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert denied.value.status_code == 401
        assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        ok = openai.OpenAI(base_url=f"{d.url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["t"]
        assert d.http.get("/api/management/status").status_code == 200  # status stays open on loopback


def test_llama_server_lora_adapter_is_selected_by_name(tmp_path: Path, default_model: Path, tiny_gguf: Path,
                                                      llama_server: Path) -> None:
    """A request naming an adapter gets it; one naming the base model gets none. Compared with
    the same backend asked directly with explicit adapter scales."""
    from tinygguf import write_tiny_lora

    d = Daemon(tmp_path, default_model, tiny_gguf)
    d.vars["LORA"] = str(write_tiny_lora(tmp_path / "tilt.gguf", tiny_gguf))
    spec = "models:\n  tiny:\n    path: {TINY}\n    n_ctx: 256\n    lora:\n      - {{name: tilt, path: {LORA}}}\n"
    try:
        d.launch(spec)
        port = d.model("tiny")["port"]  # type: ignore[index]

        def text(url: str, **body: object) -> str:
            r = httpx.post(url, json={"prompt": "hi", "max_tokens": 6, "temperature": 0, **body}, timeout=30)
            assert r.status_code == 200, r.text
            result: str = r.json()["choices"][0]["text"]
            return result

        direct = f"http://127.0.0.1:{port}/v1/completions"
        with_adapter = text(direct, lora=[{"id": 0, "scale": 1.0}])
        without = text(direct, lora=[{"id": 0, "scale": 0.0}])
        assert with_adapter != without
        assert text(f"{d.url}/v1/completions", model="tilt") == with_adapter
        assert text(f"{d.url}/v1/completions", model="tiny") == without
        assert {m["id"] for m in d.http.get("/v1/models").json()["data"]} == {"tiny", "tilt"}
    finally:
        d.stop()


def test_a_model_is_asked_only_what_its_server_type_answers() -> None:
    from reconciler.web.proxy import wrong_kind

    assert wrong_kind("llm", "chat/completions") is None
    assert wrong_kind("rerank", "rerank") is None and wrong_kind("rerank", "/rerank") is None
    assert wrong_kind("llm", "embeddings") == (
        "is an llm model; embeddings need a model with server_type: embedding in models.yaml")
    assert wrong_kind("rerank", "messages") == (
        "is a rerank model (server_type: rerank); it answers /v1/rerank, not generation")

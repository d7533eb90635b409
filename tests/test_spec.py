"""models.yaml rules and their error messages (file, line, column, field, found/expected)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from reconciler.spec import Spec, SpecError, load, parse

ROOT = Path(__file__).resolve().parent.parent


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(text, "m.yaml", env or {})
    return [str(p) for p in info.value.problems]


def test_minimal_file_gets_defaults() -> None:
    spec = parse("models:\n  a:\n    path: a.gguf\n", "m.yaml", {})
    assert spec.server.host == "127.0.0.1"
    assert spec.server.port_range == (8001, 8020)
    model = spec.models["a"]
    assert (model.backend, model.server_type, model.desired, model.gpus) == ("auto", "llm", "loaded", ())


def test_three_mistakes_are_all_reported_with_lines() -> None:
    text = """\
models:
  qwen:
    path: q.gguf
    backend: vlm
    n_ctx: lots
  other:
    path: o.gguf
    gpu_layers: 3
"""
    assert problems(text) == [
        "m.yaml:4:5: models.qwen.backend: found 'vlm', expected one of: 'auto', 'llama-server', 'vllm', "
        "'transformers', 'command', 'remote'",
        "m.yaml:5:5: models.qwen.n_ctx: found 'lots', expected an integer",
        "m.yaml:8:5: models.other.gpu_layers: unknown key 'gpu_layers' (did you mean 'n_gpu_layers'?)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("modles: {}\n", "m.yaml:1:1: modles: unknown key 'modles' (did you mean 'models'?)"),
        ("server:\n  prot: 1\n", "m.yaml:2:3: server.prot: unknown key 'prot' (did you mean 'port'?)"),
        ("models:\n  a:\n    path: a.gguf\n    llama: {thread: 4}\n",
         "m.yaml:4:13: models.a.llama.thread: unknown key 'thread' (did you mean 'threads'?)"),
        ("models:\n  a:\n    path: a.gguf\n    gpu_index: [a]\n",
         "m.yaml:4:5: models.a.gpu_index: found ['a'], expected a GPU index (0), a list of indices for tensor "
         "parallel ([0, 1]) or null for CPU"),
        ("models:\n  a:\n    path: a.gguf\n    n_gpu_layers: -2\n",
         "m.yaml:4:5: models.a.n_gpu_layers: input should be greater than or equal to -1 (found -2)"),
        ("models:\n  a:\n    path: a.gguf\n    desired: maybe\n",
         "m.yaml:4:5: models.a.desired: found 'maybe', expected one of: 'loaded', 'on_demand', 'unloaded'"),
        ("server:\n  port_range: [9000, 8000]\n",
         "m.yaml:2:3: server.port_range: found [9000, 8000], expected [low, high] with 1 <= low <= high <= 65535"),
        ("version: 2\n", "m.yaml:1:1: version: found 2, expected one of: 1"),
        ("models:\n  a: {}\n",
         "m.yaml:2:3: models.a.path: set exactly one of 'path' (a local file or directory) or 'hf_id'"),
        ("models:\n  a:\n    path: a.gguf\n    hf_id: org/a\n",
         "m.yaml:3:5: models.a.path: set exactly one of 'path' (a local file or directory) or 'hf_id'"),
    ],
)
def test_field_errors(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_yaml_syntax_error_is_located() -> None:
    [problem] = problems("models:\n  a: [1, 2\n  b: 3\n")
    assert problem.startswith("m.yaml:3:")
    assert "invalid YAML" in problem


def test_duplicate_model_name() -> None:
    text = "models:\n  a:\n    path: a.gguf\n  a:\n    path: b.gguf\n"
    assert problems(text) == ["m.yaml:4:3: models.a: duplicate key 'a' (first defined at line 2)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  a:\n    path: a.gguf\n    aliases: [chat]\n  b:\n    path: b.gguf\n    aliases: [chat]\n",
         "m.yaml:7:15: models.b.aliases.0: alias 'chat' is already used by model 'a'"),
        ("models:\n  a:\n    path: a.gguf\n  b:\n    path: b.gguf\n    aliases: [a]\n",
         "m.yaml:6:15: models.b.aliases.0: alias 'a' shadows the model of that name; rename one of them"),
        ("models:\n  a:\n    path: a.gguf\n    port: 9001\n  b:\n    path: b.gguf\n    port: 9001\n",
         "m.yaml:7:5: models.b.port: port 9001 is also pinned by model 'a'"),
        ("models:\n  a:\n    path: a.gguf\nactive: b\n",
         "m.yaml:4:1: active: found 'b', expected the name or alias of a model (models: a)"),
        ("models:\n  a:\n    path: a.gguf\n    desired: unloaded\nactive: a\n",
         "m.yaml:5:1: active: model 'a' has desired: unloaded; the active model must be loaded or on_demand"),
        ("models:\n  e:\n    path: e.gguf\n    server_type: embedding\nactive: e\n",
         "m.yaml:5:1: active: model 'e' is an embedding model; the active model must be an llm"),
        ("models:\n  a:\n    hf_id: org/a\n    backend: llama-server\n",
         "m.yaml:4:5: models.a.backend: llama-server needs a GGUF file in 'path', not an hf_id"),
        ("models:\n  r:\n    path: r.gguf\n    server_type: rerank\nactive: r\n",
         "m.yaml:5:1: active: model 'r' is a rerank model; the active model must be an llm"),
        ("models:\n  r:\n    hf_id: org/r\n    backend: transformers\n    server_type: rerank\n",
         "m.yaml:5:5: models.r.server_type: the transformers backend serves llm and embedding models; rerank "
         "with a GGUF on llama-server or an HF cross-encoder on vLLM"),
        ("models:\n  a:\n    path: a.gguf\n    backend: vllm\n",
         "m.yaml:4:5: models.a.backend: vllm serves Hugging Face model directories, not GGUF files; "
         "use backend: llama-server"),
        ("models:\n  a:\n    path: a.gguf\n    extra_args: [--flash-attn, '--port=1']\n",
         "m.yaml:4:32: models.a.extra_args.1: '--port' is managed by xgen: set port instead"),
        ("models:\n  a:\n    hf_id: org/a\n    gpu_index: [0, 1]\n    vllm: {tensor_parallel_size: 4}\n",
         "m.yaml:5:12: models.a.vllm.tensor_parallel_size: found 4, but gpu_index names 2 GPU(s); they must agree"),
    ],
)
def test_cross_field_rules(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_env_expansion_with_defaults() -> None:
    text = "server:\n  api_key: ${KEY}\n  port: ${PORT:-9000}\nmodels:\n  a:\n    path: ${DIR:-/m}/a.gguf\n"
    spec = parse(text, "m.yaml", {"KEY": "s3cret"})
    assert spec.server.api_key == "s3cret"
    assert spec.server.port == 9000
    assert spec.models["a"].path == "/m/a.gguf"


def test_unset_env_without_default_is_an_error() -> None:
    assert problems("server:\n  api_key: ${NOPE}\n") == [
        "m.yaml:2:12: server.api_key: environment variable NOPE is not set (set it, or give a default: ${NOPE:-value})"
    ]


def test_empty_api_key_means_none() -> None:
    assert parse("server:\n  api_key: ${KEY:-}\n", "m.yaml", {}).server.api_key is None


def test_defaults_apply_to_every_model_and_models_override() -> None:
    text = "defaults:\n  n_ctx: 1024\n  llama: {threads: 2}\nmodels:\n  a:\n    path: a.gguf\n" \
           "  b:\n    path: b.gguf\n    n_ctx: 4096\n    llama: {parallel: 4}\n"
    spec = parse(text, "m.yaml", {})
    assert spec.models["a"].n_ctx == 1024
    assert spec.models["b"].n_ctx == 4096
    assert (spec.models["b"].llama.threads, spec.models["b"].llama.parallel) == (2, 4)


def test_error_in_defaults_points_at_defaults() -> None:
    assert problems("defaults:\n  n_ctx: big\nmodels:\n  a:\n    path: a.gguf\n") == [
        "m.yaml:2:3: models.a.n_ctx: found 'big', expected an integer"
    ]


def test_generation_ignores_comments_and_key_order() -> None:
    a = parse("models:\n  a:\n    path: a.gguf\n    n_ctx: 64\n", "m.yaml", {})
    b = parse("# hi\nmodels:\n  a:\n    n_ctx: 64  # ctx\n    path: a.gguf\n", "m.yaml", {})
    c = parse("models:\n  a:\n    path: a.gguf\n    n_ctx: 128\n", "m.yaml", {})
    assert a.generation == b.generation != c.generation


def test_load_resolves_relative_paths_and_directories(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "b.gguf").write_bytes(b"GGUF")
    (tmp_path / "models" / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "m.yaml").write_text("models:\n  x:\n    path: models\n")
    spec = load(tmp_path / "m.yaml", {})
    assert spec.models["x"].path == str(tmp_path / "models" / "a.gguf")


def test_load_reports_missing_path_with_line(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("models:\n  x:\n    path: nowhere.gguf\n")
    with pytest.raises(SpecError) as info:
        load(tmp_path / "m.yaml", {})
    [problem] = info.value.problems
    assert (problem.line, problem.column, problem.field) == (3, 5, "models.x.path")
    assert f"not found: {tmp_path / 'nowhere.gguf'}" in problem.message


def test_hf_directory_with_llama_server_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "m.yaml").write_text("models:\n  x:\n    path: hf\n    backend: llama-server\n")
    with pytest.raises(SpecError, match=r"no \.gguf file in"):
        load(tmp_path / "m.yaml", {})


def test_repo_default_models_yaml_parses() -> None:
    spec = parse((ROOT / "models.yaml").read_text(), "models.yaml", {})
    assert spec.active == "smollm2"
    assert spec.models["smollm2"].backend == "llama-server"


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(example: Path, tmp_path: Path) -> None:
    """Every example is valid, on a host where its model files and programs exist."""
    env = {"XGEN_MODELS": str(tmp_path), "XGEN_API_KEY": "k", "VLLM_VENV": str(tmp_path / "venv")}
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    spec = parse(example.read_text(), str(example), env)
    for model in spec.models.values():
        for adapter in model.lora:
            Path(adapter.path).mkdir(parents=True, exist_ok=True)
        if model.path:
            Path(model.path).parent.mkdir(parents=True, exist_ok=True)
            if model.path.endswith(".gguf"):
                Path(model.path).write_bytes(b"GGUF")
            else:
                Path(model.path).mkdir(parents=True, exist_ok=True)
                (Path(model.path) / "config.json").write_text("{}")
    load(example, env)


def test_every_problem_in_one_run_even_beside_a_bad_top_level_key() -> None:
    text = """\
server:
  port: banana
models:
  a:
    n_ctx: 512
active: c
"""
    assert problems(text) == [
        "m.yaml:2:3: server.port: found 'banana', expected an integer",
        "m.yaml:4:3: models.a.path: set exactly one of 'path' (a local file or directory) or 'hf_id'",
        "m.yaml:6:1: active: found 'c', expected the name or alias of a model (models: a)",
    ]


def test_an_alias_of_an_invalid_model_is_not_reported_as_unknown() -> None:
    text = "models:\n  big:\n    path: b.gguf\n    n_ctx: banana\n    aliases: [tiny]\nactive: tiny\n"
    assert problems(text) == ["m.yaml:4:5: models.big.n_ctx: found 'banana', expected an integer"]


def test_load_reports_host_problems_beside_parse_problems(tmp_path: Path) -> None:
    (tmp_path / "page.gguf").write_text("<html>Not Found</html>")
    (tmp_path / "m.yaml").write_text(
        "models:\n  a:\n    path: gone.gguf\n  b:\n    path: b.gguf\n    n_ctx: banana\n"
        "  c:\n    path: page.gguf\n"
    )
    with pytest.raises(SpecError) as info:
        load(tmp_path / "m.yaml")
    text = [str(p) for p in info.value.problems]
    assert text[0].startswith(f"{tmp_path / 'm.yaml'}:3:5: models.a.path: not found:")
    assert text[1].endswith("models.b.n_ctx: found 'banana', expected an integer")
    assert text[2].endswith(f"models.c.path: {tmp_path / 'page.gguf'} is not a GGUF file (it starts with b'<htm', "
                            "a GGUF file with b'GGUF')")


def test_log_max_bytes_is_a_size_of_at_least_64_kib() -> None:
    assert parse("server: {log_max_bytes: 1MiB}\nmodels: {}\n", "m.yaml", {}).server.log_max_bytes == "1MiB"
    assert problems("server: {log_max_bytes: 1KiB}\nmodels: {}\n") == [
        "m.yaml:1:10: server.log_max_bytes: found '1KiB', expected at least 64KiB "
        "(a log that small keeps almost nothing)"
    ]
    assert "expected a size such as 10MiB" in problems("server: {log_max_bytes: 50%}\nmodels: {}\n")[0]


def test_hung_after_s_is_0_or_at_least_a_second() -> None:
    assert parse("models: {}\n", "m.yaml", {}).server.hung_after_s == 60
    assert parse("server: {hung_after_s: 0}\nmodels: {}\n", "m.yaml", {}).server.hung_after_s == 0
    assert problems("server: {hung_after_s: 0.2}\nmodels: {}\n") == [
        "m.yaml:1:10: server.hung_after_s: found 0.2, expected 0 (never checked) or at least 1 second"
    ]


def test_env_values_are_strings_and_the_names_are_checked() -> None:
    spec = parse("models:\n  a:\n    path: a.gguf\n    env: {X: 1, Y: 0.5, Z: plain}\n", "m.yaml", {})
    assert spec.models["a"].env == {"X": "1", "Y": "0.5", "Z": "plain"}
    assert problems("models:\n  a:\n    path: a.gguf\n    env: {X: true}\n") == [
        "m.yaml:4:11: models.a.env.X: found True, expected a string: quote it ('1', 'true') as the backend wants it"]
    assert problems("models:\n  a:\n    path: a.gguf\n    gpu_index: 0\n    env: {CUDA_VISIBLE_DEVICES: '1'}\n") == [
        "m.yaml:5:11: models.a.env.CUDA_VISIBLE_DEVICES: 'CUDA_VISIBLE_DEVICES' is managed by xgen: set gpu_index "
        "instead"]
    assert problems("models:\n  a:\n    path: a.gguf\n    env: {'A=B': x}\n") == [
        "m.yaml:4:11: models.a.env.A=B: 'A=B' is not a variable name (letters, digits and _)"]
    spec = parse("defaults:\n  env: {HF_HOME: /data}\nmodels:\n  a: {path: a.gguf}\n  far: {backend: remote, "
                 "url: 'http://h/v1'}\n", "m.yaml", {})  # defaults reach a remote model too: no error for it
    assert spec.models["a"].env == spec.models["far"].env == {"HF_HOME": "/data"}
    assert problems("defaults:\n  env: {A: [1]}\nmodels:\n  a: {path: a.gguf}\n") == [
        "m.yaml:2:9: models.a.env.A: found [1], expected a string"]


def test_programs_a_model_names_are_found_or_refused_with_their_line(tmp_path: Path) -> None:
    fork = tmp_path / "builds" / "llama-server"
    fork.parent.mkdir()
    fork.write_text("#!/bin/sh\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    file = tmp_path / "models.yaml"

    def load_with(llama: str) -> Spec:
        file.write_text(f"models:\n  a:\n    path: m.gguf\n    llama: {{{llama}}}\n    vllm: {{python: python3}}\n")
        return load(file, {})

    with pytest.raises(SpecError) as info:
        load_with("binary: builds/llama-server")
    assert [str(p) for p in info.value.problems] == [
        f"{file}:4:13: models.a.llama.binary: {fork} is not executable (chmod +x)"]
    fork.chmod(0o755)
    spec = load_with("binary: builds/llama-server")
    assert spec.models["a"].llama.binary == str(fork)  # relative to the file
    assert spec.models["a"].vllm.python == shutil.which("python3")  # a name: found on PATH
    with pytest.raises(SpecError) as info:
        load_with("binary: no-such-llama-server")
    assert [str(p) for p in info.value.problems] == [
        f"{file}:4:13: models.a.llama.binary: 'no-such-llama-server' is not on PATH: give its full path"]


def test_a_nul_anywhere_is_refused_where_it_is() -> None:
    """A process argument, variable or path is cut short at a NUL without a word: refused here."""
    assert problems('models:\n  a:\n    path: a.gguf\n    extra_args: ["--x\\0y"]\n    env: {A: "b\\0c"}\n') == [
        "m.yaml:4:18: models.a.extra_args.0: contains a NUL character (\\0), which no program argument, variable "
        "or path can hold",
        "m.yaml:5:11: models.a.env.A: contains a NUL character (\\0), which no program argument, variable or path "
        "can hold"]

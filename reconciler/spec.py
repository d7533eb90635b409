"""The desired state: pydantic models of `models.yaml` and loading with line-numbered errors.

`parse()` is pure (text in, `Spec` or `SpecError` out). `load()` adds the host checks that need
the filesystem: model paths exist, a directory resolves to its first `.gguf`. Every problem found
is reported at once, each with file:line:column, the field path, what was found and what was
expected.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

SPEC_VERSION = 1
# Bounds on what one save may cost the daemon: a models.yaml of hundreds of models is ~100 KB.
MAX_SPEC_BYTES = 1024 * 1024
MAX_NODES = 50_000  # YAML values read: a file of ~4,000 models
MAX_ALIASED = 5_000  # values read again through an alias: a "billion laughs" file stops here, cheaply
# Plain YAML only: an explicit tag such as !!python/object is refused, never constructed.
_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map", "timestamp"))
Backend = Literal["auto", "llama-server", "vllm", "transformers", "command", "remote"]
ServerType = Literal["llm", "embedding", "rerank"]
Desired = Literal["loaded", "on_demand", "unloaded"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]

# Flags xgen sets itself from spec fields; in extra_args they would silently fight the spec.
MANAGED_FLAGS: dict[str, str] = {
    "--host": "server.host (children always bind 127.0.0.1)",
    "--port": "port",
    "-m": "path",
    "--model": "path / hf_id",
    "-c": "n_ctx",
    "--ctx-size": "n_ctx",
    "-ngl": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "--embeddings": "server_type: embedding",
    "--embedding": "server_type: embedding",
    "--reranking": "server_type: rerank",
    "--rerank": "server_type: rerank",
    "--lora": "lora",
    "--served-model-name": "the model's name",
    "--tensor-parallel-size": "vllm.tensor_parallel_size",
    "--max-model-len": "n_ctx",
    "--gpu-memory-utilization": "vllm.gpu_memory_utilization",
}
# Variables xgen sets itself from spec fields; in `env` they would silently fight the spec.
MANAGED_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "gpu_index",
    "HIP_VISIBLE_DEVICES": "gpu_index",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "lora",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    """Where xgen itself listens and keeps its state."""

    host: str = Field("127.0.0.1", description="Address of the status app and /v1 proxy.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the status app and /v1 proxy.")
    port_range: tuple[int, int] = Field(
        (8001, 8020), description="Inclusive range of ports handed to backend processes."
    )
    api_key: str | None = Field(None, description="If set, /v1 requires `Authorization: Bearer <api_key>`.")
    state_dir: str | None = Field(None, description="Logs and pid files; default: .xgen beside models.yaml.")
    status_public: bool = Field(False, description="Serve status endpoints to non-loopback clients too.")
    load_wait_s: float = Field(30.0, ge=0, description="How long /v1 waits for a LOADING model before answering 503.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest /v1 request body accepted (413 above).")
    client_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A client that sends nothing more of its request's head or body, or takes nothing of its "
        "answer, for this long is disconnected (408 when no answer has begun); a backend stops generating for it.",
    )
    stop_grace_s: float = Field(30.0, ge=0, description="SIGTERM → SIGKILL grace period for backend processes.")
    hung_after_s: float = Field(
        60.0,
        ge=0,
        description="A loaded local backend whose engine answers nothing for this long (llama-server: /slots, "
        "which its inference loop answers; others: their health endpoint) while it uses almost no CPU is hung: "
        "it is killed and restarted with the backoff, like a crash. 0: never checked.",
    )
    max_restarts: int | None = Field(
        None,
        ge=0,
        description="Consecutive failures of an unchanged spec before xgen stops retrying; null (the default) "
        "retries for ever, with the backoff.",
    )
    backoff_max_s: float = Field(
        300.0, gt=0, description="Cap of the restart backoff (1, 2, 4 … s after each consecutive failure)."
    )
    backoff_reset_s: float = Field(
        60.0, ge=0, description="A model that stays LOADED this long has its failure count reset."
    )
    settle_ms: int = Field(
        300,
        ge=0,
        le=60_000,
        description="A change that takes something away from a running model (unload, reload, removal, routing) "
        "waits until the file's bytes have not changed for this long, so a half-written save is never acted on.",
    )
    upstream_write: bool = Field(
        False,
        description="Allow methods other than GET and HEAD through /upstream/<model>/<path> (the backends' own "
        "endpoints, e.g. /slots actions); off, so nothing changes a backend behind xgen's back.",
    )
    budgets: dict[str, int | str] = Field(
        default_factory=dict,
        description="Memory xgen's models may use per device: `cpu`, `gpu` (every GPU) or `gpu0`, `gpu1` …, as "
        "bytes, a size (`12GiB`, `800MiB`) or a share of the device (`90%`). Default: the device's memory minus "
        "`memory_reserve`. On-demand models are loaded and evicted to stay inside it.",
    )
    log_max_bytes: int | str = Field(
        "10MiB",
        description="A backend's log (state_dir/logs/<model>.log) past this size is moved to <model>.log.1 (the "
        "one before it goes), checked every few seconds while the backend runs: a size (`10MiB`) or bytes.",
    )
    memory_reserve: int | str = Field(
        "1GiB", description="Memory left free on every device whose budget is not set (a size or a share)."
    )
    max_loaded: int | None = Field(
        None, ge=1, description="Most models resident at once, pinned and on-demand together; null: no limit."
    )
    loading_messages: bool = Field(
        False,
        description="A streaming chat request for a model that is loading gets the load's progress at once, as "
        "`reasoning_content` in its stream (chat UIs show it apart from the answer), then the answer.",
    )
    remote_check_s: float = Field(
        10.0, gt=0, description="How often a remote model's server is asked for its model list (health)."
    )
    unknown_model: Literal["reject", "active"] = Field(
        "reject",
        description="A /v1 request naming a model xgen does not serve: `reject` answers 404 model_not_found, "
        "`active` sends it to the active model (for clients that hard-code a model name).",
    )

    @field_validator("api_key", "state_dir", mode="after")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("budgets", mode="after")
    @classmethod
    def _budgets(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        for device, amount in value.items():
            if not re.fullmatch(r"cpu|gpu|gpu\d+", device):
                raise ValueError(f"found device '{device}', expected cpu, gpu (every GPU) or gpu0, gpu1 …")
            size_of(amount, 1)
        return value

    @field_validator("hung_after_s", mode="after")
    @classmethod
    def _hung_after(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError(f"found {value:g}, expected 0 (never checked) or at least 1 second")
        return value

    @field_validator("log_max_bytes", mode="after")
    @classmethod
    def _log_size(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value.strip().endswith("%"):
            raise ValueError(f"found {value!r}, expected a size such as 10MiB or bytes (a share of nothing is 0)")
        if size_of(value, 0) < 64 * 1024:
            raise ValueError(f"found {value!r}, expected at least 64KiB (a log that small keeps almost nothing)")
        return value

    @field_validator("memory_reserve", mode="after")
    @classmethod
    def _reserve(cls, value: int | str) -> int | str:
        size_of(value, 1)
        return value

    @field_validator("port_range", mode="after")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"found [{low}, {high}], expected [low, high] with 1 <= low <= high <= 65535")
        return value


class LlamaOptions(_Strict):
    """llama.cpp `llama-server` settings."""

    binary: str | None = Field(
        None,
        description="The llama-server executable for this model (another build or fork); default: "
        "$XGEN_LLAMA_SERVER, else llama-server on PATH, else the one `xgen install` built.",
    )
    threads: int | None = Field(None, ge=1, description="-t: CPU threads for generation.")
    threads_batch: int | None = Field(None, ge=1, description="-tb: CPU threads for prompt processing.")
    batch_size: int | None = Field(None, ge=1, description="-b: logical batch size.")
    ubatch_size: int | None = Field(None, ge=1, description="-ub: physical batch size.")
    parallel: int | None = Field(None, ge=1, description="-np: concurrent request slots.")
    mmap: bool = Field(True, description="Memory-map the model file (--no-mmap when false).")
    mlock: bool = Field(False, description="Lock the model in RAM (--mlock).")
    flash_attn: Literal["on", "off", "auto"] | None = Field(None, description="-fa.")
    pooling: Pooling | None = Field(None, description="Pooling for embedding models (default mean).")


class VllmOptions(_Strict):
    """vLLM OpenAI server settings."""

    python: str | None = Field(
        None, description="Interpreter with vLLM installed (default: $XGEN_VLLM_PYTHON, else xgen's)."
    )
    tensor_parallel_size: int | None = Field(None, ge=1, description="Default: the number of GPUs in gpu_index.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1, description="Default: n_ctx.")
    block_size: int | None = Field(None, ge=1)
    swap_space: float | None = Field(None, ge=0, description="CPU swap space per GPU, GiB.")
    dtype: str | None = Field(None, description="auto, float16, bfloat16, float32.")


class TransformersOptions(_Strict):
    """Settings of xgen's own transformers server."""

    dtype: str | None = Field(None, description="auto, float16, bfloat16, float32.")


class CommandOptions(_Strict):
    """Any other server, run from its command line (`backend: command`)."""

    argv: list[str] = Field(
        min_length=1,
        description="The program and its arguments (never run by a shell). In each argument and `env` value {port} "
        "becomes the port xgen gives the process, {host} 127.0.0.1, {name} the model's name and {path} its `path`.",
    )
    health: str = Field(
        "/v1/models",
        description="The path that answers 200 once the server serves (and while it does): its health check.",
    )

    @field_validator("health", mode="after")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"found {value!r}, expected a path on the server, starting with /")
        return value


class LoraAdapter(_Strict):
    name: str = Field(min_length=1, description="Name that /v1 requests use to select the adapter.")
    path: str = Field(min_length=1, description="Adapter directory or GGUF file.")
    scale: float = Field(1.0, description="Adapter scale (llama-server).")


class ParamRules(_Strict):
    """Request parameters a model's rules change on their way to the backend (never `model`)."""

    set: dict[str, Any] = Field(
        default_factory=dict, description="Parameters forced to these values, whatever the client sent."
    )
    default: dict[str, Any] = Field(
        default_factory=dict, description="Parameters filled in only where the client left them out."
    )
    strip: list[str] = Field(
        default_factory=list, description="Parameters removed (a dotted path reaches into an object: `a.b`)."
    )

    @property
    def empty(self) -> bool:
        return not (self.set or self.default or self.strip)


def _check_gpu_index(value: Any) -> Any:
    ok = (
        value is None
        or (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    )
    if not ok:
        raise ValueError(
            f"found {value!r}, expected a GPU index (0), a list of indices for tensor parallel ([0, 1]) or null for CPU"
        )
    return value


def _env_value(value: Any) -> Any:
    """Numbers as YAML read them (`GGML_CUDA_ENABLE_UNIFIED_MEMORY: 1`); true and false are
    refused, since one backend wants 1, another true or TRUE."""
    if isinstance(value, bool):
        raise ValueError(f"found {value}, expected a string: quote it ('1', 'true') as the backend wants it")
    return str(value) if isinstance(value, int | float) else value


EnvValue = Annotated[str, BeforeValidator(_env_value, json_schema_input_type=str | int | float)]


class ModelSpec(_Strict):
    """One model: what to serve, with which backend, where."""

    path: str | None = Field(
        None, description="GGUF file, or a directory (first .gguf in sorted order, or an HF model directory)."
    )
    hf_id: str | None = Field(None, description="Hugging Face model id (vLLM / transformers).")
    backend: Backend = "auto"
    server_type: ServerType = "llm"
    gpu_index: Annotated[
        int | list[int] | None, Field(description="GPU index, list for tensor parallel, null = CPU.")
    ] = None
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU: -1 all, 0 none.")
    n_ctx: int = Field(4096, ge=16, description="Context length in tokens.")
    port: int | None = Field(None, ge=1, le=65535, description="Fixed backend port (default: from port_range).")
    aliases: list[str] = Field(default_factory=list, description="Other names /v1 requests may use.")
    desired: Desired = Field(
        "loaded",
        description="`loaded`: pinned, always resident, never evicted. `on_demand`: loaded by the first request "
        "for it, unloaded after `idle_unload_s` without one, evicted when another model needs its memory. "
        "`unloaded`: not served.",
    )
    idle_unload_s: float | None = Field(
        None,
        gt=0,
        description="On-demand models: unload after this long without a request (null: only evicted); "
        "pinned models ignore it, so it may be set in `defaults`.",
    )
    replace: Literal["auto", "surge", "recreate"] = Field(
        "auto",
        description="How a launch change replaces the running process: `surge` starts the new one beside the old "
        "and switches when it is ready (no downtime; needs memory for both), `recreate` stops the old one first, "
        "`auto` surges when the memory estimate allows.",
    )
    ready_timeout_s: float | None = Field(None, gt=0, description="Readiness timeout (driver default).")
    llama: LlamaOptions = Field(default_factory=LlamaOptions)
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    transformers: TransformersOptions = Field(default_factory=TransformersOptions)
    lora: list[LoraAdapter] = Field(default_factory=list)
    command: CommandOptions | None = Field(None, description="The server's command line, for backend: command.")
    extra_args: list[str] = Field(default_factory=list, description="More backend flags (not ones xgen manages).")
    env: dict[str, EnvValue] = Field(
        default_factory=dict,
        description="Variables set in the backend process's environment, over the daemon's (not ones xgen "
        "manages; a remote model has no process here). Shown in plan and status: a secret belongs in the "
        "daemon's environment.",
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests sent to this model at once (null: no limit); more wait in its queue."
    )
    max_queue: int = Field(
        32, ge=0, description="Requests that may wait for a turn, in arrival order; past it, 429 at once."
    )
    queue_timeout_s: float = Field(30.0, gt=0, description="How long a request waits for a turn before 429.")
    params: ParamRules = Field(
        default_factory=ParamRules, description="Parameter rules applied to every request for this model."
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named parameter sets: `name:variant` (or `alias:variant`) reaches this model with those "
        "parameters set, e.g. `high: {reasoning_effort: high}`. Changing one never restarts the model.",
    )
    url: str | None = Field(
        None,
        description="backend: remote: the OpenAI-compatible base URL of a model served elsewhere (another xgen, "
        "a provider), up to /v1, e.g. http://box2:8000/v1.",
    )
    remote_model: str | None = Field(
        None, description="backend: remote: the model's name there (default: its name here)."
    )
    api_key_env: str | None = Field(
        None,
        description="backend: remote: the environment variable holding its API key (sent as a Bearer token; the "
        "key itself never appears in the file, status, the plan or logs).",
    )

    @field_validator("gpu_index", mode="before")
    @classmethod
    def _gpu_index(cls, value: Any) -> Any:
        return _check_gpu_index(value)

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPU indices as a tuple; empty for CPU."""
        if self.gpu_index is None:
            return ()
        return (self.gpu_index,) if isinstance(self.gpu_index, int) else tuple(self.gpu_index)

    @property
    def source(self) -> str:
        return self.path or self.hf_id or (self.command.argv[0] if self.command else "")

    @property
    def format(self) -> Literal["gguf", "hf"]:
        return "gguf" if self.path and self.path.lower().endswith(".gguf") else "hf"

    @property  # not cached: model_copy would carry a cached value over to a copy with other rules
    def as_sent(self) -> bool:
        """A request naming this model by its own name goes to it as the client sent it: no
        parameter rules, adapters or remote name change its body (the proxy's fast path)."""
        return self.params.empty and not self.lora and self.remote_model is None


class Spec(_Strict):
    """The whole file, validated."""

    version: Literal[1] = Field(1, description="Format version of this file.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Model settings applied to every model unless it sets them."
    )
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    active: str | None = Field(None, description="Model (or alias) that /v1 uses when a request names none.")

    @property
    def loaded(self) -> dict[str, ModelSpec]:
        """Pinned models (desired: loaded), in file order."""
        return {n: m for n, m in self.models.items() if m.desired == "loaded"}

    @property
    def on_demand(self) -> dict[str, ModelSpec]:
        """Models loaded by requests (desired: on_demand), in file order."""
        return {n: m for n, m in self.models.items() if m.desired == "on_demand"}

    @property
    def served(self) -> dict[str, ModelSpec]:
        """Every model a request may reach: pinned and on demand."""
        return {n: m for n, m in self.models.items() if m.desired != "unloaded"}

    @functools.cached_property
    def generation(self) -> str:
        """Identity of this spec: a hash of its canonical JSON (comments and order don't count)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def resolve(self, name: str) -> str | None:
        """The model a name or alias refers to, or None."""
        if name in self.models:
            return name
        return next((n for n, m in self.models.items() if name in m.aliases), None)

    def resolve_variant(self, requested: str) -> tuple[str, str] | None:
        """(model, variant) for `name:variant` or `alias:variant`, or None."""
        base, colon, variant = requested.rpartition(":")
        name = self.resolve(base) if colon else None
        if name is not None and variant in self.models[name].variants:
            return name, variant
        return None


_VARIANT = re.compile(r"[A-Za-z0-9._-]+")
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def size_of(amount: int | str, total: int) -> int:
    """Bytes meant by a budget: an integer, a size ('12GiB', '800 MiB') or a share of `total` ('90%')."""
    if isinstance(amount, int):
        if amount < 0:
            raise ValueError(f"found {amount}, expected a size of at least 0 bytes")
        return amount
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b|b)?\s*", amount, re.IGNORECASE)
    unit = (match.group(2) or "").lower() if match else ""
    if match is None or (unit not in _UNITS and unit != "%") or (unit == "%" and float(match.group(1)) > 100):
        raise ValueError(
            f"found {amount!r}, expected bytes (an integer), a size such as 12GiB or 800MiB, or a share such as 90%"
        )
    number = float(match.group(1))
    return int(total * number / 100) if unit == "%" else int(number * _UNITS[unit])


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file, located."""

    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(Exception):
    """The file is not a valid spec; `problems` lists everything wrong, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line, p.column, p.field))
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in {self.problems[0].file}" if count else ""
        super().__init__("\n".join([head, *map(str, self.problems)]))


# ---------------------------------------------------------------- YAML with positions

Loc = tuple[str | int, ...]
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Reader:
    """Turns a composed YAML node tree into plain data, remembering where each value was."""

    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.positions: dict[Loc, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.nodes = 0
        self.aliased = 0
        self._seen: set[int] = set()
        self._open: set[int] = set()  # nodes being read: an alias to one of them is a cycle

    def problem(self, loc: Loc, message: str) -> None:
        line, col = self.where(loc)
        self.problems.append(Problem(self.file, line, col, _dotted(loc), message))

    def where(self, loc: Loc) -> tuple[int, int]:
        while loc not in self.positions and loc:
            loc = loc[:-1]
        return self.positions.get(loc, (1, 1))

    def read(self, node: yaml.Node, loc: Loc) -> Any:
        self.positions[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        self.nodes += 1
        if id(node) in self._seen:
            self.aliased += 1
        self._seen.add(id(node))
        if self.nodes > MAX_NODES or self.aliased > MAX_ALIASED:
            raise _TooBig(loc, self.aliased > MAX_ALIASED)
        if node.tag not in _TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problem(loc, f"tag '{tag}' is not allowed (models.yaml holds plain YAML values only)")
            return None
        if id(node) in self._open:
            self.problem(loc, "an alias refers to a value that contains it (a cycle); write the value out instead")
            return None
        if isinstance(node, yaml.MappingNode):
            self._open.add(id(node))
            try:
                return self._mapping(node, loc)
            finally:
                self._open.discard(id(node))
        if isinstance(node, yaml.SequenceNode):
            self._open.add(id(node))
            try:
                return [self.read(item, (*loc, i)) for i, item in enumerate(node.value)]
            finally:
                self._open.discard(id(node))
        try:
            value = yaml.SafeLoader("").construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. a timestamp that is no date
            self.problem(loc, f"cannot read this value: {exc}")
            return None
        return self.expand(value, loc) if isinstance(value, str) else value

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                self.problems.append(Problem(self.file, *where, _dotted(loc), "a key must be a plain name"))
                continue
            key = str(key_node.value)
            if key in out:
                first = self.positions[(*loc, key)]
                self.positions[(*loc, key, "__dup")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                self.problem((*loc, key, "__dup"), f"duplicate key '{key}' (first defined at line {first[0]})")
                continue
            out[key] = self.read(value_node, (*loc, key))
            # point at the key rather than the value: that is where people look
            self.positions[(*loc, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out

    def expand(self, text: str, loc: Loc) -> str:
        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in self.env and (self.env[name] or default is None):
                return self.env[name]
            if default is not None:
                return default
            self.problem(loc, f"environment variable {name} is not set (set it, or give a default: ${{{name}:-value}})")
            return ""

        return _ENV.sub(sub, text)


class _TooBig(Exception):
    """The file holds more than MAX_NODES values, or aliases repeat more than MAX_ALIASED."""

    def __init__(self, loc: Loc, aliases: bool) -> None:
        self.loc = loc
        self.message = (
            f"aliases repeat more than {MAX_ALIASED} values (a file that expands like this is refused); "
            "write it out or use fewer aliases"
            if aliases
            else f"the file holds more than {MAX_NODES} values; is this really models.yaml?"
        )


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc if p != "__dup")


# ---------------------------------------------------------------- parse


def parse(text: str, file: str = "models.yaml", env: Mapping[str, str] | None = None) -> Spec:
    """Validate the text of a models.yaml; raise SpecError listing every problem."""
    spec, reader = _parse(text, file, env)
    if reader.problems or spec is None:
        raise SpecError(reader.problems)
    return spec


def _parse(text: str, file: str, env: Mapping[str, str] | None) -> tuple[Spec | None, _Reader]:
    """The spec holding every part that validated (None if nothing usable), and the reader that
    holds every problem (and the positions, for problems found later)."""
    reader = _Reader(file, os.environ if env is None else env)
    root = _compose(text, file)
    try:
        data = reader.read(root, ()) if root is not None else {}
    except _TooBig as exc:
        reader.problem(exc.loc, exc.message)
        raise SpecError(reader.problems[-1:]) from None
    except RecursionError:
        raise SpecError([Problem(file, 1, 1, "", "values nest too deeply to read")]) from None
    if reader.problems:  # tags and cycles: the data around them is not what the operator wrote
        raise SpecError(reader.problems)
    if not isinstance(data, dict):
        reader.problem((), f"found {type(data).__name__}, expected a mapping with 'models:'")
        raise SpecError(reader.problems)
    data = _apply_defaults(data, reader)
    spec, invalid = _validate(data, reader)
    if spec is not None:
        _cross_checks(spec, invalid, reader)
    return spec, reader


def _compose(text: str, file: str) -> yaml.Node | None:
    """The YAML node tree, or SpecError with the position of what stopped the parser."""
    try:
        root: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        return root
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError([Problem(file, line, col, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        what = f"character {chr(exc.character)!r}" if isinstance(exc.character, int) else "a character"
        raise SpecError([Problem(file, line, col, "", f"invalid YAML: {what} is not allowed ({exc.reason})")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(file, 1, 1, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise SpecError([Problem(file, 1, 1, "", "invalid YAML: values nest too deeply to read")]) from None


def _line_col(text: str, position: int) -> tuple[int, int]:
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


def _apply_defaults(data: dict[str, Any], reader: _Reader) -> dict[str, Any]:
    """Merge `defaults:` under every model (a model's own keys win; nested blocks merge)."""
    defaults = data.get("defaults") or {}
    models = data.get("models")
    if not isinstance(defaults, dict) or not isinstance(models, dict):
        return data
    merged: dict[str, Any] = {}
    for name, model in models.items():
        if not isinstance(model, dict):
            merged[name] = model
            continue
        out = dict(model)
        for key, value in defaults.items():
            if key not in out:
                out[key] = value
                _alias_positions(reader, ("defaults", key), ("models", name, key))
            elif isinstance(value, dict) and isinstance(out[key], dict):
                for sub, sub_value in value.items():
                    if sub not in out[key]:
                        out[key] = {**out[key], sub: sub_value}
                        _alias_positions(reader, ("defaults", key, sub), ("models", name, key, sub))
        merged[name] = out
    return {**data, "models": merged}


def _alias_positions(reader: _Reader, src: Loc, dst: Loc) -> None:
    for loc, pos in list(reader.positions.items()):
        if loc[: len(src)] == src:
            reader.positions[dst + loc[len(src) :]] = pos


def _validate(data: dict[str, Any], reader: _Reader) -> tuple[Spec | None, dict[str, list[str]]]:
    """Pydantic validation, each model on its own so that one bad model hides nothing else, and
    the top level without the keys that failed, so the rules across models still run.

    Returns the spec holding what validated (None if even that fails) and the models that did
    not, with the aliases they declare (so names they own are not reported as unknown).
    """
    models = data.get("models") if isinstance(data.get("models"), dict) else None
    top = {**data, "models": {}} if models is not None else data
    spec: Spec | None = None
    try:
        spec = Spec.model_validate(top)
    except ValidationError as exc:
        _report(exc, (), reader)
        failed = {err["loc"][0] for err in exc.errors() if err["loc"]}
        with contextlib.suppress(ValidationError):
            spec = Spec.model_validate({k: v for k, v in top.items() if k not in failed})
    good: dict[str, ModelSpec] = {}
    bad: dict[str, list[str]] = {}
    for name, raw in (models or {}).items():
        try:
            good[name] = ModelSpec.model_validate(raw if raw is not None else {})
        except ValidationError as exc:
            _report(exc, ("models", name), reader)
            aliases = raw.get("aliases") if isinstance(raw, dict) else None
            bad[name] = [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []
    return (spec.model_copy(update={"models": good}) if spec else None), bad


def _report(exc: ValidationError, prefix: Loc, reader: _Reader) -> None:
    seen: set[tuple[Loc, str]] = set()
    for err in exc.errors():
        loc: Loc = (*prefix, *err["loc"])
        message = _message(err, loc)
        if (loc, message) not in seen:
            seen.add((loc, message))
            reader.problem(loc, message)


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "tuple": "a list of two integers",
}


def _message(err: Any, loc: Loc) -> str:
    kind: str = err["type"]
    found = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"
        return f"unknown key '{key}' ({hint})"
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    if kind == "literal_error":
        return f"found {found!r}, expected one of: {ctx.get('expected', '').replace(' or ', ', ')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    for word, expected in _TYPE_WORDS.items():
        if kind.startswith(word) and ("parsing" in kind or "type" in kind):
            return f"found {found!r}, expected {expected}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (found {found!r})"


def _valid_keys(loc: Loc) -> list[str]:
    """The keys allowed at a mapping path, for 'did you mean'."""
    model: type[BaseModel] = Spec
    for part in loc:
        if model is Spec and part == "models":
            model = ModelSpec
            continue
        if model is ModelSpec and part not in ModelSpec.model_fields:
            continue  # a model's name
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return sorted(model.model_fields)


# ---------------------------------------------------------------- cross-field rules


def _cross_checks(spec: Spec, invalid: dict[str, list[str]], reader: _Reader) -> None:
    """Rules across fields and models. `invalid` models were already reported; they are
    skipped here, but their names and aliases still count as known."""
    for loc in _holding_nul(spec.model_dump(), ()):
        reader.problem(loc, "contains a NUL character (\\0), which no program argument, variable or path can hold")
    owner: dict[str, str] = {}
    ports: dict[int, str] = {}
    for name, model in spec.models.items():
        at: Loc = ("models", name)
        for i, alias in enumerate(model.aliases):
            if alias in spec.models:
                reader.problem(
                    (*at, "aliases", i), f"alias '{alias}' shadows the model of that name; rename one of them"
                )
            elif alias in owner:
                reader.problem((*at, "aliases", i), f"alias '{alias}' is already used by model '{owner[alias]}'")
            else:
                owner[alias] = name
        if model.port is not None:
            if model.port in ports:
                reader.problem((*at, "port"), f"port {model.port} is also pinned by model '{ports[model.port]}'")
            elif model.port == spec.server.port:
                reader.problem((*at, "port"), f"port {model.port} is xgen's own server.port")
            ports[model.port] = name
        for problem in source_problems(model):
            reader.problem((*at, problem[0]), problem[1])
        for loc, message in policy_problems(model):
            reader.problem((*at, *loc), message)
        if model.api_key_env is not None and not reader.env.get(model.api_key_env):
            reader.problem(
                (*at, "api_key_env"),
                f"environment variable {model.api_key_env} is not set: xgen reads the key for '{name}' from it",
            )
        for i, arg in enumerate(model.extra_args):
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS and model.backend != "command":  # a command's flags are all its own
                reader.problem(
                    (*at, "extra_args", i), f"'{flag}' is managed by xgen: set {MANAGED_FLAGS[flag]} instead"
                )
        for variable in model.env:
            if variable in MANAGED_ENV:
                reader.problem(
                    (*at, "env", variable), f"'{variable}' is managed by xgen: set {MANAGED_ENV[variable]} instead"
                )
            elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
                reader.problem((*at, "env", variable), f"'{variable}' is not a variable name (letters, digits and _)")
        if model.replace == "surge" and model.port is not None:
            reader.problem((*at, "replace"), "surge needs a second port while both run: drop the fixed `port`")
        tp = model.vllm.tensor_parallel_size
        if tp is not None and model.gpus and tp != len(model.gpus):
            reader.problem(
                (*at, "vllm", "tensor_parallel_size"),
                f"found {tp}, but gpu_index names {len(model.gpus)} GPU(s); they must agree",
            )
        lora_names = [a.name for a in model.lora]
        for i, adapter in enumerate(model.lora):
            if adapter.name in spec.models or adapter.name in owner or lora_names.count(adapter.name) > 1:
                reader.problem(
                    (*at, "lora", i, "name"), f"adapter name '{adapter.name}' is already a model, alias or adapter name"
                )
    taken = {*spec.models, *owner, *(a.name for m in spec.models.values() for a in m.lora)}
    for name, model in spec.models.items():
        for variant in model.variants:
            for base in (name, *model.aliases):
                if f"{base}:{variant}" in taken:
                    reader.problem(
                        ("models", name, "variants", variant),
                        f"'{base}:{variant}' is already a model, alias or adapter name; rename the variant",
                    )
    if spec.active is not None:
        target = spec.resolve(spec.active)
        if target is None and (spec.active in invalid or any(spec.active in a for a in invalid.values())):
            pass
        elif target is None:
            names = ", ".join([*spec.models, *sorted(invalid)]) or "none defined"
            reader.problem(
                ("active",), f"found '{spec.active}', expected the name or alias of a model (models: {names})"
            )
        elif spec.models[target].desired == "unloaded":
            reader.problem(
                ("active",), f"model '{target}' has desired: unloaded; the active model must be loaded or on_demand"
            )
        elif spec.models[target].server_type != "llm":
            reader.problem(
                ("active",),
                f"model '{target}' is a{'n' if spec.models[target].server_type == 'embedding' else ''} "
                f"{spec.models[target].server_type} model; the active model must be an llm",
            )


def _holding_nul(value: Any, loc: Loc) -> Iterator[Loc]:
    """Where a string holds a NUL: passed to a process it would be cut short there, silently."""
    if isinstance(value, str):
        if "\0" in value:
            yield loc
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and "\0" in key:
                yield loc
            yield from _holding_nul(item, (*loc, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _holding_nul(item, (*loc, i))


def source_problems(model: ModelSpec) -> list[tuple[str, str]]:
    """Pure checks of path/hf_id (or url) against the backend: (field, message) pairs."""
    if model.backend == "remote":
        return remote_problems(model)
    for field in ("url", "remote_model", "api_key_env"):
        if getattr(model, field) is not None:
            return [(field, f"'{field}' is for models served elsewhere: set backend: remote, or remove it")]
    if model.backend == "command":
        return command_problems(model)
    if model.command is not None:
        return [("command", "'command' is for backend: command (any other server); remove it, or set the backend")]
    if (model.path is None) == (model.hf_id is None):
        return [("path", "set exactly one of 'path' (a local file or directory) or 'hf_id'")]
    if model.backend == "llama-server" and model.hf_id is not None:
        return [("backend", "llama-server needs a GGUF file in 'path', not an hf_id")]
    if model.backend == "transformers" and model.server_type == "rerank":
        return [
            (
                "server_type",
                "the transformers backend serves llm and embedding models; rerank with a GGUF on llama-server or "
                "an HF cross-encoder on vLLM",
            )
        ]
    if model.backend in ("vllm", "transformers") and model.format == "gguf":
        return [
            (
                "backend",
                f"{model.backend} serves Hugging Face model directories, not GGUF files; use backend: llama-server",
            )
        ]
    return []


def command_problems(model: ModelSpec) -> list[tuple[str, str]]:
    """A server xgen runs by its command line: it must be told its port."""
    if model.command is None:
        return [("command", "backend: command needs `command: {argv: [program, arguments…]}`")]
    told = [*model.command.argv, *model.env.values()]
    uses = {key for key in ("{port}", "{path}") if any(key in text for text in told)}
    if "{port}" not in uses:
        return [
            (
                "command",
                "no {port} in argv or env: xgen gives each process its port (a replacement runs beside the old "
                "one on another), so the command must take it, e.g. [my-server, --port, '{port}']",
            )
        ]
    if model.hf_id is not None:
        return [("hf_id", "a command names its model in argv: remove hf_id, or put it in argv")]
    if (model.path is not None) != ("{path}" in uses):
        if model.path is None:
            return [("command", "{path} in argv stands for `path`: set it (checked, relative to this file)")]
        return [("path", "xgen passes `path` only as {path}: put {path} in argv where the command takes it")]
    return []


def remote_problems(model: ModelSpec) -> list[tuple[str, str]]:
    """A remote model is reached at `url`; xgen neither starts nor places it."""
    if model.url is None:
        return [("url", "backend: remote needs `url`, the base URL of an OpenAI-compatible API (…/v1)")]
    if not model.url.startswith(("http://", "https://")):
        return [("url", f"found '{model.url}', expected an http:// or https:// URL")]
    if model.path is not None or model.hf_id is not None:
        return [("path" if model.path else "hf_id", "a remote model has no local weights: remove it, or the backend")]
    if model.desired == "on_demand":
        return [("desired", "a remote model is not loaded by xgen: use desired: loaded (routed) or unloaded")]
    if model.gpu_index is not None:
        return [("gpu_index", "a remote model runs elsewhere: remove gpu_index")]
    return []


def policy_problems(model: ModelSpec) -> list[tuple[Loc, str]]:
    """Parameter rules and variants: `model` stays the client's, variant names are plain."""
    found: list[tuple[Loc, str]] = []
    for rule in ("set", "default"):
        if "model" in getattr(model.params, rule):
            found.append((("params", rule, "model"), "`model` is routed by xgen: it cannot be set by a rule"))
    for i, key in enumerate(model.params.strip):
        if key == "model" or not key:
            found.append((("params", "strip", i), "`model` (or an empty name) cannot be stripped"))
    for variant, values in model.variants.items():
        if not _VARIANT.fullmatch(variant):
            found.append((("variants", variant), f"found '{variant}': a variant name is letters, digits, . _ -"))
        if "model" in values:
            found.append((("variants", variant, "model"), "`model` is routed by xgen: a variant cannot set it"))
    return found


# ---------------------------------------------------------------- load (host checks)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Spec:
    """Read, validate and resolve a models.yaml (see `loads`). Raises SpecError with every
    problem, or OSError if the file cannot be read."""
    with open(path, "rb") as f:
        data = f.read(MAX_SPEC_BYTES + 1)
    return loads(data, path, env)


def loads(data: bytes, path: str | Path, env: Mapping[str, str] | None = None) -> Spec:
    """Validate the bytes of the models.yaml at `path` and resolve it against the host: relative
    paths are taken from the file's directory, a directory of GGUF files resolves to its first
    `.gguf`, and missing paths are errors. Raises SpecError and nothing else, whatever the bytes."""
    file = str(path)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(
            [
                Problem(
                    file, 1, 1, "", f"the file is larger than {MAX_SPEC_BYTES // 1024} KiB; is this really models.yaml?"
                )
            ]
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(
            [Problem(file, line, col, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8")]
        ) from None
    spec, reader = _parse(text, file, env)
    if spec is not None:
        spec = _resolve_paths(spec, Path(path).resolve().parent, reader)
    if reader.problems or spec is None:
        raise SpecError(reader.problems)
    return spec


def _resolve_paths(spec: Spec, base: Path, reader: _Reader) -> Spec:
    """Paths made absolute and checked on this host; problems go to `reader`."""
    models: dict[str, ModelSpec] = {}
    for name, model in spec.models.items():
        model = _resolve_programs(name, model, base, reader)
        if model.path is None:
            models[name] = model
            continue
        resolved, problem = _resolve(Path(model.path).expanduser(), base, model)
        if problem:
            reader.problem(("models", name, "path"), problem)
        models[name] = model.model_copy(update={"path": str(resolved)})
        for problem_field, message in source_problems(models[name]):
            if model.format != models[name].format:  # the directory revealed the format
                reader.problem(("models", name, problem_field), message)
        for i, adapter in enumerate(model.lora):
            if not _resolve_plain(Path(adapter.path).expanduser(), base).exists():
                reader.problem(("models", name, "lora", i, "path"), f"adapter not found: {adapter.path}")
    return spec.model_copy(update={"models": models})


def _resolve_programs(name: str, model: ModelSpec, base: Path, reader: _Reader) -> ModelSpec:
    """`llama.binary`, `vllm.python` and a command's program made absolute and checked: a wrong one
    is said here, with its line, not when the backend fails to start."""
    update: dict[str, Any] = {}
    for block, key in (("llama", "binary"), ("vllm", "python")):
        options = getattr(model, block)
        if (value := getattr(options, key)) is None:
            continue
        program, problem = _executable(value, base)
        if problem:
            reader.problem(("models", name, block, key), problem)
        update[block] = options.model_copy(update={key: program})
    if model.command is not None:
        program, problem = _executable(model.command.argv[0], base)
        if problem:
            reader.problem(("models", name, "command", "argv", 0), problem)
        update["command"] = model.command.model_copy(update={"argv": [program, *model.command.argv[1:]]})
    return model.model_copy(update=update) if update else model


def _executable(value: str, base: Path) -> tuple[str, str | None]:
    """A program named in the file (a path, relative to the file's directory, or a name on PATH):
    its absolute path, and what is wrong with it if anything."""
    if "/" not in value and not value.startswith("~"):
        found = shutil.which(value)
        return (found, None) if found else (value, f"'{value}' is not on PATH: give its full path")
    full = _resolve_plain(Path(value).expanduser(), base)
    if not full.is_file():
        return str(full), f"not found: {full} (relative paths start at the directory of this file)"
    if not os.access(full, os.X_OK):
        return str(full), f"{full} is not executable (chmod +x)"
    return str(full), None


def _resolve_plain(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def _resolve(path: Path, base: Path, model: ModelSpec) -> tuple[Path, str | None]:
    full = _resolve_plain(path, base)
    if not full.exists():
        return full, f"not found: {full} (check the path; relative paths start at the directory of this file)"
    if model.backend == "command":
        return full, None  # whatever the command reads
    if full.is_dir():
        ggufs = sorted(p for p in full.iterdir() if p.suffix.lower() == ".gguf")
        if ggufs and model.backend in ("auto", "llama-server"):
            return ggufs[0], None
        if model.backend == "llama-server":
            return full, f"no .gguf file in {full}; llama-server serves GGUF files"
        if not (full / "config.json").exists():
            return full, f"{full} holds neither a .gguf file nor a Hugging Face model (config.json)"
    elif model.backend == "llama-server" and full.suffix.lower() != ".gguf":
        return full, f"{full} is not a .gguf file; llama-server serves GGUF files"
    if full.is_file() and full.suffix.lower() == ".gguf":
        return full, _gguf_problem(full)
    return full, None


def _gguf_problem(path: Path) -> str | None:
    """A file named .gguf that is not one (a download cut short, an HTML error page) fails at load
    time with a message buried in the backend's log: say so now."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if head != b"GGUF":
        return f"{path} is not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF')"
    return None


def declared_state_dir(data: bytes) -> str | None:
    """`server.state_dir` of a file that may be invalid otherwise (for finding the last good spec)."""
    try:
        root = _compose(data.decode("utf-8-sig"), "")
        tree = _Reader("", {}).read(root, ()) if root is not None else None
    except (SpecError, UnicodeDecodeError, _TooBig, RecursionError):
        return None
    server = tree.get("server") if isinstance(tree, dict) else None
    value = server.get("state_dir") if isinstance(server, dict) else None
    return value if isinstance(value, str) and value else None


def json_schema() -> dict[str, Any]:
    """The published JSON schema of models.yaml (schemas/models.schema.json)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://xgen.dev/schemas/models.schema.json"
    schema["title"] = "xgen models.yaml"
    # `defaults` takes any model key: say so, so editors complete them there too.
    description = schema["properties"]["defaults"]["description"]
    schema["properties"]["defaults"] = {"$ref": "#/$defs/ModelSpec", "description": description}
    return schema

"""Memory estimates made before anything starts, so the planner can refuse what cannot fit and
on-demand models can be loaded and evicted inside each device's budget.

GGUF on a GPU: the header gives tensor sizes per layer, the attention shape and the training
context; the estimate is the offloaded weights + the f16 KV cache of the offloaded layers for
`n_ctx` + the compute buffer + the CUDA context. GGUF on the CPU: the file (memory-mapped, all of
it ends up resident) + the KV cache + the compute buffer + the process itself. vLLM takes
`gpu_memory_utilization` × the GPU's total. `read_gguf` and a file's size are the only I/O here
(memory-mapped header, cached by path and mtime).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reconciler.demand import devices_of
from reconciler.plan import NO_RESTART, choose_backend
from reconciler.spec import ModelSpec, Spec
from reconciler.state import GpuInfo

CUDA_CONTEXT_BYTES = 512 * 2**20  # what a CUDA process holds before allocating anything
PROCESS_BYTES = 48 * 2**20  # llama-server's own code, threads and HTTP server on the CPU (measured: ~40 MiB)
UBATCH = 512  # llama-server's default physical batch


@dataclass(frozen=True)
class GgufFacts:
    architecture: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    ctx_train: int
    file_bytes: int  # the whole file: what a CPU model maps and keeps resident
    layer_bytes: tuple[int, ...]  # weights of each repeating block
    output_bytes: int  # output head (+ norm) that llama.cpp offloads after the blocks
    input_bytes: int  # token embeddings: llama.cpp keeps them on the CPU


def read_gguf(path: str) -> GgufFacts:
    """The facts of a GGUF file's header (tensor data is not read)."""
    st = os.stat(path)
    return _read_gguf(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_gguf(path: str, _mtime: int, _size: int) -> GgufFacts:
    from gguf import GGUFReader  # heavy (numpy); only where an estimate is needed

    reader = GGUFReader(path)

    def field(key: str, default: int = 0) -> int:
        f = reader.fields.get(key)
        return int(f.contents()) if f is not None else default

    arch = str(reader.fields["general.architecture"].contents())
    n_layers = field(f"{arch}.block_count")
    n_embd = field(f"{arch}.embedding_length")
    n_head = field(f"{arch}.attention.head_count", 1)
    n_head_kv = field(f"{arch}.attention.head_count_kv", n_head)
    head_dim = field(f"{arch}.attention.key_length", n_embd // max(n_head, 1))
    layers = [0] * n_layers
    output = inputs = 0
    n_vocab = field(f"{arch}.vocab_size")
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        block = re.match(r"blk\.(\d+)\.", tensor.name)
        if block and int(block.group(1)) < n_layers:
            layers[int(block.group(1))] += size
        elif tensor.name == "token_embd.weight":
            inputs += size
            n_vocab = n_vocab or int(tensor.shape[-1])
        else:
            output += size
    if not any(t.name == "output.weight" for t in reader.tensors):
        output += inputs  # tied embeddings: the output head is a copy of token_embd on the GPU
    return GgufFacts(
        arch,
        n_layers,
        n_embd,
        n_head,
        n_head_kv,
        head_dim,
        n_vocab,
        field(f"{arch}.context_length"),
        _size,
        tuple(layers),
        output,
        inputs,
    )


def estimate_gguf(facts: GgufFacts, n_ctx: int, n_gpu_layers: int, devices: int = 1) -> list[int]:
    """Bytes on each GPU for llama-server with this context and offload, split over `devices`
    GPUs as llama.cpp splits layers: the offloaded layers and the output head count as units
    (n_layers + 1 when all are offloaded) shared out evenly in order, so with two GPUs the first
    gets the extra block and the last the head (measured on two H100s: 9 + 7 blocks of 16). Each
    GPU has its own KV cache for its layers, compute buffer and CUDA context; the logits buffer
    is where the head runs. Zeros when nothing is offloaded."""
    offloaded = facts.n_layers if n_gpu_layers < 0 else min(n_gpu_layers, facts.n_layers)
    if offloaded == 0:
        return [0] * devices
    first = facts.n_layers - offloaded
    units = facts.n_layers + 1 if n_gpu_layers < 0 or n_gpu_layers > facts.n_layers else offloaded
    owner = [min(devices - 1, (i - first) * devices // units) for i in range(first, facts.n_layers)]
    out = []
    for i in range(devices):
        layers = [first + j for j, d in enumerate(owner) if d == i]
        weights = sum(facts.layer_bytes[j] for j in layers)
        kv = 2 * len(layers) * n_ctx * facts.n_head_kv * facts.head_dim * 2  # K and V, f16
        attention = UBATCH * (n_ctx * facts.n_head + 8 * facts.n_embd) * 4
        out.append(weights + kv + attention + CUDA_CONTEXT_BYTES)
    if n_gpu_layers < 0 or n_gpu_layers > facts.n_layers:
        out[-1] += facts.output_bytes
    out[-1] += UBATCH * facts.n_vocab * 4  # the logits, where the output head runs
    return out


def estimate_gguf_ram(facts: GgufFacts, n_ctx: int) -> int:
    """Bytes of RAM for llama-server running a GGUF on the CPU only."""
    kv = 2 * facts.n_layers * n_ctx * facts.n_head_kv * facts.head_dim * 2
    compute = UBATCH * facts.n_vocab * 4 + UBATCH * (n_ctx * facts.n_head + 8 * facts.n_embd) * 4
    return facts.file_bytes + kv + compute + PROCESS_BYTES


def estimate(
    model: ModelSpec, backend: str, gpus: tuple[GpuInfo, ...], gguf: GgufFacts | None = None
) -> dict[str, int] | None:
    """Bytes on each device of the model's placement (`gpu0` …, or `cpu` for RAM), or None
    when unknown."""
    if backend == "remote":
        return {}  # served elsewhere: nothing here
    devices = devices_of(model.gpus)
    if backend == "llama-server" and gguf is not None:
        if not model.gpus:
            return {"cpu": estimate_gguf_ram(gguf, model.n_ctx)}
        return dict(zip(devices, estimate_gguf(gguf, model.n_ctx, model.n_gpu_layers, len(devices)), strict=True))
    if backend == "vllm" and model.gpus:
        totals = {f"gpu{g.index}": g.memory_total for g in gpus if g.index in model.gpus}
        return (
            {d: int(totals[d] * model.vllm.gpu_memory_utilization) for d in devices}
            if len(totals) == len(devices)
            else None
        )
    return None


class MeasuredMemory:
    """The peak memory each model was measured to use on each device (NVML per GPU, the process
    tree's RSS for the CPU), kept in the state dir. On a GPU a measurement replaces the formula
    (plus MARGIN): llama.cpp and vLLM allocate what they need when they load, so what was
    measured is what the next load takes. In RAM it only raises the formula: pages of a KV
    cache nobody has filled yet are not resident, so RSS can be less than the worst case."""

    MARGIN = 0.10

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.peaks: dict[str, dict[str, int]] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.peaks = {k: {d: int(b) for d, b in v.items()} for k, v in json.loads(path.read_text()).items()}

    @staticmethod
    def key(model: ModelSpec, backend: str) -> str:
        """What determines the memory a launch takes: everything but the fields that do not
        restart it, and the port."""
        launch = {k: v for k, v in model.model_dump(mode="json").items() if k not in NO_RESTART and k != "port"}
        return hashlib.sha256(json.dumps([backend, launch], sort_keys=True).encode()).hexdigest()[:16]

    def record(self, key: str, device: str, used: int) -> None:
        """A sample; kept (and written) when it is a new peak by more than 1%."""
        peaks = self.peaks.setdefault(key, {})
        if used > peaks.get(device, 0) * 1.01:
            peaks[device] = used
            if self.path is not None:
                with contextlib.suppress(OSError):
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(self.peaks, sort_keys=True))
                    os.replace(tmp, self.path)

    def adjust(self, key: str, estimate: dict[str, int] | None, devices: tuple[str, ...]) -> dict[str, int] | None:
        peaks = self.peaks.get(key, {})
        if not peaks:
            return estimate
        out = dict(estimate or {})
        for device in devices:
            if device in peaks:
                learned = int(peaks[device] * (1 + self.MARGIN))
                out[device] = learned if device != "cpu" else max(out.get(device, 0), learned)
        return out or None


def estimates_for(
    models: Mapping[str, tuple[ModelSpec, str]], gpus: tuple[GpuInfo, ...], measured: MeasuredMemory | None = None
) -> dict[str, dict[str, int]]:
    """Per-device estimates for every placed model (reads GGUF headers; a file it cannot read
    has no formula, but may still have a measurement)."""
    out: dict[str, dict[str, int]] = {}
    for name, (model, backend) in models.items():
        facts = None
        if backend == "llama-server" and model.path:
            with contextlib.suppress(Exception):  # a third-party parser on any file
                facts = read_gguf(model.path)
        value = estimate(model, backend, gpus, facts)
        if measured is not None:
            value = measured.adjust(MeasuredMemory.key(model, backend), value, devices_of(model.gpus))
        if value is not None:
            out[name] = value
    return out


def spec_estimates(
    spec: Spec, gpus: tuple[GpuInfo, ...], measured: MeasuredMemory | None = None
) -> dict[str, dict[str, int]]:
    """Estimates for the spec's pinned and on-demand models, per device (what plan() checks)."""
    placed = {n: (m, choose_backend(m, gpus)[0]) for n, m in spec.served.items()}
    return estimates_for(placed, gpus, measured)

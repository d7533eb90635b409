"""The detector chain with fakes of the vendor libraries at their boundary (their real return
shapes, numbers read off a real H100), the CPU fall-through, and the memory estimator against
real GGUF headers."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from reconciler import memory
from reconciler.gpu import GpuMonitor
from reconciler.spec import ModelSpec
from reconciler.state import GpuInfo

H100_TOTAL = 85_520_809_984


def fake_pynvml(count: int = 1, name: Any = "NVIDIA H100 80GB HBM3") -> types.ModuleType:
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nv.NVMLError = NVMLError  # type: ignore[attr-defined]
    nv.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nv.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"  # type: ignore[attr-defined]
    nv.nvmlSystemGetDriverVersion = lambda: "580.159.04"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetName = lambda h: name  # type: ignore[attr-defined]
    nv.nvmlDeviceGetUUID = lambda h: "GPU-5e1a0c1e-0000-0000-0000-000000000000"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=H100_TOTAL, used=3_839_885_312, free=H100_TOTAL - 3_839_885_312)
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=7, memory=2)  # type: ignore[attr-defined]
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        types.SimpleNamespace(pid=4915, usedGpuMemory=3_519_021_056),
        types.SimpleNamespace(pid=1, usedGpuMemory=None),
    ]
    return nv


def fake_amdsmi() -> types.ModuleType:
    smi = types.ModuleType("amdsmi")
    smi.AmdSmiMemoryType = types.SimpleNamespace(VRAM=0)  # type: ignore[attr-defined]
    smi.amdsmi_init = lambda: None  # type: ignore[attr-defined]
    smi.amdsmi_get_processor_handles = lambda: ["h0", "h1"]  # type: ignore[attr-defined]
    smi.amdsmi_get_gpu_memory_total = lambda h, kind: 206_158_430_208  # type: ignore[attr-defined]
    smi.amdsmi_get_gpu_memory_usage = lambda h, kind: 1_073_741_824  # type: ignore[attr-defined]
    smi.amdsmi_get_gpu_activity = lambda h: {"gfx_activity": 12, "umc_activity": 0, "mm_activity": 0}  # type: ignore[attr-defined]
    smi.amdsmi_get_gpu_asic_info = lambda h: {"market_name": "AMD Instinct MI300X", "vendor_id": "0x1002"}  # type: ignore[attr-defined]
    smi.amdsmi_get_gpu_device_uuid = lambda h: f"uuid-{h}"  # type: ignore[attr-defined]
    smi.amdsmi_get_gpu_driver_info = lambda h: {"driver_name": "amdgpu", "driver_version": "6.8.5"}  # type: ignore[attr-defined]
    return smi


def test_cpu_only_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("amdsmi", "pynvml", "torch"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails like on a host without them
    monitor = GpuMonitor()
    snap = monitor.sample()
    assert (snap.detector, snap.gpus) == ("cpu", ())
    assert snap.to_json() == {"detector": "cpu", "total": 0, "gpus": []}
    assert set(monitor.tried) == {"amdsmi", "pynvml", "torch-hip", "torch-cuda"}


def test_pynvml_reports_each_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(name=b"NVIDIA H100 80GB HBM3"))
    monitor = GpuMonitor()
    [gpu] = monitor.sample().gpus
    assert gpu == GpuInfo(0, "NVIDIA H100 80GB HBM3", "nvidia", H100_TOTAL, 3_839_885_312,
                          H100_TOTAL - 3_839_885_312, 7.0, "GPU-5e1a0c1e-0000-0000-0000-000000000000",
                          "580.159.04", "pynvml")
    assert monitor.process_memory([4915, 1]) == {4915: {"gpu0": 3_519_021_056}}


def test_nvml_without_driver_falls_through(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_pynvml()

    def no_driver() -> None:
        raise nv.NVMLError("Driver Not Loaded")  # type: ignore[attr-defined]

    nv.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setitem(sys.modules, "torch", None)
    monitor = GpuMonitor()
    assert monitor.detector == "cpu"
    assert monitor.tried["pynvml"] == "pynvml: Driver Not Loaded"


def test_amdsmi_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi())
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    snap = GpuMonitor().sample()
    assert snap.detector == "amdsmi"
    assert [(g.index, g.name, g.vendor, g.utilization) for g in snap.gpus] == [
        (0, "AMD Instinct MI300X", "amd", 12.0), (1, "AMD Instinct MI300X", "amd", 12.0)]


def test_chain_can_be_restricted_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setenv("XGEN_GPU_DETECTORS", "cpu")
    assert GpuMonitor().detector == "cpu"


def test_sample_failure_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_pynvml()
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monitor = GpuMonitor()

    def lost(h: str) -> None:
        raise nv.NVMLError("GPU is lost")  # type: ignore[attr-defined]

    nv.nvmlDeviceGetMemoryInfo = lost  # type: ignore[attr-defined]
    assert monitor.sample().gpus == ()


# ---------------------------------------------------------------- estimates


def test_default_model_header(default_model: Path) -> None:
    facts = memory.read_gguf(str(default_model))
    assert (facts.architecture, facts.n_layers, facts.n_embd, facts.n_head, facts.n_head_kv, facts.head_dim,
            facts.n_vocab, facts.ctx_train) == ("llama", 30, 576, 9, 3, 64, 49152, 8192)
    assert facts.input_bytes == 30_081_024  # token_embd, Q4_1
    assert sum(facts.layer_bytes) + facts.input_bytes + facts.output_bytes - facts.input_bytes == 96_576_768


def test_default_model_estimate_adds_up(default_model: Path) -> None:
    facts = memory.read_gguf(str(default_model))
    kv = 2 * 30 * 2048 * 3 * 64 * 2
    compute = 512 * 49152 * 4 + 512 * (2048 * 9 + 8 * 576) * 4
    weights = sum(facts.layer_bytes) + facts.output_bytes
    [one] = memory.estimate_gguf(facts, 2048, -1)
    assert one == weights + kv + compute + memory.CUDA_CONTEXT_BYTES
    assert memory.estimate_gguf(facts, 2048, 0) == [0]
    assert memory.estimate_gguf(facts, 2048, 10) < memory.estimate_gguf(facts, 2048, 30)
    assert memory.estimate_gguf(facts, 2048, 30) < memory.estimate_gguf(facts, 2048, -1)  # + output head
    assert memory.estimate_gguf(facts, 4096, -1) > memory.estimate_gguf(facts, 2048, -1)


def test_a_split_model_is_estimated_per_gpu(default_model: Path) -> None:
    """llama.cpp shares out the 30 blocks and the output head as 31 units: blocks 0-15 on the
    first GPU, 16-29 and the head on the second; each GPU has its own CUDA context, KV cache for
    its blocks and compute buffer; the logits are where the head is."""
    facts = memory.read_gguf(str(default_model))
    first, last = memory.estimate_gguf(facts, 2048, -1, devices=2)
    kv_block = 2 * 2048 * 3 * 64 * 2
    attention = 512 * (2048 * 9 + 8 * 576) * 4
    assert first == sum(facts.layer_bytes[:16]) + 16 * kv_block + attention + memory.CUDA_CONTEXT_BYTES
    head = facts.output_bytes + 512 * 49152 * 4
    assert last == sum(facts.layer_bytes[16:]) + 14 * kv_block + attention + memory.CUDA_CONTEXT_BYTES + head
    [whole] = memory.estimate_gguf(facts, 2048, -1)
    assert first + last == whole + memory.CUDA_CONTEXT_BYTES + attention  # per-GPU overheads twice


def test_estimates_per_backend(tiny_gguf: Path) -> None:
    h100 = (GpuInfo(0, "H100", "nvidia", H100_TOTAL), GpuInfo(1, "H100", "nvidia", H100_TOTAL))
    gguf = ModelSpec(path=str(tiny_gguf), gpu_index=[0, 1], n_gpu_layers=-1)
    vllm = ModelSpec(hf_id="org/m", gpu_index=[0, 1], vllm={"gpu_memory_utilization": 0.5})  # type: ignore[arg-type]
    cpu = ModelSpec(path=str(tiny_gguf))
    out = memory.estimates_for({"g": (gguf, "llama-server"), "v": (vllm, "vllm"), "c": (cpu, "llama-server")}, h100)
    facts = memory.read_gguf(str(tiny_gguf))
    split = memory.estimate_gguf(facts, 4096, -1, devices=2)
    ram = memory.estimate_gguf_ram(facts, 4096)
    assert out == {
        "g": {"gpu0": split[0], "gpu1": split[1]},
        "v": {"gpu0": H100_TOTAL // 2, "gpu1": H100_TOTAL // 2},
        "c": {"cpu": ram},  # a CPU model's is RAM
    }


def test_measured_memory_replaces_the_formula_on_a_gpu_and_is_kept(tmp_path: Path, tiny_gguf: Path) -> None:
    h100 = (GpuInfo(0, "H100", "nvidia", H100_TOTAL),)
    gpu = ModelSpec(path=str(tiny_gguf), gpu_index=0, n_gpu_layers=-1)
    cpu = ModelSpec(path=str(tiny_gguf))
    models = {"g": (gpu, "llama-server"), "c": (cpu, "llama-server")}
    formula = memory.estimates_for(models, h100)
    kept = memory.MeasuredMemory(tmp_path / "memory.json")
    kept.record(memory.MeasuredMemory.key(gpu, "llama-server"), "gpu0", 2 * 2**30)
    kept.record(memory.MeasuredMemory.key(cpu, "llama-server"), "cpu", 1)  # RSS below the formula
    again = memory.MeasuredMemory(tmp_path / "memory.json")  # the next daemon reads what was kept
    out = memory.estimates_for(models, h100, again)
    assert out["g"] == {"gpu0": int(2 * 2**30 * 1.1)}  # measured, plus the margin
    assert out["c"] == formula["c"]  # RAM: a low RSS never lowers the estimate
    # an alias or idle timeout does not change what a launch takes; n_ctx does
    assert memory.MeasuredMemory.key(gpu.model_copy(update={"aliases": ["x"]}), "llama-server") == \
        memory.MeasuredMemory.key(gpu, "llama-server")
    assert memory.MeasuredMemory.key(gpu.model_copy(update={"n_ctx": 8192}), "llama-server") != \
        memory.MeasuredMemory.key(gpu, "llama-server")


def test_unreadable_gguf_gives_no_estimate_instead_of_a_crash(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF")
    h100 = (GpuInfo(0, "H100", "nvidia", H100_TOTAL),)
    model = ModelSpec(path=str(broken), gpu_index=0, n_gpu_layers=-1)
    assert memory.estimates_for({"b": (model, "llama-server")}, h100) == {}

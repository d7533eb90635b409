"""A stand-in for NVML (the `pynvml` module) with as many GPUs as a test asks for, so the status
page can be checked at a size no test machine has (issue 17: 8 GPUs, 50 models).

Put this directory first on the daemon's PYTHONPATH. `FAKE_NVML_GPUS` is the count,
`FAKE_NVML_GIB` each one's memory, `FAKE_NVML_OTHERS` what processes xgen does not own hold
("3:10" = 10 GiB on GPU 3). Each backend stand-in writes `FAKE_NVML_DIR/<pid>` ("0,1 bytes"): its
devices and the memory it would hold; a process that is gone no longer counts."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

GIB = 1 << 30


class NVMLError(Exception):
    pass


def _count() -> int:
    return int(os.environ.get("FAKE_NVML_GPUS", "8"))


def _total() -> int:
    return int(float(os.environ.get("FAKE_NVML_GIB", "24")) * GIB)


def _others() -> dict[int, int]:
    pairs = (p.split(":") for p in os.environ.get("FAKE_NVML_OTHERS", "").split(",") if p)
    return {int(i): int(float(g) * GIB) for i, g in pairs}


def _processes() -> dict[int, list[tuple[int, int]]]:
    """Each device's live stand-in processes and their memory, split evenly over their devices."""
    out: dict[int, list[tuple[int, int]]] = {}
    folder = Path(os.environ.get("FAKE_NVML_DIR", "/nonexistent"))
    for entry in folder.glob("[0-9]*"):
        pid = int(entry.name)
        try:
            os.kill(pid, 0)
            devices, size = entry.read_text().split()
        except (OSError, ValueError):
            continue
        indices = [int(d) for d in devices.split(",") if d]
        for i in indices:
            out.setdefault(i, []).append((pid, int(size) // len(indices)))
    return out


def nvmlInit() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return _count()


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < _count():
        raise NVMLError(f"no GPU {index}")
    return index


def nvmlSystemGetDriverVersion() -> str:
    return "fake-570.00"


def nvmlDeviceGetName(handle: int) -> str:
    return "NVIDIA GeForce RTX 4090 (test double)"


def nvmlDeviceGetUUID(handle: int) -> str:
    return f"GPU-fake-{handle:04d}"


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    used = _others().get(handle, 0) + sum(size for _, size in _processes().get(handle, []))
    total = _total()
    return SimpleNamespace(total=total, used=min(used, total), free=max(0, total - used))


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=min(100, 7 * len(_processes().get(handle, []))), memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=size) for pid, size in _processes().get(handle, [])]

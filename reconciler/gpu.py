"""GPU facts: a detector chain amdsmi → pynvml → torch (HIP, CUDA) → CPU only.

Each detector is optional: an ImportError or a driver error falls through to the next (logged
once, at debug). torch is only asked in a subprocess, so the daemon never carries it. The chosen
detector and its handles are kept, so a sample every 5 s is cheap.
`XGEN_GPU_DETECTORS` (comma-separated names) restricts the chain, e.g. `cpu` to ignore GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from reconciler.state import GpuInfo

log = logging.getLogger("xgen.gpu")
CHAIN = ("amdsmi", "pynvml", "torch-hip", "torch-cuda", "cpu")


class DetectorUnavailable(Exception):
    """This detector cannot answer on this host (library missing, no driver, no device)."""


@dataclass(frozen=True)
class GpuSnapshot:
    detector: str
    gpus: tuple[GpuInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {"detector": self.detector, "total": len(self.gpus), "gpus": [g.to_json() for g in self.gpus]}


class _Nvml:
    name = "pynvml"

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded…
            raise DetectorUnavailable(f"pynvml: {exc}") from exc
        if count == 0:
            raise DetectorUnavailable("pynvml: no NVIDIA GPU")
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        driver = pynvml.nvmlSystemGetDriverVersion()
        self.driver = driver.decode() if isinstance(driver, bytes) else str(driver)

    def sample(self) -> tuple[GpuInfo, ...]:
        nv = self.nvml
        out = []
        for i, h in enumerate(self.handles):
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                util: float | None = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except nv.NVMLError:
                util = None
            out.append(
                GpuInfo(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(h)),
                    vendor="nvidia",
                    memory_total=int(mem.total),
                    memory_used=int(mem.used),
                    memory_free=int(mem.free),
                    utilization=util,
                    uuid=_text(nv.nvmlDeviceGetUUID(h)),
                    driver=self.driver,
                    detector=self.name,
                )
            )
        return tuple(out)

    def process_memory(self, pids: Iterable[int]) -> dict[int, dict[str, int]]:
        wanted = set(pids)
        used: dict[int, dict[str, int]] = {}
        for i, h in enumerate(self.handles):
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid in wanted and proc.usedGpuMemory is not None:
                    used.setdefault(proc.pid, {})[f"gpu{i}"] = int(proc.usedGpuMemory)
        return used


class _Amdsmi:
    name = "amdsmi"

    def __init__(self) -> None:
        try:
            import amdsmi

            amdsmi.amdsmi_init()
            handles = amdsmi.amdsmi_get_processor_handles()
        except Exception as exc:
            raise DetectorUnavailable(f"amdsmi: {exc}") from exc
        if not handles:
            raise DetectorUnavailable("amdsmi: no AMD GPU")
        self.smi = amdsmi
        self.handles = handles

    def sample(self) -> tuple[GpuInfo, ...]:
        smi = self.smi
        vram = smi.AmdSmiMemoryType.VRAM
        out = []
        for i, h in enumerate(self.handles):
            total = int(smi.amdsmi_get_gpu_memory_total(h, vram))
            used = int(smi.amdsmi_get_gpu_memory_usage(h, vram))
            try:
                util: float | None = float(smi.amdsmi_get_gpu_activity(h)["gfx_activity"])
            except Exception:
                util = None
            out.append(
                GpuInfo(
                    index=i,
                    name=str(smi.amdsmi_get_gpu_asic_info(h).get("market_name", "AMD GPU")),
                    vendor="amd",
                    memory_total=total,
                    memory_used=used,
                    memory_free=total - used,
                    utilization=util,
                    uuid=str(smi.amdsmi_get_gpu_device_uuid(h)),
                    driver=str(smi.amdsmi_get_gpu_driver_info(h).get("driver_version")),
                    detector=self.name,
                )
            )
        return tuple(out)

    def process_memory(self, pids: Iterable[int]) -> dict[int, dict[str, int]]:
        return {}


_TORCH_PROBE = """
import json, torch
hip = bool(getattr(torch.version, "hip", None))
devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] \\
    if torch.cuda.is_available() else []
print(json.dumps({"hip": hip, "devices": [[d.name, d.total_memory] for d in devices]}))
"""


@functools.cache
def _torch_devices() -> tuple[bool, tuple[tuple[str, int], ...]]:
    """(is HIP, [(name, total bytes)]) from torch, asked in a short-lived subprocess: importing
    torch costs ~200 MB of RSS that the daemon would keep for ever."""
    try:
        run = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120)
        found = json.loads(run.stdout.strip().splitlines()[-1])
        return bool(found["hip"]), tuple((str(n), int(t)) for n, t in found["devices"])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise DetectorUnavailable(f"torch: the probe failed: {exc}") from exc


class _Torch:
    """Last resort: names and totals only (used memory would need a CUDA context per GPU)."""

    def __init__(self, hip: bool) -> None:
        self.name = "torch-hip" if hip else "torch-cuda"
        try:
            installed = importlib.util.find_spec("torch") is not None
        except ValueError:  # in sys.modules as None: unusable
            installed = False
        if not installed:
            raise DetectorUnavailable(f"{self.name}: torch is not installed")
        is_hip, self.devices = _torch_devices()
        if is_hip != hip or not self.devices:
            raise DetectorUnavailable(f"{self.name}: no device")
        self.vendor = "amd" if hip else "nvidia"

    def sample(self) -> tuple[GpuInfo, ...]:
        return tuple(
            GpuInfo(index=i, name=name, vendor=self.vendor, memory_total=total, detector=self.name)
            for i, (name, total) in enumerate(self.devices)
        )

    def process_memory(self, pids: Iterable[int]) -> dict[int, dict[str, int]]:
        return {}


_FACTORIES: dict[str, Callable[[], Any]] = {
    "amdsmi": _Amdsmi,
    "pynvml": _Nvml,
    "torch-hip": lambda: _Torch(hip=True),
    "torch-cuda": lambda: _Torch(hip=False),
}


class GpuMonitor:
    """Finds the first detector that answers, then samples through it."""

    def __init__(self, chain: Iterable[str] | None = None) -> None:
        names = chain or [n.strip() for n in os.environ.get("XGEN_GPU_DETECTORS", ",".join(CHAIN)).split(",")]
        self.tried: dict[str, str] = {}
        self._impl: Any = None
        for name in names:
            factory = _FACTORIES.get(name)
            if factory is None:
                break  # "cpu", or an unknown name: stop at CPU only
            try:
                self._impl = factory()
                break
            except DetectorUnavailable as exc:
                self.tried[name] = str(exc)
                log.debug("GPU detector %s unavailable: %s", name, exc)

    @property
    def detector(self) -> str:
        return self._impl.name if self._impl else "cpu"

    def sample(self) -> GpuSnapshot:
        if self._impl is None:
            return GpuSnapshot("cpu", ())
        try:
            return GpuSnapshot(self.detector, self._impl.sample())
        except Exception as exc:  # a driver hiccup must not take the daemon down
            log.warning("GPU sample through %s failed: %s", self.detector, exc)
            return GpuSnapshot(self.detector, ())

    def process_memory(self, pids: Iterable[int]) -> dict[int, dict[str, int]]:
        """GPU memory used per process id and device (`gpu0` …; NVML per-process accounting), where known."""
        if self._impl is None:
            return {}
        try:
            result: dict[int, dict[str, int]] = self._impl.process_memory(pids)
            return result
        except Exception as exc:
            log.debug("per-process GPU memory unavailable: %s", exc)
            return {}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

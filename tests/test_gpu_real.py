"""On a host with an NVIDIA GPU: the real detector chain answers through pynvml, and the
planner's budget uses the real totals. Skipped, with the reason, on CPU-only hosts (CI); the
full GPU run is benchmarks/gpu_smoke.sh (output in docs/gpu_smoke_h100.txt)."""

from __future__ import annotations

import pytest

from reconciler.gpu import GpuMonitor
from reconciler.plan import Observed, plan
from reconciler.spec import parse

MONITOR = GpuMonitor()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(MONITOR.detector == "cpu",
                       reason=f"no GPU on this host (detector chain: {MONITOR.tried or 'restricted to cpu'})"),
]


def test_real_gpus_are_reported() -> None:
    snap = MONITOR.sample()
    assert snap.gpus and snap.detector in ("pynvml", "amdsmi", "torch-cuda", "torch-hip")
    for gpu in snap.gpus:
        assert gpu.memory_total > 2**30 and gpu.name


def test_placement_on_a_gpu_that_is_not_there_is_refused() -> None:
    snap = MONITOR.sample()
    missing = len(snap.gpus)
    spec = parse(f"models:\n  m:\n    path: /m.gguf\n    gpu_index: {missing}\n", "m.yaml", {})
    [error] = plan(spec, Observed(gpus=snap.gpus, detector=snap.detector)).errors
    assert f"GPU {missing} does not exist" in error

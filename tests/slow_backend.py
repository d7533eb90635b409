"""A test double for a backend whose load is slow (issue: vLLM takes 30-70 s): an executable
that takes vLLM's place (`vllm.python`), waits, then answers /health and chat completions.
It only stands in where the real engine's speed is the point; everything else uses real ones."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPT = '''#!{python}
import http.server, json, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
name = sys.argv[sys.argv.index("--served-model-name") + 1]
for done in range(1, 5):  # vLLM's own progress lines, as a real load writes them
    time.sleep({delay} / 4)
    print(f"Loading safetensors checkpoint shards: {{done * 25}}% Completed | {{done}}/4", flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self._send({{"status": "ok"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._send({{"object": "chat.completion", "model": name,
                    "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "slow"}},
                                 "finish_reason": "stop"}}]}})

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def write_slow_backend(directory: Path, delay_s: float) -> tuple[Path, Path]:
    """(the executable to give as `vllm.python`, an HF-looking model directory for `path`)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / f"slow-backend-{delay_s:g}s"
    script.write_text(SCRIPT.format(python=sys.executable, delay=delay_s))
    script.chmod(0o755)
    model = directory / "slow-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return script, model

"""`backend: command`: any server, run from its command line. The server here is the real
llama-server, started by the argv in the file (xgen adds none of its own flags)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemon, pid_alive

from reconciler.drivers.command import CommandDriver
from reconciler.spec import ModelSpec, SpecError, parse

pytestmark = pytest.mark.integration

SERVER = """\
models:
  own:
    backend: command
    path: {{MODEL}}
    command:
      argv: [{binary}, --host, '{{{{host}}}}', --port, '{{{{port}}}}', -m, '{{{{path}}}}', -c, '512',
             --alias, '{{{{name}}}}']
      health: /health
    env: {{{{XGEN_MARK: mine, XGEN_AT: '{{{{host}}}}:{{{{port}}}}'}}}}
    aliases: [default]
    desired: {desired}
active: own
"""


def chat(d: Daemon, model: str) -> dict[str, object]:
    r = d.http.post("/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    answer: dict[str, object] = r.json()
    return answer


def test_a_command_model_loads_on_demand_serves_restarts_and_stops(daemon: Daemon, llama_server: Path) -> None:
    daemon.launch(SERVER.format(binary=llama_server, desired="on_demand"))
    plan = subprocess.run([sys.executable, "-m", "reconciler.cli", "plan", daemon.file.name],
                          cwd=daemon.dir, capture_output=True, text=True)
    assert "own: standby" in plan.stdout, plan.stdout

    assert chat(daemon, "default")["model"] == "own"  # the first request loads it
    model = daemon.model("own")
    assert model is not None and (model["state"], model["backend"]) == ("LOADED", "command")
    assert model["config"] == {"n_ctx": None, "n_gpu_layers": None, "device": "cpu"}  # not xgen's to say
    argv = Path(f"/proc/{model['pid']}/cmdline").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv] == [str(llama_server), "--host", "127.0.0.1", "--port", str(model["port"]),
                                          "-m", str(daemon.vars["MODEL"]), "-c", "512", "--alias", "own"]
    environ = Path(f"/proc/{model['pid']}/environ").read_bytes().split(b"\0")
    assert b"XGEN_MARK=mine" in environ and f"XGEN_AT=127.0.0.1:{model['port']}".encode() in environ
    assert daemon.http.get("/upstream/own/props").status_code == 200  # the server's own endpoints, raw

    pid = model["pid"]
    os.kill(pid, signal.SIGKILL)  # a crash: reported, restarted with the backoff, as any backend
    status = daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "LOADED"
                          and s["loaded_models"][0]["pid"] != pid, 30, "the restart")
    assert status["loaded_models"][0]["last_failure"]["reason"].startswith("process killed by SIGKILL")
    chat(daemon, "own")

    pid = status["loaded_models"][0]["pid"]
    daemon.converged(daemon.write(SERVER.format(binary=llama_server, desired="unloaded").replace("active: own\n", "")))
    assert daemon.model("own") is None and not pid_alive(pid)


def test_a_command_that_exits_at_once_is_an_error_with_its_words(daemon: Daemon) -> None:
    script = daemon.dir / "server.py"
    script.write_text("import sys\nprint('no model here: cannot serve', file=sys.stderr)\nsys.exit(3)\n")
    daemon.write(f"models:\n  own:\n    backend: command\n"
                 f"    command: {{{{argv: [{sys.executable}, {script}, '{{{{port}}}}']}}}}\nactive: own\n")
    daemon.start()
    status = daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "ERROR", 20, "ERROR")
    model = status["loaded_models"][0]
    assert model["error_message"].startswith("exited with code 3 while loading: no model here: cannot serve")
    assert "models.own: the command has no {host}, so the server listens where its own default says" in \
        status["last_plan"]["notes"][0]
    r = daemon.http.post("/v1/chat/completions", json={"model": "own", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("{backend: command}", "models.a.command: backend: command needs `command: {argv: [program, arguments…]}`"),
        ("{backend: command, command: {argv: [srv]}}", "models.a.command: no {port} in argv or env"),
        ("{backend: command, command: {argv: [ollama, serve]}, env: {OLLAMA_HOST: '{host}:{port}'}}", None),
        ("{path: a.gguf, command: {argv: [srv, '{port}']}}",
         "models.a.command: 'command' is for backend: command (any other server)"),
        ("{backend: command, path: a.gguf, command: {argv: [srv, '{port}']}}",
         "models.a.path: xgen passes `path` only as {path}: put {path} in argv where the command takes it"),
        ("{backend: command, command: {argv: [srv, '{port}', '{path}']}}",
         "models.a.command: {path} in argv stands for `path`: set it"),
        ("{backend: command, hf_id: o/m, command: {argv: [srv, '{port}']}}",
         "models.a.hf_id: a command names its model in argv"),
        ("{backend: command, command: {argv: [srv, '{port}'], health: health}}",
         "models.a.command.health: found 'health', expected a path on the server, starting with /"),
        ("{backend: command, command: {argv: [srv, '{port}']}, extra_args: [--port=1]}", None),
    ],
)
def test_a_command_model_is_refused_with_its_line_when_xgen_could_not_run_it(model: str, expected: str | None) -> None:
    if expected is None:  # valid: a command's flags are all its own, none managed by xgen
        parse(f"models:\n  a: {model}\n", "m.yaml", {})
        return
    with pytest.raises(SpecError) as info:
        parse(f"models:\n  a: {model}\n", "m.yaml", {})
    assert "m.yaml:2:" in str(info.value) and expected in str(info.value), str(info.value)


def test_the_command_line_is_filled_in_and_the_health_path_is_the_models() -> None:
    model = ModelSpec.model_validate({
        "backend": "command", "path": "/m/w.bin", "extra_args": ["--verbose"],
        "command": {"argv": ["/bin/srv", "--listen={host}:{port}", "--model", "{path}", "--name", "{name}"]}})
    driver = CommandDriver()
    assert driver.command("whisper", model, 8123) == [
        "/bin/srv", "--listen=127.0.0.1:8123", "--model", "/m/w.bin", "--name", "whisper", "--verbose"]
    assert driver.health_url(8123, model) == driver.alive_url(8123, model) == "http://127.0.0.1:8123/v1/models"


def test_sigterm_during_a_load_says_why_the_load_ended(daemon: Daemon) -> None:
    """The half-started process is stopped, and the reason is the shutdown, not a newer spec."""
    daemon.write(f"models:\n  slow:\n    backend: command\n    command: {{{{argv: [{sys.executable}, -c, "
                 f"'import time; time.sleep(60)', '{{{{port}}}}'], health: /health}}}}\nactive: slow\n")
    daemon.start()
    pid = daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["pid"], 20, "the start")[
        "loaded_models"][0]["pid"]
    assert daemon.stop() == 0
    assert not pid_alive(pid)
    assert "slow: LOADING → UNLOADING (xgen is shutting down)" in daemon.log()

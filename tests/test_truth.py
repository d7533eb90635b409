"""`xgen plan`, `xgen status` and `xgen apply --wait` against a real daemon tell the whole truth:
refused plans, in-place updates, drift, the reason a load failed, unloaded models, memory, ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ONE_MODEL, Daemon

pytestmark = pytest.mark.integration


def xgen(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def metric(d: Daemon, prefix: str) -> float:
    for line in d.http.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_a_refused_plan_is_its_own_state_everywhere(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1024\n    gpu_index: 0\n    n_gpu_layers: -1"))
    status = daemon.until(lambda s: s["status"] == "plan_refused", 10, "plan_refused")
    assert status["plan_errors"] == [
        "models.smollm2.gpu_index: GPU 0 does not exist; GPUs on this host: none (detector: cpu)"
    ]
    assert daemon.model("smollm2")["pid"] == pid  # type: ignore[index]  # nothing was changed
    cli = xgen("status", "models.yaml", cwd=daemon.dir)
    assert "plan refused: models.smollm2.gpu_index: GPU 0 does not exist" in cli.stdout
    wait = xgen("apply", "models.yaml", "--auto-approve", "--wait", "--timeout", "20", cwd=daemon.dir)
    assert wait.returncode == 1 and "GPU 0 does not exist" in wait.stdout + wait.stderr
    for _ in range(3):
        daemon.file.touch()  # more passes: the refusal is logged once, not every pass
        time.sleep(0.3)
    assert daemon.log().count("plan refused, nothing changed") == 1


def test_plan_shows_updates_in_place_and_server_changes(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    changed = daemon.file.read_text().replace("aliases: [default]", "aliases: [default, chat]").replace(
        "stop_grace_s: 5}", "stop_grace_s: 5, api_key: s3cret-key}")
    (daemon.dir / "next.yaml").write_text(changed)
    result = xgen("plan", "next.yaml", "--detailed-exitcode", cwd=daemon.dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "  ~ update in place smollm2: applies without a restart" in result.stdout
    assert '      ~ aliases: ["default"] → ["default", "chat"]' in result.stdout
    assert "  ~ update in place server settings" in result.stdout
    assert "server.api_key: (set) → (changed)" in result.stdout or "server.api_key: null → (changed)" in (
        result.stdout.replace("(set)", "null"))
    assert "s3cret" not in result.stdout + json.dumps(daemon.status())
    as_json = json.loads(xgen("plan", "next.yaml", "--json", cwd=daemon.dir).stdout)
    assert [(a["action"], a["model"]) for a in as_json["actions"]] == [("update", ""), ("update", "smollm2")]
    assert "s3cret" not in json.dumps(as_json)
    unchanged = xgen("plan", "models.yaml", "--detailed-exitcode", cwd=daemon.dir)
    assert unchanged.returncode == 0, unchanged.stdout
    assert "No changes. The running state matches the spec." in unchanged.stdout


def test_the_cli_finds_a_daemon_started_with_port(daemon: Daemon) -> None:
    daemon.write(ONE_MODEL)
    log = (daemon.dir / "daemon.log").open("ab")
    other = daemon.port + 1 if daemon.port < 65000 else daemon.port - 1
    daemon.proc = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "serve", "models.yaml", "--port",
                                    str(other)], cwd=daemon.dir, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = xgen("status", "models.yaml", cwd=daemon.dir)
        if result.returncode == 0 and "LOADED" in result.stdout:
            break
        time.sleep(0.3)
    assert result.returncode == 0 and "smollm2" in result.stdout, result.stderr
    plan = xgen("plan", "models.yaml", cwd=daemon.dir)
    assert f"# compared with the xgen daemon at http://127.0.0.1:{other}" in plan.stdout
    elsewhere = xgen("status", "/nonexistent/models.yaml", cwd=daemon.dir,
                     env={"XGEN_DAEMON": f"http://127.0.0.1:{other}"})
    assert elsewhere.returncode == 0 and "smollm2" in elsewhere.stdout


def test_a_load_failure_says_why_in_status_and_apply_wait(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    broken = daemon.file.read_text().replace("aliases: [default]", "aliases: [default]\n    extra_args: [--bogus-flag]")
    (daemon.dir / "next.yaml").write_text(broken)
    wait = xgen("apply", "next.yaml", "--target", "models.yaml", "--auto-approve", "--wait", "--timeout", "60",
                cwd=daemon.dir)
    assert wait.returncode == 1
    model = daemon.model("smollm2")
    assert model is not None and model["state"] == "LOADED"  # the previous version keeps serving
    assert model["update"]["error"].startswith("update failed: exited with code 1 while loading: ")
    assert "--bogus-flag" in model["update"]["error"]  # llama.cpp's own words, not only "code 1"
    assert "--bogus-flag" in wait.stderr
    status = xgen("status", cwd=daemon.dir)
    assert "--bogus-flag" in status.stdout


def test_status_shows_unloaded_models_memory_and_keeps_ports(daemon: Daemon) -> None:
    body = ONE_MODEL.replace("active: smollm2", "  spare:\n    path: {TINY}\n    desired: unloaded\nactive: smollm2")
    daemon.launch(body)
    status = daemon.status()
    assert status["unloaded_models"] == ["spare"]
    assert ["spare", "unloaded", "(desired)"] in [line.split()[:3] for line in xgen("status", cwd=daemon.dir)
                                                  .stdout.splitlines()]
    model = daemon.until(lambda s: s["loaded_models"][0]["memory"]["measured_bytes"], 15, "a memory sample")
    assert model["loaded_models"][0]["memory"]["measured_bytes"] > 50 * 2**20  # the process tree's RSS
    model = daemon.model("smollm2")
    assert model is not None
    os.kill(model["pid"], 9)
    daemon.until(lambda s, p=model["pid"]: s["loaded_models"][0]["state"] == "LOADED"
                 and s["loaded_models"][0]["pid"] != p, 30, "the restart")
    assert daemon.model("smollm2")["port"] == model["port"]  # type: ignore[index]  # a restart keeps the port


def test_streamed_tokens_are_counted_and_embeddings_need_an_embedding_model(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    before = metric(daemon, 'xgen_tokens_total{kind="completion",model="smollm2"}')
    body = {"stream": True, "max_tokens": 7, "ignore_eos": True, "messages": [{"role": "user", "content": "Go"}],
            "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{daemon.url}/v1/chat/completions",
                                                       json=body) as stream:
        assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
    assert metric(daemon, 'xgen_tokens_total{kind="completion",model="smollm2"}') == before + 7
    r = daemon.http.post("/v1/embeddings", json={"model": "smollm2", "input": "hello"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_type"
    assert "server_type: embedding" in r.json()["error"]["message"]

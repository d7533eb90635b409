"""The fault suite: the real daemon and a real llama-server against what goes wrong in practice.
Hostile and torn saves, crashes and crash loops, unloads and shutdowns with requests in flight,
restarts on an invalid file, stolen ports, and Kubernetes' ConfigMap symlink swap. Each test
asserts what an operator would see: the daemon still up, the same pid, the request answered."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ONE_MODEL, Daemon, pid_alive
from test_spec_faults import billion_laughs

pytestmark = pytest.mark.integration

TWO = """\
models:
  smollm2:
    path: {MODEL}
    n_ctx: 1024
    aliases: [default]
  tiny:
    path: {TINY}
    n_ctx: 256
active: smollm2
"""


def chat(d: Daemon, model: str | None = None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, **extra}
    if model:
        body["model"] = model
    return d.http.post("/v1/chat/completions", json=body)


def pids(d: Daemon) -> dict[str, int]:
    return {m["name"]: m["pid"] for m in d.status()["loaded_models"]}


def state_events(d: Daemon, model: str) -> list[dict[str, Any]]:
    return [e["data"] for e in d.events() if e["kind"] == "state" and e["data"]["model"] == model]


def write_raw(d: Daemon, data: bytes) -> None:
    tmp = d.file.with_name(".raw.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, d.file)


HOSTILE = [
    (b"version: 1\n\xff\xfe garbage\n", "not UTF-8 text"),
    (b"version: 1\nmodels: \x01\n", "is not allowed (special characters are not allowed)"),
    (b"- !!python/object:os.system ls\n", "tag '!!python/object:os.system' is not allowed"),
    (b"a: &a [*a]\n", "(a cycle)"),
    (billion_laughs(), "aliases repeat more than"),
]


def test_hostile_saves_never_stop_serving(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    before = pids(daemon)
    for data, expected in HOSTILE:
        write_raw(daemon, data)
        status = daemon.until(lambda s, e=expected: any(e in p for p in s["spec_error"] or []), 20, expected)
        assert status["status"] == "spec_error" and status["pass_error"] is None
        assert pids(daemon) == before
        assert chat(daemon).status_code == 200
    # the save after the bomb is applied (it used to be stuck behind a pass that never ended)
    generation = daemon.write(ONE_MODEL.replace("aliases: [default]", "aliases: [default, after-the-bomb]"))
    daemon.converged(generation, timeout=10)
    assert chat(daemon, "after-the-bomb").status_code == 200
    assert pids(daemon) == before
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_torn_writes_never_restart_or_unload_a_model(daemon: Daemon) -> None:
    generation = daemon.write(TWO)
    daemon.launch(TWO)
    before = pids(daemon)
    text = daemon.file.read_bytes()
    rng = random.Random(11)
    cuts = sorted(rng.sample(range(1, len(text)), 24))
    for i, cut in enumerate(cuts):
        with daemon.file.open("wb") as f:  # in place, in two pieces, as some editors and scripts do
            f.write(text[:cut])
            f.flush()
            time.sleep((0, 0.01, 0.025, 0.05)[i % 4])
            f.write(text[cut:])
        daemon.converged(generation, timeout=20)
    assert pids(daemon) == before
    for name in before:
        assert [e["to"] for e in state_events(daemon, name)] == ["LOADING", "LOADED"], name
    assert chat(daemon, "tiny").status_code == 200


def test_crash_restarts_follow_the_backoff_exactly(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    for expected in (1, 2, 4):
        pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
        os.kill(pid, 9)
        daemon.until(lambda s, p=pid: (m := s["loaded_models"]) and m[0]["state"] == "LOADED" and m[0]["pid"] != p,
                     30, "the restart")
        events = state_events(daemon, "smollm2")
        error = next(e for e in reversed(events) if e["to"] == "ERROR")
        retry = events[events.index(error) + 1]
        assert retry["to"] == "LOADING" and retry["reason"] == "retry"
        assert error["info"]["retry_at"] - error["info"]["since"] == pytest.approx(expected, abs=0.05)
        # the restart comes when the backoff ends, not at the next 10 s resync
        assert error["info"]["retry_at"] - 0.05 <= retry["info"]["since"] < error["info"]["retry_at"] + 1.5
    assert daemon.status()["crash_looping"] == ["smollm2"]
    assert chat(daemon).status_code == 200


def test_ten_kills_in_a_row_crash_loop_then_recover(daemon: Daemon) -> None:
    server = "server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], backoff_max_s: 1, backoff_reset_s: 60}}\n"
    daemon.launch(server + ONE_MODEL, header=False)
    for _ in range(10):
        pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
        os.kill(pid, 9)
        daemon.until(lambda s, p=pid: (m := s["loaded_models"]) and m[0]["state"] == "LOADED" and m[0]["pid"] != p,
                     30, "the restart")
    status = daemon.status()
    assert status["crash_looping"] == ["smollm2"] and status["loaded_models"][0]["failures"] == 10
    assert 'xgen_model_crash_looping{model="smollm2"} 1.0' in daemon.http.get("/metrics").text
    assert [e["data"]["failures"] for e in daemon.events() if e["kind"] == "crash_loop"] == [3]
    assert daemon.model("smollm2")["restarts"] == 10  # type: ignore[index]
    # staying up for backoff_reset_s clears the count (shortened here by a save: no restart)
    daemon.write(server.replace("backoff_reset_s: 60", "backoff_reset_s: 1") + ONE_MODEL, header=False)
    status = daemon.until(lambda s: not s["crash_looping"], 15, "the failure count to reset")
    assert status["loaded_models"][0]["failures"] == 0
    assert chat(daemon).status_code == 200


HUNG = "server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], hung_after_s: 3}}\n" + ONE_MODEL


def test_a_hung_backend_is_killed_and_restarted(daemon: Daemon) -> None:
    """A process that stops answering without exiting (SIGSTOP: neither /health nor /slots
    answers) is killed after hung_after_s and restarted like a crash; a request sent to it is
    ended, not left waiting."""
    daemon.launch(HUNG, header=False)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(chat, daemon)
        status = daemon.until(
            lambda s: (m := s["loaded_models"]) and m[0]["state"] == "LOADED" and m[0]["pid"] != pid, 30, "the restart"
        )
        assert stuck.result(timeout=10).status_code == 502  # the backend broke off: it was killed under it
    assert not pid_alive(pid)
    error = next(e for e in reversed(state_events(daemon, "smollm2")) if e["to"] == "ERROR")
    assert error["reason"].startswith("hung: answered nothing on /slots for 3 s and used 0.0 CPU s")
    assert error["reason"].endswith("(server.hung_after_s); killed")
    assert status["loaded_models"][0]["restarts"] == 1
    assert status["loaded_models"][0]["last_failure"]["reason"] == error["reason"]  # kept once it serves again
    cli = subprocess.run([sys.executable, "-m", "reconciler.cli", "status", "--daemon", daemon.url],
                         capture_output=True, text=True, timeout=30)
    assert "smollm2: serving again; last failed" in cli.stdout and "hung: answered nothing" in cli.stdout
    assert f"pid {pid} hung: answered nothing on /slots" in daemon.log()
    hung = [e["data"] for e in daemon.events() if e["kind"] == "hung"]
    assert [(e["model"], e["pid"], e["asked"]) for e in hung] == [("smollm2", pid, "/slots")]
    assert 'xgen_model_hangs_total{model="smollm2"} 1.0' in daemon.http.get("/metrics").text
    assert chat(daemon).status_code == 200


def test_a_busy_or_briefly_frozen_backend_is_not_taken_for_hung(daemon: Daemon) -> None:
    """Generating for many clients at once, a pause shorter than hung_after_s is no hang, even
    where the batch it interrupted then keeps the engine from answering past the limit: a
    process that computes is not hung."""
    daemon.launch(HUNG, header=False)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    body = {"messages": [{"role": "user", "content": "Tell me a story about a lighthouse. " * 12}], "max_tokens": 64}
    with ThreadPoolExecutor(12) as pool:
        answers = [pool.submit(daemon.http.post, "/v1/chat/completions", json=body) for _ in range(12)]
        time.sleep(1)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(pid, signal.SIGCONT)
        statuses = [a.result(timeout=120) for a in answers]
    assert all(r.status_code == 200 for r in statuses), ([r.text[:300] for r in statuses], daemon.log()[-3000:])
    time.sleep(4)  # past hung_after_s, idle
    assert daemon.model("smollm2")["pid"] == pid  # type: ignore[index]
    assert [e["to"] for e in state_events(daemon, "smollm2")] == ["LOADING", "LOADED"]


def test_unload_drains_a_stream_in_flight(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    body = {"stream": True, "max_tokens": 150, "ignore_eos": True, "messages": [{"role": "user", "content": "Go"}]}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{daemon.url}/v1/chat/completions",
                                                       json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1024\n    desired: unloaded").replace(
            "active: smollm2\n", ""))
        daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "UNLOADING", 10, "UNLOADING")
        refused = chat(daemon, "smollm2")
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and any('"finish_reason":"length"' in line for line in rest)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert "being unloaded (desired: unloaded)" in refused.json()["error"]["message"]
    daemon.until(lambda s: not s["loaded_models"], 20, "the unload")
    assert not pid_alive(pid)
    assert "SIGKILL" not in daemon.log()


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    assert daemon.proc is not None
    body = {"stream": True, "max_tokens": 150, "ignore_eos": True, "messages": [{"role": "user", "content": "Go"}]}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{daemon.url}/v1/chat/completions",
                                                       json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        daemon.proc.terminate()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert daemon.proc.wait(timeout=40) == 0
    assert not pid_alive(pid)


def test_a_restart_on_an_invalid_file_serves_the_last_good_spec(daemon: Daemon) -> None:
    generation = daemon.write(ONE_MODEL)
    daemon.launch(ONE_MODEL)
    write_raw(daemon, b"models:\n  smollm2: {n_ctx: banana\n")
    daemon.until(lambda s: s["spec_error"], 10, "the spec error")
    assert daemon.stop() == 0
    daemon.start()  # a reboot, a package upgrade, a systemd restart
    status = daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "LOADED", 30, "LOADED")
    assert status["serving"]["source"] == "last_good" and status["serving"]["generation"] == generation
    assert status["status"] == "spec_error" and status["spec_error"]
    assert chat(daemon).status_code == 200
    cli = subprocess.run([sys.executable, "-m", "reconciler.cli", "status", "--daemon", daemon.url],
                         capture_output=True, text=True, timeout=30)
    assert f"serving the last good spec (generation {generation}" in cli.stdout
    assert "serving the last good spec" in daemon.log()
    fixed = daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1536"))
    assert daemon.converged(fixed)["serving"]["source"] == "file"


def test_a_first_start_on_an_invalid_file_refuses(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_bytes(b"models: [\n")
    run = subprocess.run([sys.executable, "-m", "reconciler.cli", "serve", "models.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "models.yaml:2:1: invalid YAML" in run.stderr and "no last good spec kept in" in run.stderr


def test_a_pinned_port_held_by_another_process_is_an_error_until_it_frees(daemon: Daemon) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    daemon.start()
    daemon.write(TWO.replace("    n_ctx: 256\n", f"    n_ctx: 256\n    port: {port}\n"))
    status = daemon.until(lambda s: any(m["state"] == "ERROR" for m in s["loaded_models"]), 20, "ERROR")
    tiny = next(m for m in status["loaded_models"] if m["name"] == "tiny")
    assert tiny["error_message"] == f"port {port} (pinned by the spec) is in use by another process"
    answer = chat(daemon)
    assert answer.status_code == 200, (answer.text, daemon.log()[-3000:])  # the other model serves throughout
    holder.close()
    daemon.until(lambda s: all(m["state"] == "LOADED" for m in s["loaded_models"]), 30, "a retry once the port frees")
    assert daemon.model("tiny")["port"] == port  # type: ignore[index]


def test_configmap_symlink_swap_converges_without_the_resync(daemon: Daemon) -> None:
    """The kubelet's layout: models.yaml → ..data/models.yaml, ..data → ..<timestamp>/; an update
    writes a new timestamped directory and renames a new ..data link over the old one."""
    text = daemon.file.read_text()
    daemon.file.unlink()

    def publish(body: str, stamp: str) -> None:
        version = daemon.dir / f"..{stamp}"
        version.mkdir()
        (version / "models.yaml").write_text(body)
        (daemon.dir / "..data_tmp").symlink_to(version.name)
        os.replace(daemon.dir / "..data_tmp", daemon.dir / "..data")

    publish(text, "2026_11_26_10_00_00.1")
    daemon.file.symlink_to("..data/models.yaml")
    daemon.start()
    daemon.converged(_generation(daemon.file))
    for i, n_ctx in enumerate((1280, 1536, 1792)):
        publish(text.replace("n_ctx: 1024", f"n_ctx: {n_ctx}"), f"2026_11_26_10_00_0{i + 1}.1")
        t0 = time.monotonic()
        daemon.converged(_generation(daemon.file), timeout=9)  # the resync would take 10 s
        assert time.monotonic() - t0 < 9
        assert daemon.model("smollm2")["config"]["n_ctx"] == n_ctx  # type: ignore[index]


def _generation(path: Path) -> str:
    from reconciler.spec import load

    return load(path).generation

"""`xgen serve` with a real llama-server and the real default model: the behaviours an operator
relies on when saving models.yaml."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ONE_MODEL, Daemon, launched, pid_alive

pytestmark = pytest.mark.integration

TWO_MODELS = """\
models:
  smollm2:
    path: {{MODEL}}
    n_ctx: 1024
    aliases: [{aliases}]
  tiny:
    path: {{TINY}}
    n_ctx: 256
active: {active}
"""


def chat(d: Daemon, model: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
    if model:
        body["model"] = model
    r = d.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()
    return result


def loads(d: Daemon, name: str) -> int:
    """How many times `name` entered LOADING (from the metrics)."""
    for line in d.http.get("/metrics").text.splitlines():
        if line.startswith(f'xgen_model_transitions_total{{model="{name}",to="LOADING"}}'):
            return int(float(line.split()[-1]))
    return 0


def test_load_then_chat_completion_answers(daemon: Daemon) -> None:
    status = daemon.launch(ONE_MODEL)
    [model] = status["loaded_models"]
    assert (model["state"], model["backend"], model["config"]["device"]) == ("LOADED", "llama-server", "cpu")
    assert model["endpoint"] == f"http://127.0.0.1:{daemon.low}/v1"
    answer = chat(daemon)
    assert answer["model"] == "smollm2"
    assert answer["choices"][0]["message"]["content"]  # type: ignore[index]
    metrics = daemon.http.get("/metrics").text
    for line in ('xgen_model_state{model="smollm2",state="LOADED"} 1.0',
                 'xgen_proxy_requests_total{model="smollm2",status="200"} 1.0',
                 'xgen_tokens_total{kind="completion",model="smollm2"} 4.0',
                 'xgen_model_load_seconds_count{model="smollm2"} 1.0',
                 'xgen_proxy_inflight_requests{model="smollm2"} 0.0'):
        assert line in metrics, line


def test_n_ctx_change_reloads_once(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    old_pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    status = daemon.converged(daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 2048\n    replace: recreate")))
    model = daemon.model("smollm2")
    assert model is not None and model["config"]["n_ctx"] == 2048
    assert model["pid"] != old_pid and not pid_alive(old_pid)
    assert loads(daemon, "smollm2") == 2  # recreate: stopped, then started (surge: tests/test_replace.py)
    assert status["last_plan"]["actions"] == []  # converged: the confirming pass found nothing to do
    chat(daemon)


def test_active_and_alias_changes_restart_nothing(daemon: Daemon) -> None:
    daemon.launch(TWO_MODELS.format(aliases="default", active="smollm2"))
    pids = {m["name"]: m["pid"] for m in daemon.status()["loaded_models"]}
    assert chat(daemon)["model"] == "smollm2"
    status = daemon.converged(daemon.write(TWO_MODELS.format(aliases="default, chat", active="tiny")))
    assert {m["name"]: m["pid"] for m in status["loaded_models"]} == pids
    assert status["active_model"] == "tiny"
    assert chat(daemon)["model"] == "tiny"  # names no model: the active one
    assert chat(daemon, "chat")["model"] == "smollm2"  # the new alias routes at once
    assert loads(daemon, "smollm2") == loads(daemon, "tiny") == 1


def test_desired_unloaded_stops_the_process(daemon: Daemon) -> None:
    daemon.launch(TWO_MODELS.format(aliases="default", active="smollm2"))
    tiny_pid = daemon.model("tiny")["pid"]  # type: ignore[index]
    spec = TWO_MODELS.format(aliases="default", active="smollm2")
    spec = spec.replace("n_ctx: 256", "n_ctx: 256\n    desired: unloaded")
    daemon.converged(daemon.write(spec))
    assert daemon.model("tiny") is None
    assert not pid_alive(tiny_pid)
    r = daemon.http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503
    assert r.json()["error"]["message"] == "model 'tiny' is not loaded (desired: unloaded)"


def test_invalid_file_keeps_the_old_state_serving(daemon: Daemon) -> None:
    generation = daemon.launch(ONE_MODEL)["observed_generation"]
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: [oops"))
    status = daemon.until(lambda s: s["spec_error"], what="the spec error to show")
    assert status["status"] == "spec_error"
    assert status["spec_error"][0].startswith("models.yaml:6:12: invalid YAML")
    assert "invalid YAML" in status["spec_error"][0]
    assert status["observed_generation"] == generation
    assert daemon.model("smollm2")["pid"] == pid  # type: ignore[index]
    chat(daemon)
    daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1025"))  # valid again: converges
    status = daemon.until(lambda s: not s["spec_error"] and s["status"] == "converged" and
                          s["loaded_models"][0]["config"]["n_ctx"] == 1025, what="recovery")
    assert status["spec_error"] is None


def test_killed_backend_goes_to_error_then_back_to_loaded(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGKILL)
    status = daemon.until(lambda s: s["loaded_models"][0]["state"] == "ERROR", 20, "ERROR")
    assert status["loaded_models"][0]["error_message"].startswith("process killed by SIGKILL after")
    status = daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "LOADED"
                          and s["loaded_models"][0]["pid"] != pid, 30, "the restart")
    assert status["loaded_models"][0]["restarts"] == 1
    chat(daemon)


def test_failing_backend_reports_log_tail_and_backs_off(daemon: Daemon) -> None:
    daemon.write(ONE_MODEL.replace("aliases: [default]", "aliases: [default]\n    extra_args: [--no-such-flag]"))
    daemon.start()
    status = daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "ERROR", 20, "ERROR")
    model = status["loaded_models"][0]
    assert model["error_message"].startswith("exited with code 1 while loading: error: invalid argument")
    assert any("no-such-flag" in line for line in model["log_tail"])
    assert model["retry_at"] > time.time() - 1
    r = daemon.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "model_unavailable"


def test_sigterm_stops_every_child_and_exits_0(daemon: Daemon) -> None:
    status = daemon.launch(TWO_MODELS.format(aliases="default", active="smollm2"))
    pids = [m["pid"] for m in status["loaded_models"]]
    assert daemon.stop() == 0
    assert not any(pid_alive(p) for p in pids)
    assert "no backend left running" in daemon.log()


def test_children_die_with_a_killed_daemon_and_leftovers_are_cleaned(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    assert daemon.proc is not None
    daemon.proc.kill()  # SIGKILL: no chance to clean up
    daemon.proc.wait()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), "the parent-death signal should have stopped the backend"
    daemon.launch(ONE_MODEL)  # a new daemon finds the stale pid file, checks it, and carries on
    assert daemon.model("smollm2")["pid"] != pid  # type: ignore[index]


def test_cleanup_stops_only_verified_leftovers(tmp_path: Path) -> None:
    import asyncio
    import json

    import psutil

    from reconciler.supervisor import cleanup_orphans

    (tmp_path / "pids").mkdir()
    ours = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "301"], start_new_session=True)
    try:
        cases = (("ours", ours, ["sleep", "300"]), ("reused", stranger, ["llama-server", "-m", "x"]))
        for name, proc, argv in cases:
            record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "argv": argv}
            (tmp_path / "pids" / f"{name}.json").write_text(json.dumps(record))
        stopped = asyncio.run(cleanup_orphans(tmp_path, grace_s=5))
        assert stopped == [ours.pid]
        assert ours.wait(timeout=5) == -signal.SIGTERM
        assert stranger.poll() is None  # a pid whose command line does not match is left alone
        assert not list((tmp_path / "pids").iterdir())
    finally:
        stranger.kill()
        ours.kill()


def test_port_held_by_another_process_is_skipped(daemon: Daemon) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", daemon.low))
        squatter.listen()
        status = daemon.launch(ONE_MODEL)
        assert status["loaded_models"][0]["port"] == daemon.low + 1


def test_apply_wait_follows_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    daemon.launch(ONE_MODEL)
    staged = tmp_path / "next.yaml"
    staged.write_text(daemon.file.read_text().replace("n_ctx: 1024", "n_ctx: 512"))
    result = subprocess.run([sys.executable, "-m", "reconciler.cli", "apply", str(staged), "--target",
                             str(daemon.file), "--auto-approve", "--wait", "--timeout", "60"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "~ reload smollm2 (llama-server): replace (" in result.stdout
    assert "~ n_ctx: 1024 → 512" in result.stdout
    assert "converged: generation" in result.stdout
    assert daemon.model("smollm2")["config"]["n_ctx"] == 512  # type: ignore[index]
    plan = subprocess.run([sys.executable, "-m", "reconciler.cli", "plan", str(daemon.file),
                           "--detailed-exitcode"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stdout
    assert "compared with the xgen daemon at" in plan.stdout


def test_truncate_then_write_and_half_written_files_end_in_the_right_state(daemon: Daemon) -> None:
    daemon.launch(ONE_MODEL)
    target = daemon.file.read_text().replace("n_ctx: 1024", "n_ctx: 1536")
    with daemon.file.open("w") as f:  # truncate, then write in two parts with a pause between
        f.write(target[: len(target) // 2])
        f.flush()
        time.sleep(0.3)
        f.write(target[len(target) // 2:])
    from reconciler.spec import load

    daemon.converged(load(daemon.file).generation)
    assert daemon.model("smollm2")["config"]["n_ctx"] == 1536  # type: ignore[index]


def test_reload_drains_a_stream_in_flight(daemon: Daemon) -> None:
    """A save that reloads the model while a stream is running: the stream finishes whole,
    then the old process stops; requests sent meanwhile wait for the new one."""
    import httpx

    daemon.launch(ONE_MODEL)
    old_pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    body = {"stream": True, "max_tokens": 60, "ignore_eos": True, "messages": [{"role": "user", "content": "Go"}]}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{daemon.url}/v1/chat/completions",
                                                       json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        generation = daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 2048"))
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert any('"finish_reason":"length"' in line for line in rest)
    daemon.converged(generation)
    assert daemon.model("smollm2")["pid"] != old_pid  # type: ignore[index]
    chat(daemon)


@pytest.mark.parametrize("way", ["setpriv", "pre-exec hook"])
def test_both_ways_of_setting_the_death_signal_kill_the_child_with_its_parent(way: str) -> None:
    from reconciler.supervisor import pdeathsig_launcher

    launcher = pdeathsig_launcher() if way == "setpriv" else ()
    if way == "setpriv" and not launcher:
        pytest.skip("util-linux setpriv with --pdeathsig is not available here")
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import asyncio, subprocess, sys, time\n"
            "from reconciler.supervisor import spawn_dying_with_us\n"
            "async def main():\n"
            f"    child = await spawn_dying_with_us(['sleep', '300'], {launcher!r}, subprocess.DEVNULL, {{}})\n"
            "    print(child.pid, flush=True)\n"
            "    await asyncio.sleep(300)\n"
            "asyncio.run(main())\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    time.sleep(0.1)  # past the launcher's exec
    assert pid_alive(pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), f"the child outlived its killed parent ({way})"


def test_a_running_backends_log_is_rotated_past_log_max_bytes(tmp_path: Path, default_model: Path, tiny_gguf: Path,
                                                             llama_server: Path) -> None:
    """llama-server logs ~1 KB a request into a file it holds open: past server.log_max_bytes the
    file is copied to .log.1 and emptied while the backend runs on (before, it grew until the
    next restart: hundreds of MB a day under load)."""
    spec = ("server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5, log_max_bytes: 64KiB}}\n"
            + ONE_MODEL)
    with launched(tmp_path, default_model, tiny_gguf, spec, header=False) as d:
        log, kept = tmp_path / ".xgen" / "logs" / "smollm2.log", tmp_path / ".xgen" / "logs" / "smollm2.log.1"
        pid = d.model("smollm2")["pid"]  # type: ignore[index]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        deadline = time.monotonic() + 60
        while not kept.exists() and time.monotonic() < deadline:
            for _ in range(20):
                assert d.http.post("/v1/chat/completions", json=chat).status_code == 200
        assert kept.exists(), d.log()[-2000:]
        assert kept.stat().st_size > 64 * 1024 and "===== xgen: starting smollm2" in kept.read_text()
        assert "log rotated at" in log.read_text() and log.stat().st_size < 64 * 1024
        size = log.stat().st_size
        assert d.http.post("/v1/chat/completions", json=chat).status_code == 200
        assert log.stat().st_size > size  # the backend writes on into the same, emptied file
        lines = d.http.get("/api/logs/smollm2", params={"lines": 50}).json()["lines"]
        assert any("slot" in line for line in lines), lines  # the emptied file's new lines
        assert d.model("smollm2")["pid"] == pid  # type: ignore[index]
        assert "smollm2: log rotated (over 65536 bytes)" in d.log()


def test_sighup_reads_the_file_again_and_ends_nothing(daemon: Daemon) -> None:
    """SIGHUP is a reload by convention (`systemctl reload`, a closed terminal); Python's default
    ended the daemon at once, without a drain, cutting every request in flight."""
    daemon.launch(ONE_MODEL)
    assert daemon.proc is not None
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP: reading models.yaml again" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "SIGHUP: reading models.yaml again" in daemon.log()
    assert daemon.proc.poll() is None and daemon.model("smollm2")["pid"] == pid  # type: ignore[index]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert daemon.http.post("/v1/chat/completions", json=chat).status_code == 200


def test_a_request_right_after_start_on_a_fresh_file_waits_for_it_to_settle(daemon: Daemon) -> None:
    """A daemon started on a file written a moment ago holds its spec back for settle_ms; a
    request meanwhile was answered 503 "no valid models.yaml loaded yet". It waits now."""
    daemon.write("server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], settle_ms: 4000}}\n" + ONE_MODEL,
                 header=False)
    daemon.start()  # answers HTTP within about a second: the file is still settling
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = daemon.http.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_env_and_binary_reach_the_process_and_a_change_of_either_replaces_it(daemon: Daemon,
                                                                              llama_server: Path) -> None:
    """`env` and `llama.binary` per model: in the process's own environment and argv (from /proc);
    a changed value is a launch change (a new process); a binary that is not there is refused
    with its line while the last good process serves on."""
    fork = daemon.dir / "builds" / "fork"
    fork.mkdir(parents=True)
    (fork / "llama-server").symlink_to(llama_server)  # another build, as far as xgen can tell
    spec = ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1024\n    env: {{XGEN_MARK: one, LLAMA_ARG_THREADS_HTTP: 3}}\n"
                             "    llama: {{binary: builds/fork/llama-server}}")
    model = daemon.launch(spec)["loaded_models"][0]
    pid = model["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == str(fork / "llama-server")
    env = proc_environ(pid)
    assert (env["XGEN_MARK"], env["LLAMA_ARG_THREADS_HTTP"], env["CUDA_VISIBLE_DEVICES"]) == ("one", "3", "")
    assert model["spec"]["env"] == {"XGEN_MARK": "one", "LLAMA_ARG_THREADS_HTTP": "3"}
    chat(daemon)

    plan = subprocess.run([sys.executable, "-m", "reconciler.cli", "plan", daemon.file.name],
                          cwd=daemon.dir, capture_output=True, text=True)
    assert "No changes" in plan.stdout, plan.stdout
    changed = spec.replace("XGEN_MARK: one", "XGEN_MARK: two")
    (daemon.dir / "next.yaml").write_text(daemon.file.read_text().replace("XGEN_MARK: one", "XGEN_MARK: two"))
    plan = subprocess.run([sys.executable, "-m", "reconciler.cli", "plan", "next.yaml", "--daemon", daemon.url],
                          cwd=daemon.dir, capture_output=True, text=True)
    assert "env.XGEN_MARK: one → two" in plan.stdout, plan.stdout
    daemon.converged(daemon.write(changed))
    new = daemon.model("smollm2")
    assert new is not None and new["pid"] != pid and not pid_alive(pid)
    assert proc_environ(new["pid"])["XGEN_MARK"] == "two"
    chat(daemon)

    daemon.write(changed.replace("builds/fork/", "builds/gone/"))
    status = daemon.until(lambda s: s["spec_error"], what="the spec error to show")
    assert status["spec_error"] == [f"models.yaml:7:13: models.smollm2.llama.binary: not found: "
                                     f"{daemon.dir / 'builds' / 'gone' / 'llama-server'} (relative paths start at "
                                     "the directory of this file)"], status["spec_error"]
    assert daemon.model("smollm2")["pid"] == new["pid"]  # type: ignore[index]
    chat(daemon)


def test_xgen_events_says_what_happened_and_follows(daemon: Daemon) -> None:
    """A crash and its restart, as an operator reads them after the fact; then a change as it
    happens (--follow)."""
    daemon.launch(ONE_MODEL)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGKILL)
    daemon.until(lambda s: s["loaded_models"] and s["loaded_models"][0]["state"] == "LOADED"
                 and s["loaded_models"][0]["pid"] != pid, 30, "the restart")
    xgen = [sys.executable, "-m", "reconciler.cli", "events", "--daemon", daemon.url]
    shown = subprocess.run(xgen, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    lines = [line.split("  ", 1)[1] for line in shown.stdout.splitlines()]  # the time left out
    assert "smollm2  - → LOADING" in lines
    assert any(line.startswith("smollm2  LOADED → ERROR (process killed by SIGKILL") for line in lines), lines
    assert "smollm2  ERROR → LOADING (retry)" in lines
    assert not any(" progress " in f" {line} " for line in lines)  # load progress only with --all

    follow = subprocess.Popen([*xgen, "-f"], stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(iter(follow.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 30
        while len(seen) < len(lines) and time.monotonic() < deadline:
            time.sleep(0.05)  # the backlog again
        daemon.write(ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1024\n    desired: unloaded").replace(
            "active: smollm2\n", ""))
        while not any("smollm2  LOADED → UNLOADING" in line for line in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("smollm2  LOADED → UNLOADING" in line for line in seen[len(lines):]), seen
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0

"""On-demand models with the real daemon and llama-server: loaded by requests (one load however
many wait), evicted by recency when the budget is full, unloaded when idle, pinned models never
touched, and failures and impossible files answered with reasons."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import psutil
from conftest import Daemon
from lifetimes import alive_at_most
from slow_backend import write_slow_backend

HEADER = "server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5, max_loaded: 3{EXTRA}}}\n"
MODELS = """\
defaults: {{n_ctx: 256, llama: {{threads: 1}}}}
models:
  pinned: {{path: {MODEL}}}
  a: {{path: {MODEL}, desired: on_demand{IDLE}}}
  b: {{path: {MODEL}, desired: on_demand}}
  c: {{path: {MODEL}, desired: on_demand}}
active: pinned
"""


def spec(extra: str = "", idle: str = "") -> str:
    return (HEADER + MODELS).replace("{EXTRA}", extra).replace("{IDLE}", idle)


def ask(url: str, model: str, timeout: float = 60) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def stream(url: str, model: str) -> list[str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def row(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["loaded_models"] if m["name"] == name)


def on_demand(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["on_demand_models"] if m["name"] == name)


def test_concurrent_requests_share_one_load(daemon: Daemon) -> None:
    status = daemon.launch(spec(), header=False)
    assert [m["name"] for m in status["loaded_models"]] == ["pinned"]  # on-demand models wait
    assert {m["name"]: m["residency"] for m in status["on_demand_models"]} == {
        "a": "standby", "b": "standby", "c": "standby"}
    listed = {m["id"]: m["meta"]["resident"] for m in daemon.http.get("/v1/models").json()["data"]}
    assert listed == {"pinned": True, "a": False, "b": False, "c": False}  # clients can pick them
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streamed = pool.submit(stream, daemon.url, "a")  # starts streaming once the load is done
        answers = list(pool.map(lambda _: ask(daemon.url, "a"), range(7)))
    assert [r.status_code for r in answers] == [200] * 7, [r.text for r in answers]
    assert streamed.result()[-1] == "data: [DONE]"
    loads = [e["data"] for e in daemon.events() if e["kind"] == "load" and e["data"]["model"] == "a"]
    assert len(loads) == 1 and loads[0]["cause"] == "demand"
    a = on_demand(daemon.status(), "a")
    assert (a["residency"], a["loaded_because"], a["waiting"]) == ("resident", "demand", 0)
    assert a["swap_s"] >= a["load_s"] > 0
    metrics = daemon.http.get("/metrics").text
    assert 'xgen_model_loads_total{cause="demand",model="a"} 1.0' in metrics
    assert 'xgen_model_swap_seconds_count{model="a"} 1.0' in metrics


def test_eviction_by_recency_never_touches_pinned_models(daemon: Daemon) -> None:
    daemon.launch(spec(), header=False)
    pinned = daemon.model("pinned")["pid"]  # type: ignore[index]
    for name in ("a", "b", "a", "c", "b"):  # room for two beside the pinned one (max_loaded 3)
        response = ask(daemon.url, name)
        assert response.status_code == 200, response.text
    events = daemon.events()
    unloads = [(e["data"]["model"], e["data"]["cause"], e["data"]["reason"]) for e in events if e["kind"] == "unload"]
    assert [(m, c) for m, c, _ in unloads] == [("b", "evict"), ("a", "evict")]  # least recently used each time
    assert unloads[0][2].startswith("evicted for c (idle")
    # never over max_loaded, never two processes of one model
    assert alive_at_most((e["kind"], e["data"]) for e in events) == (3, 1)
    assert daemon.model("pinned")["pid"] == pinned  # type: ignore[index]
    status = daemon.status()
    assert on_demand(status, "a")["unloaded_because"].startswith("evicted for b")
    shown = subprocess.run([sys.executable, "-m", "reconciler.cli", "status", "--daemon", daemon.url],
                           capture_output=True, text=True, timeout=30).stdout
    assert "a: standby (on demand), unloaded: evicted for b (idle" in shown, shown  # whole, after the table
    row = next(line for line in shown.splitlines() if line.startswith("a "))
    assert row.split() == ["a", "standby", "(on", "demand)", "-", "-", "-", "-", "-", "-"], row  # no ERROR: a reason
    assert "b: on demand, loaded for demand" in shown, shown
    assert status["status"] == "converged"
    plan = status["last_plan"]
    assert {o["model"]: o["status"] for o in plan["on_demand"]} == {"a": "standby", "b": "resident", "c": "resident"}


def test_an_idle_model_is_unloaded_and_comes_back_on_the_next_request(daemon: Daemon) -> None:
    daemon.launch(spec(idle=", idle_unload_s: 1"), header=False)
    assert ask(daemon.url, "a").status_code == 200
    status = daemon.until(lambda s: on_demand(s, "a")["residency"] == "standby", 15, "the idle unload")
    assert on_demand(status, "a")["unloaded_because"].startswith("idle for 1 s (idle_unload_s 1)")
    assert 'xgen_model_unloads_total{cause="idle",model="a"} 1.0' in daemon.http.get("/metrics").text
    assert ask(daemon.url, "a").status_code == 200  # loaded again by demand
    assert [m["name"] for m in daemon.status()["loaded_models"] if m["state"] == "LOADED"].count("a") == 1


def test_requests_get_a_failed_load_at_once_and_other_models_keep_serving(daemon: Daemon) -> None:
    broken = spec().replace("  c: {{path: {MODEL}, desired: on_demand}}",
                            "  c: {{path: {MODEL}, desired: on_demand, extra_args: [--no-such-flag]}}")
    daemon.launch(broken, header=False)
    t0 = time.monotonic()
    response = ask(daemon.url, "c")
    assert response.status_code == 503 and time.monotonic() - t0 < 20  # not load_wait_s of silence
    assert "model 'c' failed" in response.json()["error"]["message"]
    assert response.headers["retry-after"]
    assert ask(daemon.url, "a").status_code == 200 and ask(daemon.url, "pinned").status_code == 200


def test_a_file_whose_on_demand_model_can_never_fit_is_refused_and_the_old_one_serves(daemon: Daemon) -> None:
    daemon.launch(spec(), header=False)
    assert ask(daemon.url, "a").status_code == 200
    # the budget holds the pinned model but not one on-demand model beside it
    status = daemon.status()
    pinned = status["last_plan"]["budgets"][0]["pinned"]["pinned"]
    daemon.write(spec(extra=f", budgets: {{{{cpu: {pinned + 1000}}}}}"), header=False)
    status = daemon.until(lambda s: s["status"] == "plan_refused", 15, "the refusal")
    assert any("on demand it needs" in e and "it could never be loaded" in e for e in status["plan_errors"])
    assert ask(daemon.url, "a").status_code == 200 and ask(daemon.url, "pinned").status_code == 200
    t0 = time.monotonic()
    refused = ask(daemon.url, "b")  # not resident: no load comes while the plan is refused
    assert refused.status_code == 503 and time.monotonic() - t0 < 5, refused.text
    assert "the plan is refused" in refused.json()["error"]["message"]


def test_a_waiting_request_sees_the_load_progress(daemon: Daemon) -> None:
    """A slow load (a stand-in that writes vLLM's shard progress lines) shows its progress in
    status and events while the request waits, then the request is answered."""
    script, model = write_slow_backend(daemon.dir / "slow", delay_s=2)
    slow = f"  slow: {{{{path: {model}, backend: vllm, desired: on_demand, vllm: {{{{python: {script}}}}}}}}}\n"
    daemon.launch(spec().replace("active: pinned", slow + "active: pinned"), header=False)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(ask, daemon.url, "slow")
        seen = set()
        while not answer.done():
            row = next((m for m in daemon.status()["loaded_models"] if m["name"] == "slow"), None)
            if row is not None and row["progress"] is not None:
                seen.add(row["progress"])
            time.sleep(0.05)
        assert answer.result().status_code == 200
    assert len(seen) >= 2 and max(seen) >= 0.35, seen  # it moved while the request waited
    steps = [e["data"]["progress"] for e in daemon.events() if e["kind"] == "progress" and e["data"]["model"] == "slow"]
    assert steps == sorted(steps) and steps[-1] >= 0.45, steps  # 25, 50, 75 % of the shards


def test_a_killed_on_demand_backend_is_reported_restarted_and_never_doubled(daemon: Daemon) -> None:
    """kill -9 of a resident on-demand model: ERROR with the signal, a crash event, restarted
    after the backoff (it was in use), serving again; a request in the backoff is answered
    at once with the crash and when it retries; never two processes of the model."""
    daemon.launch(spec(), header=False)
    assert ask(daemon.url, "a").status_code == 200
    pid = daemon.model("a")["pid"]  # type: ignore[index]
    subprocess.run(["kill", "-9", str(pid)], check=True)
    status = daemon.until(lambda s: row(s, "a")["state"] == "ERROR", 10, "the crash")
    crashed = row(status, "a")  # the status that showed it: the restart may follow within the second
    assert "SIGKILL" in crashed["error_message"] and crashed["failures"] == 1
    during = ask(daemon.url, "a")
    if during.status_code == 503:  # inside the backoff: the reason and when to come back
        assert "SIGKILL" in during.json()["error"]["message"] and during.headers["retry-after"]
    else:
        assert during.status_code == 200, during.text
    daemon.until(lambda s: row(s, "a")["state"] == "LOADED", 20, "the restart")
    assert daemon.model("a")["pid"] != pid  # type: ignore[index]
    assert ask(daemon.url, "a").status_code == 200 and ask(daemon.url, "pinned").status_code == 200
    assert any(e["kind"] == "state" and e["data"]["model"] == "a" and e["data"]["to"] == "ERROR"
               for e in daemon.events())
    assert daemon.proc is not None
    backends = [c.cmdline() for c in psutil.Process(daemon.proc.pid).children(recursive=True)]
    assert sum(argv[argv.index("--alias") + 1] == "a" for argv in backends if "--alias" in argv) == 1


def test_loading_messages_stream_the_load_then_the_answer_or_its_failure(daemon: Daemon) -> None:
    """server.loading_messages: a streaming chat request for a model that is not resident opens
    its stream at once with the load as reasoning_content, then the model's own answer; a load
    that fails ends the stream with the error. The answer text never carries the messages."""
    broken = spec(extra=", loading_messages: true").replace(
        "  c: {{path: {MODEL}, desired: on_demand}}",
        "  c: {{path: {MODEL}, desired: on_demand, extra_args: [--no-such-flag]}}")
    daemon.launch(broken, header=False)
    events = [json.loads(line[6:]) for line in stream(daemon.url, "a") if line != "data: [DONE]"]
    reasoning = [e["choices"][0]["delta"].get("reasoning_content") for e in events]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert reasoning[0] == "Loading model a…\n" and "Model a is ready.\n" in reasoning
    assert content and "Loading" not in content  # the model's own tokens follow
    body = {"model": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[0].startswith("data: ") and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert "model 'c' failed" in error["message"]

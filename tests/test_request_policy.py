"""Request policy with the real daemon and llama-server: a concurrency limit with its queue and
429s, parameter rules and variants seen by the backend itself, and a remote model that is a
second xgen daemon (its key never shown, its failure an ERROR that recovers)."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon

LIMITED = """\
models:
  smollm2:
    path: {MODEL}
    n_ctx: 1024
    llama: {{parallel: 4}}
    max_concurrent: 2
    max_queue: QUEUE
active: smollm2
"""
LONG = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64,
        "ignore_eos": True}


def metric(daemon: Daemon, line: str) -> float:
    found = re.search(rf"^{re.escape(line)} (\S+)$", daemon.http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def burst(daemon: Daemon, count: int) -> tuple[list[httpx.Response], float]:
    """`count` requests at once; the most in flight at the backend seen meanwhile."""
    most = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], metric(daemon, 'xgen_proxy_inflight_requests{model="smollm2"}'))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{daemon.url}/v1/chat/completions", json=LONG, timeout=120),
                                range(count)))
    done.set()
    watcher.join()
    return answers, most[0]


def test_max_concurrent_queues_then_refuses_with_429(daemon: Daemon) -> None:
    daemon.launch(LIMITED.replace("QUEUE", "2"))
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    answers, most = burst(daemon, 6)  # 2 run, 2 wait, 2 are refused at once
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 200, 429, 429], [r.text[:200] for r in answers]
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "max_queue 2" in error["message"]
    assert most <= 2
    assert metric(daemon, 'xgen_requests_rejected_total{model="smollm2",reason="queue_full"}') == 2
    # a longer queue, in place (the same process): all six complete, two at a time
    daemon.converged(daemon.write(LIMITED.replace("QUEUE", "10")))
    assert daemon.model("smollm2")["pid"] == pid  # type: ignore[index]
    answers, most = burst(daemon, 6)
    assert [r.status_code for r in answers] == [200] * 6 and 1 <= most <= 2
    assert metric(daemon, 'xgen_queue_wait_seconds_count{model="smollm2"}') >= 4 + 2  # both bursts' waiters


def test_a_client_that_gives_up_leaves_the_queue_at_once(daemon: Daemon) -> None:
    daemon.launch(LIMITED.replace("QUEUE", "5").replace("max_concurrent: 2", "max_concurrent: 1"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{daemon.url}/v1/chat/completions",
                              json={**LONG, "max_tokens": 400}, timeout=120)
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{daemon.url}/v1/chat/completions", json=LONG, timeout=0.5)  # waits, then hangs up
        deadline = time.monotonic() + 2
        while metric(daemon, 'xgen_queue_waiting{model="smollm2"}') and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(daemon, 'xgen_queue_waiting{model="smollm2"}') == 0  # long before queue_timeout_s (30 s)
        assert not running.done()
        assert running.result().status_code == 200


PARAMS = """\
models:
  smollm2:
    path: {MODEL}
    n_ctx: 1024
    params: {{set: {{temperature: 0.25}}, default: {{top_k: 7, top_p: 0.5}}, strip: [seed]}}
    variants: {{hot: {{temperature: HOT}}}}
active: smollm2
"""


def last_params(daemon: Daemon) -> dict[str, Any]:
    """What llama-server itself used for the last request (its /slots, through /upstream)."""
    slots = daemon.http.get("/upstream/smollm2/slots").json()
    used = [s for s in slots if s.get("params")]
    latest: dict[str, Any] = max(used, key=lambda s: s.get("id_task", -1))["params"]
    return latest


def test_parameter_rules_and_variants_reach_the_backend(daemon: Daemon) -> None:
    daemon.launch(PARAMS.replace("HOT", "1.5"))
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1.0, "seed": 42,
            "top_k": 3}
    assert httpx.post(f"{daemon.url}/v1/chat/completions", json={**body, "model": "smollm2"}).status_code == 200
    used = last_params(daemon)
    assert used["temperature"] == pytest.approx(0.25)  # set: over the client's 1.0
    assert used["top_k"] == 3 and used["top_p"] == pytest.approx(0.5)  # default: only what the client left out
    assert used["seed"] != 42  # stripped
    assert httpx.post(f"{daemon.url}/v1/chat/completions", json={**body, "model": "smollm2:hot"}).status_code == 200
    assert last_params(daemon)["temperature"] == pytest.approx(1.5)
    listed = [m["id"] for m in daemon.http.get("/v1/models").json()["data"]]
    assert "smollm2:hot" in listed
    daemon.converged(daemon.write(PARAMS.replace("HOT", "1.2")))  # a variant changes in place
    assert daemon.model("smollm2")["pid"] == pid  # type: ignore[index]
    assert httpx.post(f"{daemon.url}/v1/chat/completions", json={**body, "model": "smollm2:hot"}).status_code == 200
    assert last_params(daemon)["temperature"] == pytest.approx(1.2)


KEY = "xk-remote-0123456789abcdef"
FAR = """\
server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5, api_key: SERVED_KEY}}
models:
  smollm2: {{path: {MODEL}, n_ctx: 512, llama: {{threads: 1}}}}
active: smollm2
"""
NEAR = """\
server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5, remote_check_s: 0.3, backoff_max_s: 1}}
models:
  far: {{backend: remote, url: "http://127.0.0.1:FAR_PORT/v1", remote_model: smollm2, api_key_env: XGEN_TEST_FAR_KEY,
        aliases: [box2]}}
active: far
"""


def test_a_remote_model_is_routed_checked_and_its_key_never_shown(
    daemon: Daemon, tmp_path: Path, default_model: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "far").mkdir()
    far = Daemon(tmp_path / "far", default_model, tiny_gguf)
    try:
        far.launch(FAR.replace("SERVED_KEY", KEY), header=False)
        monkeypatch.setenv("XGEN_TEST_FAR_KEY", KEY)
        status = daemon.launch(NEAR.replace("FAR_PORT", str(far.port)), header=False)
        row = status["loaded_models"][0]
        assert (row["name"], row["state"], row["pid"]) == ("far", "LOADED", None)  # nothing started here
        answer = httpx.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                            json={"model": "box2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert [m["id"] for m in daemon.http.get("/v1/models").json()["data"]] == ["far", "box2"]

        far.stop()  # the remote goes away: ERROR with the reason, requests told why
        daemon.until(lambda s: s["loaded_models"][0]["state"] == "ERROR", 10, "the failed check")
        down = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "far", "messages": []})
        assert down.status_code == 503 and "cannot reach" in down.json()["error"]["message"]
        far.start()  # back: the retry finds it again
        daemon.until(lambda s: s["loaded_models"][0]["state"] == "LOADED", 30, "the recovery")

        far.write(FAR.replace("SERVED_KEY", "another-key"), header=False)  # the key no longer works
        status = daemon.until(lambda s: s["loaded_models"][0]["state"] == "ERROR", 10, "the refused key")
        assert "refused the key in XGEN_TEST_FAR_KEY: HTTP 401" in status["loaded_models"][0]["error_message"]

        shown = [daemon.http.get(p).text for p in ("/api/management/status", "/metrics", "/", "/api/logs/far")]
        shown += [str(e) for e in daemon.events()]
        ours = [p for p in daemon.dir.rglob("*") if p.is_file() and far.dir not in p.parents]
        shown += [p.read_text(errors="replace") for p in ours]
        assert not [text[:200] for text in shown if KEY in text]  # status, plan, events, logs, state dir
    finally:
        far.stop()

"""One owner per model, with the real daemon and llama-server: replacements under traffic lose
nothing, a failed update keeps (or restores) the previous version, a slow load holds back no other
model, and a newer spec supersedes a load in progress."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from conftest import ONE_MODEL, Daemon, pid_alive
from slow_backend import write_slow_backend

pytestmark = pytest.mark.integration
# one thread per llama-server: two of them (old and new, during a surge) fit on two cores
SURGE = ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1024\n    llama: {{threads: 1}}")


class Traffic:
    """Clients sending chat requests (half of them streaming) until stopped; every outcome kept."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.outcomes: list[str] = []  # "ok", or what went wrong
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, stream: bool) -> None:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "Count to five"}], "max_tokens": 8,
                                "stream": stream}
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                try:
                    if stream:
                        with http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                            lines = [line for line in r.iter_lines() if line]
                            whole = r.status_code == 200 and lines[-1] == "data: [DONE]"
                            self.outcomes.append("ok" if whole else f"stream {r.status_code}: {lines[-1:]}")
                    else:
                        r = http.post(f"{self.url}/v1/chat/completions", json=body)
                        self.outcomes.append("ok" if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.outcomes.append(repr(exc))
                if self.outcomes[-1] != "ok":
                    self.outcomes[-1] += f" at {time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}"

    def finish(self) -> list[str]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        return [o for o in self.outcomes if o != "ok"]


def test_surge_replacements_under_traffic_lose_nothing(daemon: Daemon) -> None:
    daemon.launch(SURGE)
    traffic = Traffic(daemon.url)
    pids = {daemon.model("smollm2")["pid"]}  # type: ignore[index]
    for n_ctx in (1536, 1024, 1536, 1024):
        daemon.converged(daemon.write(SURGE.replace("n_ctx: 1024", f"n_ctx: {n_ctx}")))
        pids.add(daemon.model("smollm2")["pid"])  # type: ignore[index]
    failures = traffic.finish()
    assert len(traffic.outcomes) > 8 and failures == [], failures[:5]
    assert len(pids) == 5 and sum(pid_alive(p) for p in pids) == 1
    states = [e["data"]["to"] for e in daemon.events() if e["kind"] == "state"]
    assert states == ["LOADING", "LOADED"]  # four replacements, and the model never left LOADED


def test_a_failed_update_keeps_the_old_version_serving(daemon: Daemon) -> None:
    daemon.launch(SURGE)
    pid = daemon.model("smollm2")["pid"]  # type: ignore[index]
    traffic = Traffic(daemon.url)
    bad = daemon.write(SURGE.replace("aliases: [default]", "aliases: [default]\n    extra_args: [--nope]"))
    # the failure is in the model's row at once; the plan that follows it says so as drift
    status = daemon.until(lambda s: s["loaded_models"][0]["update"]["error"] and any(
        d["model"] == "smollm2" and "serving the previous version" in d["reason"] for d in s["last_plan"]["drift"]),
        20, "the failed update and the plan after it")
    model = status["loaded_models"][0]
    assert model["state"] == "LOADED" and model["pid"] == pid
    assert "invalid argument: --nope" in model["update"]["error"]
    assert status["status"] == "degraded" and status["observed_generation"] != bad
    time.sleep(1)
    assert traffic.finish() == []  # every request answered by the old version meanwhile
    rolled = [e["data"] for e in daemon.events() if e["kind"] == "rolled_back"]
    assert rolled[0]["generation"] == bad and rolled[0]["serving_generation"] == status["observed_generation"]
    metrics = daemon.http.get("/metrics").text
    assert 'xgen_model_update_failed{model="smollm2"} 1.0' in metrics
    assert 'xgen_model_replacements_total{model="smollm2",outcome="failed",strategy="surge"}' in metrics
    reverted = daemon.converged(daemon.write(SURGE), timeout=5)  # going back is converged at once
    assert reverted["loaded_models"][0]["update"]["error"] is None and reverted["loaded_models"][0]["pid"] == pid
    fixed = daemon.write(SURGE.replace("n_ctx: 1024", "n_ctx: 1536"))  # a later save is tried at once
    status = daemon.converged(fixed)
    assert status["loaded_models"][0]["update"]["error"] is None and status["loaded_models"][0]["pid"] != pid


def test_recreate_brings_the_previous_version_back_when_the_new_one_fails(daemon: Daemon) -> None:
    body = ONE_MODEL.replace("n_ctx: 1024", "n_ctx: 1024\n    replace: recreate")
    daemon.launch(body)
    daemon.write(body.replace("aliases: [default]", "aliases: [default]\n    extra_args: [--nope]"))
    status = daemon.until(lambda s: s["loaded_models"][0]["update"]["error"]
                          and s["loaded_models"][0]["state"] == "LOADED", 30, "the rollback")
    assert status["loaded_models"][0]["spec"]["extra_args"] == []  # the previous launch runs again
    assert daemon.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2}).status_code == 200
    rolled = [e["data"] for e in daemon.events() if e["kind"] == "rolled_back"]
    assert rolled and rolled[0]["then"] == "the previous version was started again"


def test_a_slow_load_holds_back_no_other_model(daemon: Daemon) -> None:
    script, model = write_slow_backend(daemon.dir / "slow", delay_s=15)
    daemon.launch(ONE_MODEL)
    slow = f"  slow:\n    path: {model}\n    backend: vllm\n    vllm:\n      python: {script}\n"
    daemon.write(ONE_MODEL.replace("active: smollm2", slow + "active: smollm2"))
    daemon.until(lambda s: any(m["name"] == "slow" and m["state"] == "LOADING" for m in s["loaded_models"]), 10,
                 "the slow load to start")
    t0 = time.monotonic()
    daemon.write(ONE_MODEL.replace("active: smollm2", slow + "  tiny:\n    path: {TINY}\n    n_ctx: 256\n"
                                   "active: smollm2"))
    status = daemon.until(lambda s: any(m["name"] == "tiny" and m["state"] == "LOADED" for m in s["loaded_models"]),
                          10, "the unrelated model")
    assert time.monotonic() - t0 < 5  # not after the 15 s load
    assert next(m for m in status["loaded_models"] if m["name"] == "slow")["state"] == "LOADING"


def test_a_newer_spec_supersedes_a_load_in_progress(daemon: Daemon) -> None:
    script, model = write_slow_backend(daemon.dir / "slow", delay_s=60)
    daemon.launch(ONE_MODEL)
    slow = f"  slow:\n    path: {model}\n    backend: vllm\n    vllm:\n      python: {script}\n"
    daemon.write(ONE_MODEL.replace("active: smollm2", slow + "active: smollm2"))
    status = daemon.until(lambda s: any(m["name"] == "slow" and m["pid"] for m in s["loaded_models"]), 10,
                          "the slow load to start")
    stale = next(m for m in status["loaded_models"] if m["name"] == "slow")["pid"]
    t0 = time.monotonic()
    faster, _ = write_slow_backend(daemon.dir / "fast", delay_s=0.5)
    daemon.write(ONE_MODEL.replace("active: smollm2", slow.replace(str(script), str(faster)) + "active: smollm2"))
    status = daemon.until(lambda s: any(m["name"] == "slow" and m["state"] == "LOADED" for m in s["loaded_models"]),
                          20, "the newer spec")
    assert time.monotonic() - t0 < 10 and not pid_alive(stale)  # the stale load was stopped, not waited for
    reply = daemon.http.post("/v1/chat/completions", json={"model": "slow", "messages": []})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "slow"

"""The observability kit in examples/observability against real parts: Debian's Prometheus scrapes
a live `xgen serve` (real llama-server; NVML is the test double, so the GPU panels have a GPU),
and every PromQL query of the Grafana dashboard returns data through Prometheus' HTTP API."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import Daemon, debian_tool, fake_nvml_env
from net import free_port
from test_faults import TWO

pytestmark = pytest.mark.integration
KIT = Path(__file__).resolve().parent.parent / "examples" / "observability"


def prometheus_tool(name: str) -> str:
    """prometheus or promtool, from Debian's `prometheus` package."""
    found = debian_tool(name, "prometheus")
    if found is None:
        pytest.fail(f"{name} not found: install the distribution's `prometheus` package")
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, the dashboard's variables filled as Grafana would."""
    board = json.loads((KIT / "grafana-dashboard.json").read_text())
    return [(panel["title"], target["expr"].replace("$model", ".*").replace("$__rate_interval", "1m"))
            for panel in board["panels"] for target in panel["targets"]]


@pytest.fixture
def prometheus(tmp_path: Path, daemon: Daemon) -> Iterator[str]:
    binary = prometheus_tool("prometheus")
    promtool = prometheus_tool("promtool")
    check = subprocess.run([promtool, "check", "config", str(KIT / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())  # the shipped file, pointed at this daemon
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{daemon.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    argv = [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(daemon: Daemon, prometheus: str) -> None:
    daemon.env = fake_nvml_env(daemon.dir / "nvml", gpus=1)
    daemon.launch(TWO.replace("n_ctx: 256", "n_ctx: 256\n    max_concurrent: 2"))  # a gated model: the queue panel
    queries = dashboard_queries()
    assert len(queries) >= 15
    missing: list[str] = []
    with httpx.Client(base_url=prometheus, timeout=10) as prom:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for model in ("smollm2", "tiny"):  # traffic between scrapes, so rates and quantiles have data
                r = daemon.http.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
            missing = []
            for title, query in queries:
                answer = prom.get("/api/v1/query", params={"query": query})
                body = answer.json()
                assert body["status"] == "success", (title, query, body)
                if not body["data"]["result"]:
                    missing.append(f"{title}: {query}")
            if not missing:
                break
            time.sleep(1)
    assert not missing, "queries without data:\n" + "\n".join(missing)
    up = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="xgen"}'}).json()["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]
    assert re.search(r'xgen_model_memory_bytes\{device="cpu",kind="estimated",model="tiny"\}',
                     daemon.http.get("/metrics").text)

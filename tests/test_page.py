"""The status page in a real headless Chromium: it renders, and a state change made by saving
models.yaml appears on it without a reload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from conftest import ONE_MODEL, Daemon
from test_activity import SCHEMA as ACTIVITY

pytestmark = [pytest.mark.integration, pytest.mark.browser]
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The distribution's Chromium; installed with apt-get on a fresh root machine (CI)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("Chromium not found: install the distribution's `chromium` package")
    return found


@pytest.fixture
def page(chromium: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 720})
        yield page
        browser.close()


def test_page_renders_and_follows_a_saved_change(daemon: Daemon, page: object) -> None:
    daemon.launch(ONE_MODEL)
    page.goto(daemon.url + "/")  # type: ignore[attr-defined]
    row = page.locator('tr[data-model="smollm2"]')  # type: ignore[attr-defined]
    row.locator("[data-state]").filter(has_text="LOADED").wait_for(timeout=15000)
    page.locator("#overall").filter(has_text="converged").wait_for(timeout=15000)  # type: ignore[attr-defined]
    page.locator("#live").and_(page.locator(".on")).wait_for(timeout=15000)  # type: ignore[attr-defined]
    assert "default" in row.inner_text()
    row.locator("[data-log]").click()  # the model's detail and log, then its new lines live
    page.locator("#log").filter(has_text="llama").wait_for(timeout=15000)  # type: ignore[attr-defined]
    launch = page.locator("#detail [data-launch]").inner_text()  # type: ignore[attr-defined]
    assert "llama-server" in launch and "--port" in launch and "--alias smollm2" in launch
    for _ in range(3):
        daemon.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2})
    page.locator("#log").filter(has_text="print_timing").wait_for(timeout=15000)  # type: ignore[attr-defined]
    series = daemon.http.get("/api/management/activity").json()["models"]["smollm2"]
    jsonschema.validate({"bucket_s": 10, "until": 0, "models": {"smollm2": series}}, ACTIVITY)
    assert series["requests_per_s"][-1] > 0 and series["tokens_per_s"][-1] > 0 and series["p50_ms"][-1]
    # the row's sparklines follow (the page asks every 5 s): the last request rate is no longer 0
    row.locator("[data-activity] svg").first.wait_for(timeout=15000)
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => parseFloat(document.querySelector('[data-activity=\"smollm2\"] [data-requests-per-second]')"
        "?.textContent) > 0", timeout=15000)
    page.evaluate("window.__same_page = true")  # type: ignore[attr-defined]

    two = ONE_MODEL.replace("active: smollm2", "  tiny:\n    path: {TINY}\n    n_ctx: 256\nactive: smollm2")
    daemon.converged(daemon.write(two))
    tiny = page.locator('tr[data-model="tiny"] [data-state]')  # type: ignore[attr-defined]
    tiny.filter(has_text="LOADED").wait_for(timeout=15000)
    assert page.evaluate("window.__same_page") is True  # type: ignore[attr-defined]

    daemon.write(two.replace("n_ctx: 256", "n_ctx: [broken"))
    page.locator("#spec-error-text").filter(has_text="invalid YAML").wait_for(timeout=15000)  # type: ignore[attr-defined]
    assert page.evaluate("window.__same_page") is True  # type: ignore[attr-defined]
    # a crash reaches the timeline live, survives a reload (the backlog is replayed) and filters
    os.kill(daemon.model("tiny")["pid"], signal.SIGKILL)  # type: ignore[index]
    crash = page.locator('#timeline li[data-event="state"]').filter(has_text="tiny: LOADED → ERROR")  # type: ignore[attr-defined]
    crash.first.wait_for(timeout=15000)
    page.reload()  # type: ignore[attr-defined]
    crash.first.wait_for(timeout=15000)
    assert page.locator("#timeline li").first.inner_text() != ""  # type: ignore[attr-defined]
    page.select_option("#timeline-model", "tiny")  # type: ignore[attr-defined]
    models = page.eval_on_selector_all(  # type: ignore[attr-defined]
        "#timeline li", "items => items.map((li) => li.dataset.eventModel)")
    assert models and set(models) == {"tiny"}
    daemon.until(lambda s: daemon.model("tiny")["state"] == "LOADED", 30, "the restart")  # type: ignore[index]
    page.select_option("#timeline-model", "")  # type: ignore[attr-defined]
    shot = ROOT / "docs" / "status-page.png" if os.environ.get("XGEN_UPDATE_SCREENSHOT") else daemon.dir / "page.png"
    page.screenshot(path=str(shot), full_page=True)  # type: ignore[attr-defined]

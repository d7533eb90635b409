"""The status page in a real headless Chromium: it renders, and a state change made by saving
models.yaml appears on it without a reload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import ONE_MODEL, Daemon, debian_tool, fake_nvml_env
from playwright.sync_api import Page
from test_activity import SCHEMA as ACTIVITY

pytestmark = [pytest.mark.integration, pytest.mark.browser]
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The distribution's Chromium; installed with apt-get on a fresh root machine (CI)."""
    found = shutil.which("chromium-browser") or debian_tool("chromium")
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
    shoot(page, daemon, "status-page.png")  # type: ignore[arg-type]


# ---------------------------------------------------------------- a big box: 50 models on 8 GPUs

FAMILIES = ["llama", "qwen", "mistral", "gemma", "phi", "deepseek"]


def big_spec(port: int, low: int, gguf: Path, extra: str = "") -> str:
    """50 models: 40 on 8 GPUs (5 each, contexts of 8k to 64k), 10 on the CPU, a few aliases."""
    # braces doubled: Daemon.write fills {MODEL}-style fields in
    lines = [f"server: {{{{port: {port}, port_range: [{low}, {low + 79}], stop_grace_s: 5}}}}", "models:"]
    for i in range(50):
        ctx = [8192, 16384, 32768, 65536][i % 4]
        lines += [f"  {FAMILIES[i % 6]}-{i:02d}:", f"    path: {gguf}", f"    n_ctx: {ctx}"]
        if i < 40:
            lines += [f"    gpu_index: {i % 8}", "    n_gpu_layers: -1"]
        if i % 7 == 0:
            lines.append(f"    aliases: [{FAMILIES[i % 6]}-latest-{i}]")
    return "\n".join(lines) + extra + "\nactive: llama-00\n"


def device_bars(page: Page) -> dict[str, tuple[int, int]]:
    """Each device's bar: (its total, the sum of its parts) as the page drew them."""
    found = page.eval_on_selector_all(
        "[data-device]", """devices => devices.map((d) => [d.dataset.device, +d.querySelector('.bar').dataset.total,
          [...d.querySelectorAll('.bar [data-bytes]')].reduce((a, s) => a + +s.dataset.bytes, 0)])""")
    return {name: (total, parts) for name, total, parts in found}


def shoot(page: Page, daemon: Daemon, name: str) -> None:
    """A full-page picture; for docs/ (XGEN_UPDATE_SCREENSHOT=1) in 64 colours, which the page's
    few colours survive at a third of the size."""
    shot = daemon.dir / name
    if os.environ.get("XGEN_UPDATE_SCREENSHOT"):  # the test's own directory is no one's path
        page.evaluate("""(dir) => { const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            while (walk.nextNode()) {
              walk.currentNode.nodeValue = walk.currentNode.nodeValue.replaceAll(dir, "/srv/xgen");
            } }""", str(daemon.dir))
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("XGEN_UPDATE_SCREENSHOT"):
        from PIL import Image

        with Image.open(shot) as picture:
            small = picture.convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            small.save(ROOT / "docs" / name, optimize=True)


def test_page_with_50_models_on_8_gpus(tmp_path: Path, page: Page) -> None:
    """Stand-ins for llama-server (50 real engines would not fit a test machine) and for NVML
    (8 GPUs of 24 GiB, 10 GiB of GPU 3 held by someone else); xgen, the page and the browser are real.
    Shoots the four pictures in docs/: a healthy box, a busy one, a refused plan, a crash loop."""
    from stub_llama_server import write_stub_llama_server
    from tinygguf import write_tiny_llama

    stub = write_stub_llama_server(tmp_path / "bin")
    gguf = write_tiny_llama(tmp_path / "tiny.gguf", ctx=131072)
    daemon = Daemon(tmp_path, gguf, gguf)
    daemon.env = {**fake_nvml_env(tmp_path / "nvml", gpus=8, gib=24, others="3:10"), "XGEN_LLAMA_SERVER": str(stub)}
    low = 12000 + (os.getpid() % 50) * 100  # 80 ports of its own, below the ephemeral range
    spec = big_spec(daemon.port, low, gguf)
    try:
        daemon.launch(spec, timeout=180, header=False)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(daemon.url + "/")
        page.locator("#counts").filter(has_text="50 LOADED").wait_for(timeout=15000)
        assert page.locator("#models tr[data-model]").count() == 50
        page.locator('[data-device="cpu"]').wait_for(timeout=15000)
        bars = device_bars(page)
        assert sorted(bars) == ["cpu"] + [f"gpu{i}" for i in range(8)]
        for device, (total, parts) in bars.items():  # every byte of each device accounted for, once
            assert parts == total, (device, total, parts)
        gpu3 = page.locator('[data-device="gpu3"]').inner_text()
        assert "other processes 9." in gpu3 or "other processes 10." in gpu3, gpu3
        assert page.locator('[data-device="gpu0"] .seg.model').count() == 5
        shoot(page, daemon, "status-healthy.png")

        # busy: traffic to eight models; their sparklines and rates move
        busy = [f"{FAMILIES[i % 6]}-{i:02d}" for i in range(8)]
        done = 0
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            for _ in range(12):
                for name in busy:
                    r = client.post("/v1/chat/completions", json={"model": name, "max_tokens": 8,
                                                                   "messages": [{"role": "user", "content": "hi"}]})
                    done += r.status_code == 200
        assert done == 96
        page.wait_for_function(
            "names => names.every((n) => parseFloat(document.querySelector(`[data-activity=\"${n}\"] "
            "[data-tokens-per-second]`)?.textContent) > 0)", arg=busy, timeout=15000)
        shoot(page, daemon, "status-busy.png")

        # refused: one more model that GPU 0 cannot hold; nothing changes, the page says why
        huge = f"\n  huge:\n    path: {gguf}\n    n_ctx: 4194304\n    gpu_index: 0\n    n_gpu_layers: -1"
        daemon.write(big_spec(daemon.port, low, gguf, huge), header=False)
        refused = page.locator("#plan-refused-text")
        refused.filter(has_text="short by").wait_for(timeout=15000)
        assert "GPU 0" in refused.inner_text()
        assert page.locator('[data-device="gpu0"] .short').count() == 1
        assert page.locator("#counts").inner_text().endswith("50 LOADED")
        shoot(page, daemon, "status-refused.png")
        daemon.converged(daemon.write(spec, header=False))

        # a crash loop: the model's engine dies and then fails every restart
        victim = "qwen-07"
        (stub.parent / f"crash-{victim}").touch()
        os.kill(daemon.model(victim)["pid"], signal.SIGKILL)
        row = page.locator(f'tr[data-model="{victim}"]')
        row.locator("[data-crashloop]").wait_for(timeout=30000)
        page.locator(f'[data-error-for="{victim}"]').filter(has_text="exit").wait_for(timeout=15000)
        page.locator('#timeline li[data-event="crash_loop"]').first.wait_for(timeout=15000)
        row.locator("[data-log]").click()
        detail = page.locator("#detail [data-detail-error]")
        detail.filter(has_text="not within the file bounds").wait_for(timeout=15000)
        shoot(page, daemon, "status-crashloop.png")

        # a phone: nothing wider than the screen; the table scrolls in its own box
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        row.locator("[data-crashloop]").wait_for(timeout=15000)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.fill("#model-filter", "qwen")
        shown = page.eval_on_selector_all("#models tr[data-model]", "rows => rows.map((r) => r.dataset.model)")
        assert shown and all(name.startswith("qwen") for name in shown)
    finally:
        daemon.stop()
        daemon.http.close()
    left = subprocess.run(["pgrep", "-f", str(stub)], capture_output=True, text=True).stdout.split()
    assert not left, f"stand-in backends left running: {left}"

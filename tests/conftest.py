"""Shared fixtures: the real llama-server and default model that `xgen install` provides,
tiny GGUF models made on the spot, and a real `xgen serve` daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from net import free_port, poll_status  # tests/ is on sys.path (pytest's rootdir conftest)
from tinygguf import write_tiny_llama

from reconciler.drivers.llama_server import find_binary
from reconciler.install import default_model_path
from reconciler.spec import load


def debian_tool(name: str, *packages: str) -> str | None:
    """`name` on PATH, else installed from Debian's `packages` (default: its own name) with
    apt-get where that can run (as root: a fresh CI machine); None if neither."""
    found = shutil.which(name)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *(packages or (name,))], check=False, capture_output=True,
                       timeout=900)
        found = shutil.which(name)
    return found


@pytest.fixture(scope="session")
def default_model() -> Path:
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the default model is missing at {path}: run `xgen install` (the README's test command does)")
    return path


@pytest.fixture(scope="session")
def llama_server() -> Path:
    binary = find_binary()
    if binary is None:
        pytest.fail("llama-server not found: run `xgen install` (the README's test command does)")
    return binary


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ---------------------------------------------------------------- a real daemon




_next_range = [21000 + (os.getpid() % 200) * 50]


class Daemon:
    """`xgen serve` in a temporary directory, driven by writing its models.yaml."""

    def __init__(self, directory: Path, model: Path, tiny: Path) -> None:
        self.dir = directory
        self.file = directory / "models.yaml"
        self.port = free_port()
        self.low = _next_range[0]
        _next_range[0] += 20
        self.vars = {"MODEL": str(model), "TINY": str(tiny), "PORT": self.port, "LOW": self.low,
                     "HIGH": self.low + 19}
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # on top of the test's own environment
        self.preexec: Callable[[], None] | None = None  # run in the daemon's process before it starts
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, body: str, *, header: bool = True) -> str:
        """Write models.yaml ({MODEL}, {TINY} filled in) atomically; return its generation."""
        text = body.format(**self.vars)
        if header:
            text = "server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5}}\n".format(
                **self.vars) + text
        tmp = self.file.with_name(".models.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.file)
        try:
            return load(self.file).generation
        except Exception:
            return ""

    def start(self) -> None:
        log = (self.dir / "daemon.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "serve", self.file.name],
                                     cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     preexec_fn=self.preexec)
        self.until(lambda s: True, what="the daemon to answer")

    def launch(self, body: str, timeout: float = 60, *, header: bool = True) -> dict[str, Any]:
        """Write models.yaml, start the daemon, and wait until it has converged on that file."""
        self.write(body, header=header)
        self.start()
        return self.converged(self.write(body, header=header), timeout)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/api/management/status").json()
        return result

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["loaded_models"] if m["name"] == name), None)

    def until(self, check: Any, timeout: float = 60, what: str = "a condition") -> dict[str, Any]:
        try:
            passed, last = poll_status(self.http, self.proc, check, timeout)
        except ChildProcessError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None
        if not passed:
            raise AssertionError(f"timed out waiting for {what}; last status: {last}\n{self.log()[-3000:]}")
        return last

    def converged(self, generation: str, timeout: float = 60) -> dict[str, Any]:
        return self.until(lambda s: s["observed_generation"] == generation and s["status"] == "converged",
                          timeout, f"generation {generation}")

    def events(self) -> list[dict[str, Any]]:
        """Every event in the daemon's backlog (read from the SSE stream, then closed)."""
        out: list[dict[str, Any]] = []
        last = self.status()["last_event_id"]
        kind = ""
        with self.http.stream("GET", "/api/events", params={"last_event_id": 0}) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("id: "):
                    current = int(line[4:])
                elif line.startswith("data: "):
                    out.append({"id": current, "kind": kind, "data": json.loads(line[6:])})
                    if current >= last:
                        break
        return out

    def log(self) -> str:
        path = self.dir / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()



@contextlib.contextmanager
def launched(directory: Path, model: Path, tiny: Path, spec: str, **launch: Any) -> Iterator[Daemon]:
    """A daemon launched on `spec` (Daemon.launch's options) and stopped however the block ends."""
    d = Daemon(directory, model, tiny)
    try:
        d.launch(spec, **launch)
        yield d
    finally:
        d.stop()

ONE_MODEL = """\
models:
  smollm2:
    path: {MODEL}
    n_ctx: 1024
    aliases: [default]
active: smollm2
"""


def fake_nvml_env(directory: Path, gpus: int = 8, gib: int = 24, others: str = "") -> dict[str, str]:
    """A daemon environment whose NVML is tests/fake_nvml: `gpus` GPUs of `gib` GiB, `others`
    ("3:10") held by processes xgen does not own, stand-in backends reporting into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent / "fake_nvml"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "XGEN_GPU_DETECTORS": "pynvml", "FAKE_NVML_GPUS": str(gpus),
            "FAKE_NVML_GIB": str(gib), "FAKE_NVML_OTHERS": others, "FAKE_NVML_DIR": str(directory)}


@pytest.fixture
def daemon(tmp_path: Path, default_model: Path, tiny_gguf: Path, llama_server: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, default_model, tiny_gguf)
    d.write(ONE_MODEL)
    yield d
    d.stop()
    d.http.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False

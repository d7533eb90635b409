"""The CLI as a user runs it: exit codes, messages, the published schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from reconciler import __version__
from reconciler.cli import build_parser
from reconciler.plan import Observed, plan
from reconciler.spec import json_schema, parse

ROOT = Path(__file__).resolve().parent.parent


def xgen(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def test_help_lists_the_commands() -> None:
    out = xgen("--help").stdout
    for command in ("validate", "plan", "apply", "serve", "status", "schema", "doctor", "install"):
        assert command in out


def test_schema_file_is_current() -> None:
    published = json.loads((ROOT / "schemas" / "models.schema.json").read_text())
    assert published == json_schema(), "stale: run `xgen schema -o schemas/models.schema.json`"


def test_models_yaml_matches_the_schema_too() -> None:
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "cpu-laptop.yaml").read_text())
    jsonschema.validate(data, json_schema())


def test_validate_default_file(default_model: Path) -> None:
    result = xgen("validate", "models.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("models.yaml: valid (1 model, 1 loaded, generation ")


def test_validate_reports_three_mistakes_with_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a:\n    path: a.gguf\n    bakend: vllm\n    n_ctx: -5\nactive: b\n")
    result = xgen("validate", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"3 problems in {bad}",
        f"{bad}:4:5: models.a.bakend: unknown key 'bakend' (did you mean 'backend'?)",
        f"{bad}:5:5: models.a.n_ctx: input should be greater than or equal to 16 (found -5)",
        f"{bad}:6:1: active: found 'b', expected the name or alias of a model (models: a)",
    ]


def test_validate_without_host_checks(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("models:\n  a:\n    path: /nowhere/a.gguf\n")
    assert xgen("validate", str(f)).returncode == 1
    assert xgen("validate", "--no-host-checks", str(f)).returncode == 0


def test_plan_detailed_exitcode_and_json(default_model: Path, tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"server: {{port: 1}}\nmodels:\n  a:\n    path: {default_model}\n")  # port 1: no daemon there
    text = xgen("plan", str(f), "--detailed-exitcode")
    assert text.returncode == 2, text.stderr
    assert "+ load a (llama-server)" in text.stdout
    assert "Plan: 1 to load, active → a." in text.stdout
    assert xgen("plan", str(f)).returncode == 0
    as_json = xgen("plan", str(f), "--json")
    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    jsonschema.validate(json.loads(as_json.stdout), schema)


def test_plan_of_invalid_file_exits_1(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("models: [\n")
    result = xgen("plan", str(f))
    assert result.returncode == 1
    assert "invalid YAML" in result.stderr


def test_status_without_daemon(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("server: {port: 1}\n")
    result = xgen("status", str(f))
    assert result.returncode == 1
    assert "no xgen daemon answers at http://127.0.0.1:1" in result.stderr


def test_plan_against_a_daemon_estimates_new_gpu_models(tmp_path: Path, tiny_gguf: Path) -> None:
    """The preview refuses a new GPU model that will not fit, using the daemon's GPU facts."""
    import http.server
    import threading

    h100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "vendor": "nvidia", "memory_total": 85_520_809_984,
            "memory_used": 1 << 30, "memory_free": None, "utilization": 0.0, "uuid": None, "driver": None,
            "detector": "pynvml"}
    status = json.dumps({"loaded_models": [], "active_model": None,
                         "gpu_info": {"detector": "pynvml", "total": 1, "gpus": [h100]}}).encode()

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(status)))
            self.end_headers()
            self.wfile.write(status)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        f = tmp_path / "m.yaml"
        f.write_text(f"models:\n  big:\n    path: {tiny_gguf}\n    gpu_index: 0\n    n_gpu_layers: -1\n"
                     "    n_ctx: 100000000\n")
        result = xgen("plan", str(f), "--daemon", f"http://127.0.0.1:{server.server_port}")
        assert result.returncode == 1, result.stdout
        assert "compared with the xgen daemon at" in result.stdout
        assert "Error: GPU 0 (NVIDIA H100 80GB HBM3): the models placed on it need" in result.stdout
        assert "short by" in result.stdout
    finally:
        server.shutdown()


def test_validate_runs_the_daemons_host_checks(tmp_path: Path, tiny_gguf: Path) -> None:
    """A file the daemon would refuse is not `valid`: the Ansible role validates with this."""
    f = tmp_path / "m.yaml"
    f.write_text(f"models:\n  a:\n    path: {tiny_gguf}\n    gpu_index: 0\n    n_gpu_layers: -1\n")
    result = xgen("validate", str(f))
    assert result.returncode == 1 and "valid" not in result.stdout
    assert f"{f}: models.a.gpu_index: GPU 0 does not exist; GPUs on this host: none (detector: cpu)" in result.stderr
    assert xgen("validate", "--no-host-checks", str(f)).returncode == 0


def test_validate_warns_about_a_gpu_model_that_offloads_nothing(tmp_path: Path, tiny_gguf: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"models:\n  a:\n    path: {tiny_gguf}\n    gpu_index: 0\n")
    result = xgen("validate", "--no-host-checks", str(f))
    assert result.returncode == 0  # without host checks there is no plan, so no warning either
    p = plan(parse(f.read_text(), str(f)), Observed())
    assert "gpu_index 0 with n_gpu_layers 0 offloads nothing to the GPU" in p.notes[0]


def test_plan_json_of_an_invalid_file_is_json_with_locations(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("models:\n  a:\n    n_ctx: banana\n")
    result = xgen("plan", str(f), "--json")
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["valid"] is False and out["format_version"] == "3"
    assert {"file": str(f), "line": 3, "column": 5, "field": "models.a.n_ctx",
            "message": "found 'banana', expected an integer"} in out["problems"]


def test_plan_says_loudly_when_no_daemon_answers(default_model: Path, tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"server: {{port: 1}}\nmodels:\n  a:\n    path: {default_model}\n")
    result = xgen("plan", str(f))
    assert "warning: no xgen daemon answers at http://127.0.0.1:1" in result.stderr
    assert result.stdout.startswith("# NO xgen daemon answers at http://127.0.0.1:1: compared with nothing running")


def test_apply_accepts_yes_piped_in(default_model: Path, tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"server: {{port: 1}}\nmodels:\n  a:\n    path: {default_model}\n")
    for answer, code in (("yes\n", 0), ("no\n", 1), ("", 1)):
        run = subprocess.run([sys.executable, "-m", "reconciler.cli", "apply", str(f)], input=answer,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == code, (answer, run.stdout, run.stderr)
        assert "Apply these changes? Only 'yes' is accepted:" in run.stdout


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    run = subprocess.run(f"{sys.executable} -m reconciler.cli --help | head -1", shell=True, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert run.stdout.startswith("usage: xgen") and "Traceback" not in run.stderr


def test_version_and_every_option_has_help() -> None:
    assert xgen("--version").stdout.strip() == f"xgen {__version__}"
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        for option in action._actions:
            assert option.help, f"{action.prog} {option.dest} has no help text"


def test_readme_command_table_matches_the_parser() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    for name, command in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        row = next(line for line in readme.splitlines() if line.startswith(f"| `xgen {name}"))
        for option in command._actions:
            for flag in option.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in row, f"README's row for `xgen {name}` does not mention {flag}"


def test_schema_prints_unless_told_where(tmp_path: Path) -> None:
    result = xgen("schema", cwd=tmp_path)
    assert json.loads(result.stdout)["title"] == "xgen models.yaml"
    assert list(tmp_path.iterdir()) == []

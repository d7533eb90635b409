"""`xgen`: validate | plan | apply | serve | status | schema | doctor | install.

Exit codes are part of the interface: 0 ok (plan: no changes), 1 error, 2 (plan
--detailed-exitcode) changes present.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from reconciler import spec as specmod
from reconciler.plan import Observed, Plan, plan, render_json, render_text

DEFAULT_FILE = "models.yaml"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "models.schema.json"


def _load_or_report(path: str, host_checks: bool = True) -> specmod.Spec | None:
    try:
        if host_checks:
            return specmod.load(path)
        return specmod.parse(Path(path).read_text(encoding="utf-8"), path)
    except specmod.SpecError as exc:
        print(exc, file=sys.stderr)
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
    return None


def _daemon_url(spec: specmod.Spec, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    host = "127.0.0.1" if spec.server.host in ("0.0.0.0", "::") else spec.server.host
    return f"http://{host}:{spec.server.port}"


def _daemon_status(url: str) -> dict[str, Any] | None:
    try:
        resp = httpx.get(f"{url}/api/management/status", timeout=3.0)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result
    except (httpx.HTTPError, ValueError):
        return None


def _observed(spec: specmod.Spec, url: str | None) -> tuple[Observed, str]:
    """The daemon's observed state if one answers, else nothing running on this host; with
    estimates for the spec's GPU models either way, so the preview refuses what will not fit."""
    from reconciler import memory

    target = _daemon_url(spec, url)
    status = _daemon_status(target)
    if status is not None:
        observed = Observed.from_status(status, time.time())
        estimates = {**observed.estimates, **memory.spec_estimates(spec, observed.gpus)}
        return replace(observed, estimates=estimates), f"compared with the xgen daemon at {target}"
    from reconciler.gpu import GpuMonitor

    monitor = GpuMonitor()
    gpus = monitor.sample().gpus
    return (
        Observed({}, None, gpus, monitor.detector, memory.spec_estimates(spec, gpus)),
        f"no xgen daemon at {target}: compared with nothing running",
    )


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        spec = _load_or_report(path, host_checks=not args.no_host_checks)
        if spec is None:
            status = 1
            continue
        loaded = len(spec.loaded)
        print(f"{path}: valid ({len(spec.models)} models, {loaded} loaded, generation {spec.generation})")
    return status


def _make_plan(args: argparse.Namespace) -> tuple[specmod.Spec, Plan, str] | None:
    spec = _load_or_report(args.file)
    if spec is None:
        return None
    observed, against = _observed(spec, args.daemon)
    return spec, plan(spec, observed), against


def cmd_plan(args: argparse.Namespace) -> int:
    made = _make_plan(args)
    if made is None:
        return 1
    _, p, against = made
    if args.json:
        sys.stdout.write(render_json(p))
    else:
        print(f"# {against}")
        sys.stdout.write(render_text(p))
    if p.errors:
        return 1
    return 2 if args.detailed_exitcode and not p.empty else 0


def cmd_apply(args: argparse.Namespace) -> int:
    source = Path(args.file)
    target = Path(args.target) if args.target else source
    made = _make_plan(argparse.Namespace(file=str(source), daemon=args.daemon))
    if made is None:
        return 1
    spec, p, against = made
    print(f"# {against}")
    sys.stdout.write(render_text(p))
    if p.errors:
        return 1
    if not args.auto_approve:
        if not sys.stdin.isatty():
            print("refusing to apply without confirmation: pass --auto-approve", file=sys.stderr)
            return 1
        if input("Apply these changes? Only 'yes' is accepted: ").strip() != "yes":
            print("Apply cancelled.")
            return 1
    if target.resolve() != source.resolve():
        text = source.read_bytes()
        staging = target.with_name(f".{target.name}.xgen-tmp")
        staging.write_bytes(text)
        os.replace(staging, target)  # atomic: the watcher never sees half a file
        print(f"wrote {target}")
    else:
        target.touch()  # same file: nudge the watcher
    if not args.wait:
        return 0
    return _wait_converged(_daemon_url(spec, args.daemon), spec.generation, args.timeout)


def _wait_converged(url: str, generation: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        status = _daemon_status(url)
        if status is not None:
            if status.get("spec_error"):
                print("the daemon reports the file invalid:\n" + "\n".join(status["spec_error"]), file=sys.stderr)
                return 1
            last = status.get("last_pass") or {}
            if status.get("observed_generation") == generation:
                print(f"converged: generation {generation}")
                return 0
            if (
                last.get("generation") == generation
                and not last.get("ok")
                and (last.get("errors") or last.get("failed"))
            ):
                for name in last.get("failed", []):
                    info: dict[str, Any] = next((m for m in status["loaded_models"] if m["name"] == name), {})
                    print(f"{name}: {info.get('error_message')}", file=sys.stderr)
                for error in last.get("errors", []):
                    print(f"plan refused: {error}", file=sys.stderr)
                return 1
        time.sleep(0.2)
    where = "did not answer" if status is None else f"is at {status.get('observed_generation')}"
    print(
        f"timed out after {timeout:.0f} s waiting for generation {generation} (daemon at {url} {where})",
        file=sys.stderr,
    )
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    spec = _load_or_report(args.file, host_checks=False) if Path(args.file).exists() else None
    url = args.daemon or (_daemon_url(spec, None) if spec else "http://127.0.0.1:8000")
    status = _daemon_status(url)
    if status is None:
        print(f"no xgen daemon answers at {url}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"{status['status']}  generation {status['generation']}  observed {status['observed_generation']}  "
        f"active {status['active_model']}"
    )
    serving = status.get("serving") or {}
    if serving.get("source") == "last_good":
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(serving.get("saved_at") or 0))
        print(
            f"serving the last good spec (generation {serving['generation']}, kept from {serving['file']} at {saved})"
        )
    if status.get("pass_error"):
        print(f"a reconcile pass failed (retrying): {status['pass_error']['error']}")
    rows = [("NAME", "STATE", "BACKEND", "PORT", "DEVICE", "UPTIME", "RESTARTS", "ERROR")]
    now = time.time()
    for m in status["loaded_models"]:
        up = f"{now - m['started_at']:.0f}s" if m.get("started_at") and m["state"] == "LOADED" else "-"
        rows.append(
            (
                m["name"],
                m["state"] + (" (crash-looping)" if m.get("crash_looping") else ""),
                m["backend"],
                str(m["port"] or "-"),
                m["config"]["device"],
                up,
                str(m["restarts"]),
                (m["error_message"] or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for problem in status.get("spec_error") or []:
        print(f"spec error: {problem}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(specmod.json_schema(), indent=2) + "\n"
    if args.stdout:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from reconciler.drivers.registry import default_drivers
    from reconciler.gpu import GpuMonitor

    print(f"python: {sys.executable} ({sys.version.split()[0]})")
    for name, driver in default_drivers().items():
        a = driver.availability()
        print(f"{name}: {'ok' if a.ok else 'unavailable'} — {a.detail}")
    monitor = GpuMonitor()
    snap = monitor.sample()
    print(f"gpu detector: {snap.detector} ({len(snap.gpus)} GPU{'s' if len(snap.gpus) != 1 else ''})")
    for g in snap.gpus:
        print(f"  gpu {g.index}: {g.name}, {g.memory_total / 2**30:.1f} GiB, driver {g.driver}")
    for detector, why in monitor.tried.items():
        print(f"  {detector}: {why}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from reconciler import install
    from reconciler.drivers.llama_server import find_binary

    found = find_binary()
    if found is not None and args.flavor == "cpu":
        print(f"llama-server: {found}")
    else:
        print(f"llama-server: {install.build_llama_server(args.flavor, args.jobs)}")
    if not args.no_model:
        print(f"default model: {install.install_default_model()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from reconciler import last_good
    from reconciler.serve import serve, state_dir_for

    file = Path(args.file)
    spec = _load_or_report(args.file)
    if spec is not None:
        directory = state_dir_for(file, spec.server.state_dir, args.state_dir)
        return serve(file, spec, directory, host=args.host, port=args.port)
    try:
        declared = specmod.declared_state_dir(file.read_bytes()[: specmod.MAX_SPEC_BYTES])
    except OSError:
        declared = None
    directory = state_dir_for(file, declared, args.state_dir)
    kept = last_good.load(directory)
    if kept is None:
        print(
            f"xgen serve needs a valid file to start (no last good spec kept in {directory}); fix the problems above",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.file} is invalid: serving the last good spec (generation {kept.spec.generation}, kept from "
        f"{kept.source} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(kept.saved_at))}) until it is fixed",
        file=sys.stderr,
    )
    return serve(file, kept.spec, directory, host=args.host, port=args.port, kept=kept)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xgen",
        description="Declarative control plane for local LLM inference servers. "
        "Describe what should run in models.yaml; xgen makes it so.",
        epilog="Typical: xgen validate → xgen plan → xgen serve (or xgen apply --wait against a running daemon).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check models.yaml files; report every problem with file:line:column")
    p.add_argument("files", nargs="*", default=[DEFAULT_FILE], metavar="FILE")
    p.add_argument(
        "--no-host-checks",
        action="store_true",
        help="skip checks that need this host (model paths exist), e.g. on an Ansible controller",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show what would change (against the running daemon, if any)")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE)
    p.add_argument("--json", action="store_true", help="machine-readable plan (docs/plan-json.md)")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0 no changes, 2 changes, 1 error")
    p.add_argument("--daemon", metavar="URL", help="daemon to compare with (default: the file's server settings)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="show the plan, then put the file in place for the daemon to converge")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE)
    p.add_argument("--target", metavar="PATH", help="the watched models.yaml to replace (default: FILE itself)")
    p.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    p.add_argument("--wait", action="store_true", help="follow the daemon until it converges or an action fails")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S")
    p.add_argument("--daemon", metavar="URL")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("serve", help="run the daemon: watch the file, supervise backends, serve status and /v1")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE)
    p.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: server.port, 8000)")
    p.add_argument("--state-dir", help="logs and pid files (default: server.state_dir, or .xgen beside the file)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="the daemon's models table")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE)
    p.add_argument("--json", action="store_true")
    p.add_argument("--daemon", metavar="URL")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("schema", help="write the JSON schema of models.yaml")
    p.add_argument("-o", "--output", default=str(SCHEMA_PATH))
    p.add_argument("--stdout", action="store_true")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("doctor", help="what this host has for each backend, and GPUs")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install", help="build/cache llama-server and fetch the default model (once; cached)")
    p.add_argument("--flavor", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--jobs", type=int)
    p.add_argument("--no-model", action="store_true")
    p.set_defaults(func=cmd_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "watchfiles"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

"""`xgen`: validate | plan | apply | serve | status | schema | doctor | install.

Exit codes are part of the interface: 0 ok (plan: no changes), 1 error, 2 (plan
--detailed-exitcode) changes present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from reconciler import __version__
from reconciler import spec as specmod
from reconciler.plan import PLAN_FORMAT_VERSION, Observed, Plan, plan, render_json, render_text

DEFAULT_FILE = "models.yaml"


def _load_or_report(path: str, host_checks: bool = True, as_json: bool = False) -> specmod.Spec | None:
    """The spec, or None after printing every problem (as JSON on stdout with `as_json`)."""
    try:
        if host_checks:
            return specmod.load(path)
        return specmod.parse(Path(path).read_text(encoding="utf-8"), path)
    except specmod.SpecError as exc:
        if as_json:
            problems = [dataclasses.asdict(p) for p in exc.problems]
            print(json.dumps({"format_version": PLAN_FORMAT_VERSION, "valid": False, "problems": problems}, indent=2))
        else:
            print(exc, file=sys.stderr)
    except OSError as exc:
        if as_json:
            problem = {"file": path, "line": 0, "column": 0, "field": "", "message": f"cannot read: {exc}"}
            print(json.dumps({"format_version": PLAN_FORMAT_VERSION, "valid": False, "problems": [problem]}))
        else:
            print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
    return None


def _daemon_url(file: str, spec: specmod.Spec | None, override: str | None) -> str:
    """--daemon, else $XGEN_DAEMON, else the address a daemon on this file left in its state dir,
    else the file's server.host and server.port."""
    from reconciler import statedir

    chosen = override or os.environ.get("XGEN_DAEMON")
    if chosen:
        return chosen.rstrip("/")
    declared = spec.server.state_dir if spec else None
    found = statedir.running_daemon(statedir.state_dir_for(Path(file), declared, None))
    if found:
        return found
    server = spec.server if spec else specmod.ServerSettings()
    return statedir.local_url(server.host, server.port)


def _daemon_for(args: argparse.Namespace) -> str:
    """The URL of the daemon a status-reading command asks (`args.file`, `args.daemon`)."""
    spec = _load_or_report(args.file, host_checks=False) if Path(args.file).exists() else None
    return _daemon_url(args.file, spec, args.daemon)


def _no_daemon(url: str) -> int:
    print(f"no xgen daemon answers at {url} (--daemon URL or XGEN_DAEMON to point at one)", file=sys.stderr)
    return 1


def _daemon_status(url: str) -> dict[str, Any] | None:
    try:
        resp = httpx.get(f"{url}/api/management/status", timeout=3.0)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result
    except (httpx.HTTPError, ValueError):
        return None


def _observed(spec: specmod.Spec, url: str | None, file: str) -> tuple[Observed, str | None]:
    """The daemon's observed state if one answers at `url` (and a description of it), else this
    host with nothing running (and None); with estimates for the spec's models either way (the
    memory measured by the daemon of this file included), so the preview refuses what will not fit."""
    import psutil

    from reconciler import memory
    from reconciler.statedir import state_dir_for

    measured = memory.MeasuredMemory(state_dir_for(Path(file), spec.server.state_dir, None) / "memory.json")
    status = _daemon_status(url) if url else None
    if status is not None:
        observed = Observed.from_status(status, time.time())
        estimates = {**observed.estimates, **memory.spec_estimates(spec, observed.gpus, measured)}
        return replace(observed, estimates=estimates), f"compared with the xgen daemon at {url}"
    from reconciler.gpu import GpuMonitor

    monitor = GpuMonitor()
    gpus = monitor.sample().gpus
    fresh = memory.spec_estimates(spec, gpus, measured)
    total = psutil.virtual_memory().total
    return Observed({}, None, gpus, monitor.detector, fresh, None, os.cpu_count() or 1, total), None


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    """The file's own rules, and unless --no-host-checks the same checks of this host the daemon
    makes before acting (model files and programs, GPUs that exist, memory that fits, ports)."""
    status = 0
    for path in args.files:
        spec = _load_or_report(path, host_checks=not args.no_host_checks)
        if spec is None:
            status = 1
            continue
        if not args.no_host_checks:
            observed, _ = _observed(spec, None, path)  # this host with nothing running: what a fresh daemon sees
            p = plan(spec, observed)
            for error in p.errors:
                print(f"{path}: {error}", file=sys.stderr)
            for note in p.notes:
                print(f"{path}: warning: {note}", file=sys.stderr)
            if p.errors:
                status = 1
                continue
        loaded = len(spec.loaded)
        count = len(spec.models)
        print(
            f"{path}: valid ({count} model{'' if count == 1 else 's'}, {loaded} loaded, generation {spec.generation})"
        )
    return status


def _make_plan(file: str, daemon: str | None, as_json: bool = False) -> tuple[specmod.Spec, Plan, str] | None:
    spec = _load_or_report(file, as_json=as_json)
    if spec is None:
        return None
    url = _daemon_url(file, spec, daemon)
    observed, against = _observed(spec, url, file)
    if against is None:
        against = f"NO xgen daemon answers at {url}: compared with nothing running"
        print(
            f"warning: no xgen daemon answers at {url}; this plan compares with nothing running "
            "(start one, or point at it with --daemon URL or XGEN_DAEMON)",
            file=sys.stderr,
        )
    return spec, plan(spec, observed), against


def cmd_plan(args: argparse.Namespace) -> int:
    made = _make_plan(args.file, args.daemon, as_json=args.json)
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
    return 2 if args.detailed_exitcode and not p.matches else 0


def _confirmed() -> bool:
    """'yes' typed at the prompt, or piped in (`yes | xgen apply`, as Terraform accepts)."""
    print("Apply these changes? Only 'yes' is accepted: ", end="", flush=True)
    answer = sys.stdin.readline().strip()
    if not sys.stdin.isatty():
        print(answer)
    return answer == "yes"


def cmd_apply(args: argparse.Namespace) -> int:
    source = Path(args.file)
    target = Path(args.target) if args.target else source
    made = _make_plan(str(source), args.daemon)
    if made is None:
        return 1
    spec, p, against = made
    print(f"# {against}")
    sys.stdout.write(render_text(p))
    if p.errors:
        return 1
    if not args.auto_approve and not _confirmed():
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
    return _wait_converged(_daemon_url(str(target), spec, args.daemon), spec.generation, args.timeout)


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
                    print(f"{name}: {_error(info)}", file=sys.stderr)
                    for line in info.get("log_tail", [])[-5:]:
                        print(f"  | {line}", file=sys.stderr)
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
    url = _daemon_for(args)
    status = _daemon_status(url)
    if status is None:
        return _no_daemon(url)
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
        print(f"serving the last good spec (generation {serving['generation']}, from {serving['file']} at {saved})")
    if status.get("pass_error"):
        print(f"a reconcile pass failed (retrying): {status['pass_error']['error']}")
    for error in status.get("plan_errors") or []:
        print(f"plan refused: {error}")
    rows = [("NAME", "STATE", "BACKEND", "PORT", "DEVICE", "UPTIME", "RESTARTS", "MEMORY", "ERROR")]
    now = time.time()
    for m in status["loaded_models"]:
        up = f"{now - m['started_at']:.0f}s" if m.get("started_at") and m["state"] == "LOADED" else "-"
        measured = m["memory"]["measured_bytes"]
        rows.append(
            (
                m["name"],
                m["state"] + (" (crash-looping)" if m.get("crash_looping") else ""),
                m["backend"],
                str(m["port"] or "-"),
                m["config"]["device"],
                up,
                str(m["restarts"]),
                f"{measured / 2**20:.0f} MiB" if measured else "-",
                _cell(_error(m)),
            )
        )
    for name in status.get("unloaded_models") or []:
        rows.append((name, "unloaded (desired)", "-", "-", "-", "-", "-", "-", ""))
    standby: list[str] = []  # why each standby model is not resident, after the table: a reason, not an error
    for od in status.get("on_demand_models") or []:
        if od["residency"] == "standby":
            refused = od.get("refused") or ""
            rows.append((od["name"], "standby (on demand)", "-", "-", "-", "-", "-", "-", _cell(refused)))
            if len(refused) > 50:
                standby.append(f"{od['name']}: {refused}")
            elif od.get("unloaded_because") and not refused:
                standby.append(f"{od['name']}: standby (on demand), unloaded: {od['unloaded_because']}")
    on_demand = {od["name"]: od for od in status.get("on_demand_models") or []}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for m in status["loaded_models"]:
        if len(_error(m)) > 50:
            print(f"{m['name']}: {_error(m)}")
        elif m["state"] == "LOADED" and (failure := m.get("last_failure")):
            print(f"{m['name']}: serving again; last failed {now - failure['at']:.0f}s ago: {failure['reason']}")
        od = on_demand.get(m["name"])
        if od is not None:
            idle = f", idle unload in {od['idle_unload_in_s']:.0f}s" if od.get("idle_unload_in_s") is not None else ""
            progress = f", loading {m['progress']:.0%}" if m.get("progress") is not None else ""
            print(f"{m['name']}: on demand, loaded for {od.get('loaded_because') or '-'}{idle}{progress}")
    for line in standby:
        print(line)
    for problem in status.get("spec_error") or []:
        print(f"spec error: {problem}")
    return 0


def _cell(text: str, width: int = 50) -> str:
    """A table cell: cut at `width` with … (the whole text is printed after the table)."""
    return text[:width] + ("…" if len(text) > width else "")


def _error(model: dict[str, Any]) -> str:
    """What is wrong with a model: its failure, or a failed update while the old version serves."""
    update = (model.get("update") or {}).get("error")
    if update:
        return f"{update} (the previous version serves)"
    return str(model.get("error_message") or "")


def cmd_logs(args: argparse.Namespace) -> int:
    """A model's backend log from the daemon: its last lines, and with --follow what it writes
    next (until Ctrl-C), with no line missed or repeated between the two."""
    url = _daemon_for(args)
    where = f"{url}/api/logs/{args.model}"
    try:
        if not args.follow:
            resp = httpx.get(where, params={"lines": args.lines}, timeout=10.0)
            if resp.status_code == 200:
                for line in resp.json()["lines"]:
                    print(line)
        else:
            with httpx.stream("GET", where, params={"lines": args.lines, "follow": 1}, timeout=None) as resp:
                if resp.status_code == 200:
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            print(line[6:], flush=True)
    except KeyboardInterrupt:
        return 0
    except (httpx.HTTPError, ValueError, KeyError):
        return _no_daemon(url)
    if resp.status_code == 404:
        print(f"the daemon at {url} has no model '{args.model}' (xgen status lists them)", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"the daemon at {url} answered {resp.status_code} for {args.model}'s log", file=sys.stderr)
        return 1
    return 0


QUIET_EVENTS = frozenset({"gpu", "progress"})  # samples and load progress: many a minute, shown with --all


def event_line(kind: str, data: dict[str, Any]) -> str:
    """One event as a line: when, the model, what happened (a state change as `from → to (why)`)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.get("at") or 0))
    model = str(data.get("model") or "-")
    if kind == "state":
        what = f"{data.get('from') or '-'} → {data.get('to')}" + (f" ({data['reason']})" if data.get("reason") else "")
    else:
        rest = [f"{k}={v}" for k, v in data.items() if k not in ("at", "model") and isinstance(v, str | int | float)]
        what = " ".join([kind, *rest])
    return f"{when}  {model}  {what}"


def cmd_events(args: argparse.Namespace) -> int:
    """The daemon's events (state changes with their reasons, replacements, refusals, spec
    errors): those it keeps, and with --follow the ones that come, until Ctrl-C."""
    url = _daemon_for(args)
    status = _daemon_status(url)
    if status is None:
        return _no_daemon(url)
    last = int(status.get("last_event_id") or 0)  # without --follow: up to this one
    if not last and not args.follow:
        return 0
    kind, current = "", 0
    try:
        with httpx.stream("GET", f"{url}/api/events", params={"last_event_id": 0}, timeout=None) as resp:
            for line in resp.iter_lines():  # SSE frames: id, event, data
                if line.startswith("id: "):
                    current = int(line[4:])
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    if args.all or kind not in QUIET_EVENTS:
                        print(event_line(kind, json.loads(line[6:])), flush=True)
                    if not args.follow and current >= last:
                        break
    except KeyboardInterrupt:
        return 0
    except (httpx.HTTPError, ValueError):
        print(f"the daemon at {url} stopped answering", file=sys.stderr)
        return 1
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(specmod.json_schema(), indent=2) + "\n"
    if not args.output:
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
    from reconciler.serve import serve
    from reconciler.statedir import state_dir_for

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
        epilog="Typical: xgen validate → xgen plan → xgen serve (or xgen apply --wait against a running daemon). "
        "Exit codes: 0 ok, 1 error, 2 changes present (plan --detailed-exitcode).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"xgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    daemon_help = "URL of the daemon (default: $XGEN_DAEMON, else the address a daemon on FILE left in its state dir, "
    daemon_help += "else the file's server.host and server.port)"

    p = sub.add_parser("validate", help="check models.yaml files; report every problem with file:line:column")
    p.add_argument("files", nargs="*", default=[DEFAULT_FILE], metavar="FILE", help="files to check (models.yaml)")
    p.add_argument(
        "--no-host-checks",
        action="store_true",
        help="skip checks that need this host (model files, programs, GPUs, memory), e.g. on an Ansible controller",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show what would change (against the running daemon, if any)")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, help="the desired state (default: models.yaml)")
    p.add_argument("--json", action="store_true", help="machine-readable plan (docs/plan-json.md); errors too")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0 no changes, 2 changes or drift, 1 error")
    p.add_argument("--daemon", metavar="URL", help=daemon_help)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="show the plan, then put the file in place for the daemon to converge")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, help="the desired state (default: models.yaml)")
    p.add_argument("--target", metavar="PATH", help="the watched models.yaml to replace (default: FILE itself)")
    p.add_argument("--auto-approve", action="store_true", help="do not ask (piping 'yes' in works too)")
    p.add_argument("--wait", action="store_true", help="follow the daemon until it converges or an action fails")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up waiting after S seconds")
    p.add_argument("--daemon", metavar="URL", help=daemon_help)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("serve", help="run the daemon: watch the file, supervise backends, serve status and /v1")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, help="the desired state to watch (default: models.yaml)")
    p.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: server.port, 8000)")
    p.add_argument(
        "--state-dir", help="logs, pid files, the last good spec (default: server.state_dir, or .xgen beside the file)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="the daemon's models table")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, help="finds the daemon serving this file")
    p.add_argument("--json", action="store_true", help="the status API's JSON")
    p.add_argument("--daemon", metavar="URL", help=daemon_help)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a model's backend log: its last lines, -f to follow")
    p.add_argument("model", help="the model's name")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, help="finds the daemon serving this file")
    p.add_argument("-n", "--lines", type=int, default=100, help="how many of its last lines (at most 2000)")
    p.add_argument("-f", "--follow", action="store_true", help="then what it writes next, until Ctrl-C")
    p.add_argument("--daemon", metavar="URL", help=daemon_help)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("events", help="what happened: state changes with their reasons, replacements, refusals")
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, help="finds the daemon serving this file")
    p.add_argument("-f", "--follow", action="store_true", help="then the ones that come, until Ctrl-C")
    p.add_argument("--all", action="store_true", help="GPU samples and load progress too")
    p.add_argument("--daemon", metavar="URL", help=daemon_help)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("schema", help="print (or write) the JSON schema of models.yaml")
    p.add_argument(
        "-o", "--output", metavar="PATH", help="write it there (the repo's copy: schemas/models.schema.json)"
    )
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("doctor", help="what this host has for each backend, and GPUs")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install", help="build/cache llama-server and fetch the default model (once; cached)")
    p.add_argument("--flavor", choices=["cpu", "cuda"], default="cpu", help="llama-server build (cuda: set CUDAARCHS)")
    p.add_argument("--jobs", type=int, help="parallel build jobs (default: the number of cores)")
    p.add_argument("--no-model", action="store_true", help="do not fetch the default model")
    p.set_defaults(func=cmd_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is not cmd_serve:
        # `xgen status | head -1`: a closed pipe ends the program quietly, as it does for other
        # tools. Never in the daemon: there a peer that closes a socket mid-write (a backend that
        # refuses an upload) would kill it with SIGPIPE instead of raising an error
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
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

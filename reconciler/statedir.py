"""Where a daemon keeps its state for a models.yaml, and how the CLI finds a running daemon.

The state dir is `--state-dir`, else the file's `server.state_dir`, else `.xgen` beside the file.
A running daemon leaves its address there (`daemon.json`), so `xgen status | plan | apply` on the
same file find it even when it was started with `--port`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DAEMON_FILE = "daemon.json"


def state_dir_for(file: Path, declared: str | None, override: str | None) -> Path:
    """--state-dir, else the file's `server.state_dir`, else `.xgen` beside the file."""
    chosen = override or declared
    if chosen:
        path = Path(chosen).expanduser()
        return path if path.is_absolute() else file.resolve().parent / path
    return file.resolve().parent / ".xgen"


def local_url(host: str, port: int) -> str:
    """Where a client on this host reaches a server listening on `host` (any address → loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def write_address(state_dir: Path, url: str, file: Path) -> None:
    tmp = state_dir / f".{DAEMON_FILE}.tmp"
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "file": str(file)}))
    os.replace(tmp, state_dir / DAEMON_FILE)


def remove_address(state_dir: Path) -> None:
    (state_dir / DAEMON_FILE).unlink(missing_ok=True)


def running_daemon(state_dir: Path) -> str | None:
    """The URL a daemon using `state_dir` left, if that daemon's process still runs."""
    try:
        record = json.loads((state_dir / DAEMON_FILE).read_text())
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(record["url"])

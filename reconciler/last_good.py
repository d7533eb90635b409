"""The last good spec, kept in the state dir so that a daemon restarted on an invalid file
(a reboot, a package upgrade, a systemd restart) still serves what ran before, and says so.

Written atomically (temporary file, fsync, rename): a crash mid-write leaves the previous copy.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from reconciler.spec import Spec

FILE = "last-good.json"


@dataclass(frozen=True)
class Kept:
    spec: Spec
    source: str  # the models.yaml it came from, as the operator named it
    saved_at: float


def save(state_dir: Path, spec: Spec, source: str) -> None:
    record = {
        "generation": spec.generation,
        "source": source,
        "saved_at": time.time(),
        "spec": spec.model_dump(mode="json"),
    }
    path = state_dir / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    with tmp.open("w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(state_dir: Path) -> Kept | None:
    """The kept spec, or None when there is none (or it cannot be read: it is only a fallback)."""
    try:
        record = json.loads((state_dir / FILE).read_text())
        return Kept(Spec.model_validate(record["spec"]), str(record["source"]), float(record["saved_at"]))
    except (OSError, ValueError, KeyError, TypeError, ValidationError):
        return None

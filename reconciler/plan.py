"""The pure planner: `plan(spec, observed) -> Plan`, and its text and JSON renderings.

No clocks, no I/O, no logging. `xgen plan` prints exactly what the daemon would execute.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from reconciler.demand import Candidate, Decision, Room, Usage, decide, devices_of, gib
from reconciler.spec import LoraAdapter, ModelSpec, ServerSettings, Spec, size_of
from reconciler.state import GpuInfo, ModelState, placement, shown_argv

PLAN_FORMAT_VERSION = "3"
Cause = Literal["spec", "demand", "idle", "evict"]
ActionKind = Literal["unload", "remove_adapter", "reload", "load", "add_adapter", "update", "activate"]
_ORDER: dict[str, int] = {
    "unload": 0,
    "remove_adapter": 1,
    "reload": 2,
    "load": 3,
    "add_adapter": 4,
    "update": 5,
    "activate": 6,
}
# Backends that add and remove LoRA adapters at run time (vLLM with runtime updating enabled).
RUNTIME_ADAPTERS = frozenset({"vllm"})
# Fields whose change never needs the process restarted: routing reads them from the spec.
NO_RESTART = frozenset(
    {
        "aliases",
        "desired",
        "idle_unload_s",
        "ready_timeout_s",
        "replace",
        # request policy: the proxy reads it from the spec on every request
        "max_concurrent",
        "max_queue",
        "queue_timeout_s",
        "params",
        "variants",
    }
)
# Server settings that only a restart of `xgen serve` changes (where it listens, keeps state).
DAEMON_RESTART = frozenset({"host", "port", "state_dir"})


@dataclass(frozen=True)
class ObservedModel:
    """A model as it runs now: the spec it was launched with and how it is doing."""

    spec: ModelSpec
    backend: str
    state: ModelState
    failures: int = 0
    retry_due: bool = True
    error: str | None = None
    failed_target: ModelSpec | None = None  # a replacement to this spec failed; the old one serves
    update_retry_due: bool = True
    update_error: str | None = None


@dataclass(frozen=True)
class Observed:
    """What actually is: running models, the active model, and host facts."""

    models: Mapping[str, ObservedModel] = field(default_factory=dict)
    active: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    detector: str = "cpu"
    estimates: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # bytes per device, by model
    server: Mapping[str, Any] | None = None  # the running server settings (server_view), if known
    cpu_count: int = 1  # the host's cores: whether two CPU processes of a model can run at once
    ram_total: int = 0  # the host's RAM (bytes): the CPU budget; 0: unknown, not checked
    usage: Mapping[str, Usage] = field(default_factory=dict)  # on-demand models' requests, by name
    now: float = 0.0  # the time the usage is measured against (idle unload)

    @classmethod
    def from_status(cls, status: Mapping[str, Any], now: float) -> Observed:
        """Rebuild the daemon's observed state from its status JSON (what `xgen plan` compares to)."""
        models = {
            m["name"]: ObservedModel(
                ModelSpec.model_validate(m["spec"]),
                m["backend"],
                ModelState(m["state"]),
                m.get("failures", 0),
                (m.get("retry_at") or 0) <= now,
                m.get("error_message"),
                ModelSpec.model_validate(m["update"]["target"]) if (m.get("update") or {}).get("target") else None,
                ((m.get("update") or {}).get("retry_at") or 0) <= now,
                (m.get("update") or {}).get("error"),
            )
            for m in status.get("loaded_models", [])
            if m.get("spec") is not None and m["state"] != ModelState.GONE.value
        }
        gpu = status.get("gpu_info") or {}
        gpus = tuple(GpuInfo(**g) for g in gpu.get("gpus", []))
        return cls(
            models,
            status.get("active_model"),
            gpus,
            gpu.get("detector", "cpu"),
            {
                m["name"]: m["memory"]["estimated"]
                for m in status.get("loaded_models", [])
                if m.get("memory", {}).get("estimated")
            },
            status.get("server"),
            int(status.get("cpu_count") or 1),
            int((status.get("host") or {}).get("ram_total_bytes") or 0),
            {name: Usage(**u) for name, u in (status.get("demand") or {}).items()},
            now,
        )


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        if _long_list(self.old) and _long_list(self.new) and max(len(self.old), len(self.new)) > LIST_SHOWN_WHOLE:
            return f"{self.field}: {_list_edits(self.old, self.new)}"
        return f"{self.field}: {_show(self.old)} → {_show(self.new)}"


LIST_SHOWN_WHOLE = 4  # a longer list (a command line) is shown by its edits, each after the element before it


def _long_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str | int | float) for x in value)


def _list_edits(old: list[Any], new: list[Any]) -> str:
    """`600 → 700 after -c; + --verbose after 1`: what changed in a list, not the whole of it twice."""
    edits = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        gone, came = " ".join(_show(x) for x in old[i1:i2]), " ".join(_show(x) for x in new[j1:j2])
        edit = {"replace": f"{gone} → {came}", "delete": f"- {gone}", "insert": f"+ {came}"}[op]
        edits.append(edit + (f" after {_show(old[i1 - 1])}" if i1 else " at the start"))
    return "; ".join(edits)


@dataclass(frozen=True)
class Action:
    """One step. `reason` is for people only; nothing branches on it."""

    kind: ActionKind
    model: str
    reason: str
    backend: str = ""
    spec: ModelSpec | None = None
    changes: tuple[Change, ...] = ()
    adapter: LoraAdapter | None = None
    strategy: Literal["surge", "recreate"] | None = None  # how a reload replaces the process
    cause: Cause = "spec"  # why a model is loaded or unloaded

    def order(self) -> tuple[int, str, str]:
        return (_ORDER[self.kind], self.model, self.adapter.name if self.adapter else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.kind,
            "model": self.model,
            "backend": self.backend or None,
            "reason": self.reason,
            "changes": [{"field": c.field, "old": c.old, "new": c.new} for c in self.changes],
            "adapter": self.adapter.model_dump(mode="json") if self.adapter else None,
            "strategy": self.strategy,
            "cause": self.cause,
        }


@dataclass(frozen=True)
class Drift:
    """A model that does not run as specified, with nothing to do about it in this plan (it is
    loading, waiting out a backoff, or has exhausted server.max_restarts)."""

    model: str
    state: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "state": self.state, "reason": self.reason}


@dataclass(frozen=True)
class Standing:
    """An on-demand model's place in this plan: resident (kept or loading for requests), standby
    (available, not resident) or refused (requests wait for it, nothing can make room)."""

    model: str
    status: Literal["resident", "standby", "queued", "refused", "unloading"]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    generation: str
    actions: tuple[Action, ...] = ()
    notes: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    budgets: tuple[dict[str, Any], ...] = ()
    drift: tuple[Drift, ...] = ()
    on_demand: tuple[Standing, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to execute (there may still be drift that time resolves)."""
        return not self.actions

    @property
    def matches(self) -> bool:
        """The running state is the spec: no action and no drift (`xgen plan` exit 0)."""
        return not self.actions and not self.drift

    def to_json(self) -> dict[str, Any]:
        counts = {kind: sum(a.kind == kind for a in self.actions) for kind in _ORDER}
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "generation": self.generation,
            "actions": [a.to_json() for a in self.actions],
            "notes": list(self.notes),
            "errors": list(self.errors),
            "drift": [d.to_json() for d in self.drift],
            "budgets": list(self.budgets),
            "on_demand": [o.to_json() for o in self.on_demand],
            "summary": {**counts, "changes": len(self.actions), "drift": len(self.drift)},
        }


# ---------------------------------------------------------------- decisions


def choose_backend(model: ModelSpec, gpus: tuple[GpuInfo, ...]) -> tuple[str, str]:
    """The backend for `backend: auto`, and why."""
    if model.backend != "auto":
        return model.backend, "backend set in the spec"
    if model.format == "gguf":
        return "llama-server", "a .gguf file is served by llama-server"
    vendors = {g.vendor for g in gpus if g.index in model.gpus}
    if model.gpus and vendors & {"nvidia", "amd"}:
        return "vllm", f"an HF model placed on a {'/'.join(sorted(vendors))} GPU is served by vLLM"
    return "transformers", "an HF model without a CUDA/ROCm GPU is served by transformers"


def restart_changes(want: ModelSpec, have: ModelSpec) -> tuple[Change, ...]:
    """Changed fields that need the process restarted, as old → new pairs."""
    return tuple(c for c in _changes(want, have) if c.field.split(".")[0] not in NO_RESTART)


def in_place_changes(want: ModelSpec, have: ModelSpec) -> tuple[Change, ...]:
    """Changed fields that apply to the running process without a restart."""
    return tuple(c for c in _changes(want, have) if c.field.split(".")[0] in NO_RESTART)


def _changes(want: ModelSpec, have: ModelSpec) -> tuple[Change, ...]:
    if want == have:
        return ()
    return _diff(want.model_dump(mode="json"), have.model_dump(mode="json"))


def _diff(want: Mapping[str, Any], have: Mapping[str, Any]) -> tuple[Change, ...]:
    new, old = _flat(want), _flat(have)
    return tuple(
        Change(key, old.get(key), new.get(key)) for key in sorted(set(new) | set(old)) if new.get(key) != old.get(key)
    )


def server_view(settings: ServerSettings) -> dict[str, Any]:
    """The server settings as status shows them and plans compare them: the API key only as a
    fingerprint, so a change shows without the key ever leaving the daemon."""
    view = settings.model_dump(mode="json")
    view["api_key"] = _fingerprint(settings.api_key) if settings.api_key else None
    return view


@functools.lru_cache(maxsize=8)
def _fingerprint(secret: str) -> str:
    """A slow salted hash, shortened: tells two keys apart, hard to turn back into a weak key."""
    return "pbkdf2:" + hashlib.pbkdf2_hmac("sha256", secret.encode(), b"xgen api_key", 200_000).hex()[:12]


def adapter_actions(name: str, backend: str, want: ModelSpec, have: ModelSpec) -> list[Action]:
    """LoRA changes a running vLLM applies without a restart: removals, then additions."""
    old = {a.name: a for a in have.lora}
    new = {a.name: a for a in want.lora}
    out = [
        Action(
            "remove_adapter",
            name,
            "removed from the spec" if n not in new else "path changed",
            backend,
            want,
            adapter=a,
        )
        for n, a in old.items()
        if new.get(n) != a
    ]
    out += [
        Action("add_adapter", name, "added to the spec" if n not in old else "path changed", backend, want, adapter=a)
        for n, a in new.items()
        if old.get(n) != a
    ]
    return out


def plan(spec: Spec, observed: Observed) -> Plan:
    """Actions that take `observed` to `spec`: unloads, reloads, loads, updates, then activate."""
    actions: list[Action] = []
    notes: list[str] = []
    drift: list[Drift] = []
    devices = _devices(spec, observed)
    rooms, errors = _check_placement(spec, observed, devices)
    decision = _decide(spec, observed, rooms) if spec.on_demand else Decision()
    budgets = _budgets(spec, observed, devices, rooms, decision)
    wanted = {**spec.loaded, **{n: spec.models[n] for n in decision.keep}}
    max_restarts = spec.server.max_restarts
    for name in sorted(set(observed.models) - set(wanted)):
        gone: tuple[Cause, str] = decision.unload.get(name) or (
            "spec",
            f"desired: {spec.models[name].desired}" if name in spec.models else "removed from spec",
        )
        actions.append(Action("unload", name, gone[1], observed.models[name].backend, cause=gone[0]))
    for name, want in wanted.items():
        backend, why = choose_backend(want, observed.gpus)
        have = observed.models.get(name)
        if have is None:
            if want.desired == "on_demand":
                asked = observed.usage.get(name, Usage()).waiting
                actions.append(
                    Action("load", name, f"on demand: {asked} request(s) wait; {why}", backend, want, cause="demand")
                )
            else:
                actions.append(Action("load", name, f"new model; {why}", backend, want))
            continue
        changes = restart_changes(want, have.spec)
        in_place = in_place_changes(want, have.spec)
        if have.backend != backend:
            changes = (Change("backend", have.backend, backend), *changes)
        if changes and [c.field for c in changes] == ["lora"] and backend in RUNTIME_ADAPTERS and have.spec.lora:
            actions.extend(adapter_actions(name, backend, want, have.spec))
            changes = ()
        elif changes:
            if have.failed_target == want and not have.update_retry_due:
                serving = "serving the previous version" if have.state == ModelState.LOADED else "nothing serves"
                drift.append(Drift(name, have.state.value, f"{have.update_error}; {serving}; retry after the backoff"))
                continue
            strategy, how = replace_strategy(name, want, have, observed, budgets)
            retry = f"; retry after: {have.update_error}" if have.failed_target == want else ""
            actions.append(
                Action("reload", name, f"replace ({how}){retry}", backend, want, (*changes, *in_place), None, strategy)
            )
            continue
        if in_place:
            actions.append(Action("update", name, "applies without a restart", backend, want, in_place))
        if have.state == ModelState.ERROR:
            of = f" of {max_restarts}" if max_restarts is not None else ""
            if max_restarts is not None and have.failures >= max_restarts:
                drift.append(
                    Drift(
                        name,
                        have.state.value,
                        f"failed {have.failures} times with this spec ({have.error}); not retrying "
                        "(server.max_restarts): change its entry in the file to try again",
                    )
                )
            elif have.retry_due:
                retry = f"retry {have.failures}{of} after: {have.error}"
                on_demand = want.desired == "on_demand"
                actions.append(Action("load", name, retry, backend, want, cause="demand" if on_demand else "spec"))
            else:
                waiting = f"{have.error}; retry {have.failures}{of} after the backoff"
                drift.append(Drift(name, have.state.value, waiting))
        elif have.state in (ModelState.LOADING, ModelState.UNLOADING):
            drift.append(Drift(name, have.state.value, "in progress"))
    if observed.server is not None:
        actions.extend(_server_update(server_view(spec.server), observed.server, notes))
    active = spec.resolve(spec.active) if spec.active else _default_active(spec)
    if active != observed.active:
        actions.append(Action("activate", active or "", f"was {observed.active or 'none'}"))
    notes.extend(_placement_notes(spec, observed))
    return Plan(
        spec.generation,
        tuple(sorted(actions, key=Action.order)),
        tuple(notes),
        tuple(errors),
        tuple(budgets),
        tuple(drift),
        _standings(spec, observed, decision),
    )


def _decide(spec: Spec, observed: Observed, rooms: Mapping[str, Room]) -> Decision:
    """The on-demand models to keep resident, load, unload and refuse (demand.py's rules)."""
    candidates = [
        Candidate(
            name,
            devices_of(model.gpus),
            observed.estimates.get(name),
            name in observed.models,
            observed.usage.get(name, Usage()),
            model.idle_unload_s,
        )
        for name, model in spec.on_demand.items()
    ]
    return decide(candidates, rooms, observed.now, len(spec.loaded), spec.server.max_loaded)


def _standings(spec: Spec, observed: Observed, decision: Decision) -> tuple[Standing, ...]:
    out = []
    for name in spec.on_demand:
        if name in decision.refused:
            out.append(Standing(name, "refused", decision.refused[name]))
        elif name in decision.queued:
            out.append(Standing(name, "queued", decision.queued[name]))
        elif name in decision.unload:
            out.append(Standing(name, "unloading", decision.unload[name][1]))
        elif name in decision.keep:
            waiting = observed.usage.get(name, Usage()).waiting
            loading = name not in observed.models
            why = f"loading for {waiting} waiting request(s)" if loading else "resident: used recently"
            out.append(Standing(name, "resident", why))
        else:
            out.append(Standing(name, "standby", "loaded by the first request for it"))
    return tuple(out)


def replace_strategy(
    name: str, want: ModelSpec, have: ObservedModel, observed: Observed, budgets: list[dict[str, Any]]
) -> tuple[Literal["surge", "recreate"], str]:
    """Surge (new process beside the old, switch when ready: no downtime) when the memory allows
    both at once on the model's devices, else recreate (stop, then start). With the reason."""
    if want.replace == "recreate":
        return "recreate", "recreate: replace: recreate"
    if "remote" in (want.backend, have.backend):
        return "recreate", "recreate: nothing runs here (a remote model is checked again)"
    if have.state != ModelState.LOADED:
        return "recreate", f"recreate: nothing serves now ({have.state.value})"
    if want.port is not None or have.spec.port is not None:
        return "recreate", "recreate: a fixed port cannot serve two processes"
    if want.replace == "surge":
        return "surge", "surge"
    if not want.gpus:
        # llama.cpp's threads spin at their barriers: two processes whose threads outnumber the
        # cores slow to a crawl (measured: 870 ms per token instead of 40 on 2 cores)
        threads = (want.llama.threads if have.backend == "llama-server" else None) or observed.cpu_count
        if 2 * threads > observed.cpu_count:
            return "recreate", (
                f"recreate: two processes of {threads} thread(s) each would oversubscribe {observed.cpu_count} CPU "
                "core(s)"
            )
        return "surge", "surge"
    estimate = observed.estimates.get(name)
    if estimate is None:
        return "recreate", "recreate: no memory estimate to prove that both fit"
    for budget in budgets:
        need = estimate.get(budget["device"])
        if need is not None:
            free = budget["free_bytes"]  # after every planned model, this one too
            if need > free:
                return "recreate", f"recreate: needs {gib(need)} more on {label(budget['device'])}, {gib(free)} free"
    return "surge", "surge"


def _server_update(want: Mapping[str, Any], have: Mapping[str, Any], notes: list[str]) -> list[Action]:
    changes = _diff(want, have)
    for change in changes:
        if change.field in DAEMON_RESTART:
            notes.append(f"server.{change} takes effect when `xgen serve` restarts")
    live = tuple(Change(f"server.{c.field}", c.old, c.new) for c in changes if c.field not in DAEMON_RESTART)
    return [Action("update", "", "server settings; apply without a restart", changes=live)] if live else []


def _placement_notes(spec: Spec, observed: Observed) -> list[str]:
    """Placements that are valid but almost certainly not what was meant, on-demand models whose
    memory no budget can account for, and commands that may listen beyond loopback."""
    return (
        [
            f"models.{name}: gpu_index {model.gpu_index} with n_gpu_layers 0 offloads nothing to the GPU "
            "(set n_gpu_layers: -1 to offload every layer)"
            for name, model in spec.served.items()
            if model.gpus and model.n_gpu_layers == 0 and model.format == "gguf" and model.backend != "command"
        ]
        + [
            f"models.{name}: no memory estimate for this backend; only server.max_loaded limits how many load at once"
            for name in spec.on_demand
            if name not in observed.estimates
        ]
        + [
            f"models.{name}: the command has no {{host}}, so the server listens where its own default says (xgen's "
            "backends listen on 127.0.0.1 only; pass '{host}' to its listen flag)"
            for name, model in spec.served.items()
            if model.command is not None and not any("{host}" in t for t in (*model.command.argv, *model.env.values()))
        ]
    )


def _default_active(spec: Spec) -> str | None:
    """Without `active:`, the only loaded llm model is the active one."""
    llms = [n for n, m in spec.loaded.items() if m.server_type == "llm"]
    return llms[0] if len(llms) == 1 else None


def budget_of(settings: ServerSettings, device: str, total: int) -> int:
    """What xgen's models may use of a device: its explicit budget, else its memory less the reserve."""
    explicit = settings.budgets.get(device)
    if explicit is None and device.startswith("gpu"):
        explicit = settings.budgets.get("gpu")
    if explicit is not None:
        return min(total, size_of(explicit, total))
    return max(0, total - size_of(settings.memory_reserve, total))


def _devices(spec: Spec, observed: Observed) -> dict[str, tuple[str, int, int, int]]:
    """Each device's name, total, budget, and what processes xgen does not own hold on it now."""
    out: dict[str, tuple[str, int, int, int]] = {}
    for gpu in observed.gpus:
        ours = sum(observed.estimates.get(n, {}).get(f"gpu{gpu.index}", 0) for n in observed.models)
        others = max(0, (gpu.memory_used or 0) - ours)
        out[f"gpu{gpu.index}"] = (
            gpu.name,
            gpu.memory_total,
            budget_of(spec.server, f"gpu{gpu.index}", gpu.memory_total),
            others,
        )
    if observed.ram_total:
        out["cpu"] = ("RAM", observed.ram_total, budget_of(spec.server, "cpu", observed.ram_total), 0)
    return out


def _check_placement(
    spec: Spec, observed: Observed, devices: Mapping[str, tuple[str, int, int, int]]
) -> tuple[dict[str, Room], list[str]]:
    """Refuse GPU indices that do not exist, pinned models that do not fit their devices, on-demand
    models that could never fit beside them, and too few ports. Returns each device's room."""
    errors: list[str] = []
    by_index = {g.index: g for g in observed.gpus}
    pinned: dict[str, dict[str, int]] = {}
    for name, model in spec.served.items():
        missing = [i for i in model.gpus if i not in by_index]
        for index in missing:
            have = ", ".join(f"{g.index} ({g.name})" for g in observed.gpus) or f"none (detector: {observed.detector})"
            errors.append(f"models.{name}.gpu_index: GPU {index} does not exist; GPUs on this host: {have}")
        if not missing and model.desired == "loaded":
            for device, need in observed.estimates.get(name, {}).items():
                pinned.setdefault(device, {})[name] = need
    # what is usable now: the budget, less what other processes hold beyond what it leaves them
    rooms = {
        d: Room(d, min(budget, total - others), pinned.get(d, {}), others)
        for d, (_, total, budget, others) in devices.items()
    }
    for device, room in rooms.items():
        if room.held > room.budget:
            detail = ", ".join(f"{n} {gib(b)}" for n, b in room.pinned.items())
            errors.append(
                f"{_device_name(device, devices)}: the models placed on it need {gib(room.held)} but "
                f"{gib(room.budget)} is available ({detail}); short by {gib(room.held - room.budget)}"
            )
    for name in spec.on_demand:  # against the budget itself: other processes may come and go
        for device, need in observed.estimates.get(name, {}).items():
            space = rooms.get(device)
            budget = devices[device][2] if device in devices else 0
            if space is not None and need > budget - space.held:
                errors.append(
                    f"models.{name}: on demand it needs {gib(need)} on {_device_name(device, devices)}, but the "
                    f"budget of {gib(budget)} leaves {gib(max(0, budget - space.held))} beside the pinned "
                    f"models ({', '.join(space.pinned) or 'none'}); it could never be loaded"
                )
    for name, model in spec.served.items():
        if model.server_type == "rerank" and choose_backend(model, observed.gpus)[0] == "transformers":
            errors.append(
                f"models.{name}: server_type rerank on the transformers backend (an HF model without a GPU): it "
                "serves llm and embedding models only; rerank with a GGUF on llama-server or on a GPU with vLLM"
            )
    limit = spec.server.max_loaded
    if limit is not None and len(spec.loaded) + (1 if spec.on_demand else 0) > limit:
        errors.append(
            f"server.max_loaded: {limit}, but {len(spec.loaded)} models are pinned"
            + (" and on-demand models need room for one more" if spec.on_demand else "")
        )
    low, high = spec.server.port_range
    on_demand = len(spec.on_demand) if limit is None else min(len(spec.on_demand), max(0, limit - len(spec.loaded)))
    auto_ports = sum(1 for m in spec.loaded.values() if m.port is None) + on_demand
    if auto_ports > high - low + 1:
        errors.append(
            f"server.port_range: {auto_ports} models need a port but {low}-{high} has {high - low + 1}; widen the "
            "range" + (" or set server.max_loaded" if on_demand else "")
        )
    return rooms, errors


def _device_name(device: str, devices: Mapping[str, tuple[str, int, int, int]]) -> str:
    return label(device) if device == "cpu" else f"{label(device)} ({devices[device][0]})"


def label(device: str) -> str:
    """A device key (cpu, gpu0) as people write it."""
    return "CPU RAM" if device == "cpu" else f"GPU {device.removeprefix('gpu')}"


def _budgets(
    spec: Spec,
    observed: Observed,
    devices: Mapping[str, tuple[str, int, int, int]],
    rooms: Mapping[str, Room],
    decision: Decision,
) -> list[dict[str, Any]]:
    """Each device a model is placed on: its budget, what pinned and resident on-demand models take."""
    used = {d for m in spec.served.values() for d in devices_of(m.gpus)}
    out = []
    for device, room in rooms.items():
        if device not in used:
            continue
        on_demand = {n: observed.estimates[n][device] for n in decision.keep if device in observed.estimates.get(n, {})}
        name, total, _, _ = devices[device]
        budget = room.budget
        out.append(
            {
                "device": device,
                "name": name,
                "total_bytes": total,
                "budget_bytes": budget,
                "others_bytes": room.others,
                "reserve_bytes": max(0, total - room.others - budget),  # kept back from xgen's models
                "pinned_bytes": room.held,
                "pinned": dict(room.pinned),
                "on_demand": on_demand,
                "free_bytes": budget - room.held - sum(on_demand.values()),
            }
        )
    return out


# ---------------------------------------------------------------- rendering


def _launch_line(name: str, spec: ModelSpec) -> str:
    """What a load starts (or, for a remote model, where it reaches), with its request policy."""
    if spec.backend == "remote":
        line = f"{spec.url} as '{spec.remote_model or name}'" + (
            f", key from ${spec.api_key_env}" if spec.api_key_env else ""
        )
    elif spec.command is not None:  # its flags are its own: n_ctx and n_gpu_layers say nothing here
        line = f"{' '.join(shown_argv(tuple(spec.command.argv)))}  [{placement(spec.gpus)}]"
    else:
        line = f"{spec.source}  [{placement(spec.gpus)}, n_ctx {spec.n_ctx}, n_gpu_layers {spec.n_gpu_layers}]"
    policy = []
    if spec.max_concurrent is not None:
        policy.append(f"max_concurrent {spec.max_concurrent} (queue {spec.max_queue}, {spec.queue_timeout_s:g} s)")
    if not spec.params.empty:
        policy.append("params " + ", ".join(k for k in ("set", "default", "strip") if getattr(spec.params, k)))
    if spec.variants:
        policy.append("variants " + ", ".join(f"{name}:{v}" for v in spec.variants))
    return line + (f"  ({'; '.join(policy)})" if policy else "")


def render_text(p: Plan) -> str:
    """Terraform-style: + load, - unload, ~ reload or update in place with a field diff,
    → activate, ! drift, then a summary."""
    lines: list[str] = []
    for error in p.errors:
        lines.append(f"Error: {error}")
    if p.errors:
        lines.append("")
    symbols = {
        "load": "+",
        "unload": "-",
        "reload": "~",
        "update": "~",
        "activate": "→",
        "add_adapter": "+",
        "remove_adapter": "-",
    }
    if p.actions:
        lines.append(f"xgen will perform the following actions (generation {p.generation}):")
        lines.append("")
    for a in p.actions:
        target = f" ({a.backend})" if a.backend and a.kind in ("load", "reload") else ""
        if a.adapter is not None:
            lines.append(f"  {symbols[a.kind]} adapter {a.model}/{a.adapter.name} ({a.adapter.path}): {a.reason}")
            continue
        what = "update in place" if a.kind == "update" else a.kind
        subject = a.model or ("server settings" if a.kind == "update" else "(none)")
        lines.append(f"  {symbols[a.kind]} {what} {subject}{target}: {a.reason}")
        if a.kind == "load" and a.spec is not None:
            lines.append(f"      {_launch_line(a.model, a.spec)}")
        for change in a.changes:
            shown = Change(change.field, "(set)", "(changed)") if change.field == "server.api_key" else change
            lines.append(f"      ~ {shown}")
    if p.drift:
        if lines and lines[-1]:
            lines.append("")
        lines.append("Not yet as specified (nothing to do now):")
        lines.extend(f"  ! {d.model}: {d.state}: {d.reason}" for d in p.drift)
    for note in p.notes:
        lines.append(f"  # {note}")
    for o in p.on_demand:
        lines.append(f"  # on demand {o.model}: {o.status}: {o.reason}")
    for b in p.budgets:
        on_demand = sum(b["on_demand"].values())
        resident = f" + {gib(on_demand)} on demand" if b["on_demand"] else ""
        lines.append(
            f"  # {b['device']} ({b['name']}): {gib(b['pinned_bytes'])} pinned{resident} of a "
            f"{gib(b['budget_bytes'])} budget"
        )
    if lines and lines[-1]:
        lines.append("")
    counts = p.to_json()["summary"]
    if p.errors:
        count = len(p.errors)
        lines.append(f"Plan refused ({count} error{'s' if count != 1 else ''}): nothing will be changed.")
    elif p.matches:
        lines.append("No changes. The running state matches the spec.")
    elif p.empty:
        lines.append(f"No actions, but {len(p.drift)} model(s) do not run as specified yet (see above).")
    else:
        parts = [f"{counts[k]} to {k}" for k in ("load", "reload", "unload") if counts[k]]
        if counts["update"]:
            parts.append(f"{counts['update']} to update in place")
        adapters = counts["add_adapter"] + counts["remove_adapter"]
        if adapters:
            parts.append(f"{adapters} adapter change{'s' if adapters != 1 else ''}")
        activate = next((a.model for a in p.actions if a.kind == "activate"), None)
        if activate is not None:
            parts.append(f"active → {activate or 'none'}")
        lines.append(f"Plan: {', '.join(parts)}.")
    return "\n".join(lines) + "\n"


def render_json(p: Plan) -> str:
    return json.dumps(p.to_json(), indent=2, sort_keys=True) + "\n"


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value

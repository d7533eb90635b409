"""Prometheus metrics (prometheus-client, one registry of xgen's own)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from reconciler.state import ModelState
from reconciler.store import StateStore

REGISTRY = CollectorRegistry()
MODEL_STATE = Gauge("xgen_model_state", "1 for the state each model is in", ["model", "state"], registry=REGISTRY)
CRASH_LOOPING = Gauge(
    "xgen_model_crash_looping", "1 while a model keeps failing (3+ consecutive failures)", ["model"], registry=REGISTRY
)
UPDATE_FAILED = Gauge(
    "xgen_model_update_failed",
    "1 while a model's last update failed and the previous version serves",
    ["model"],
    registry=REGISTRY,
)
REPLACEMENTS = Counter(
    "xgen_model_replacements_total",
    "Process replacements (launch changes)",
    ["model", "strategy", "outcome"],
    registry=REGISTRY,
)
HANGS = Counter(
    "xgen_model_hangs_total",
    "Backends killed because they answered nothing (server.hung_after_s)",
    ["model"],
    registry=REGISTRY,
)
PASS_ERRORS = Counter("xgen_pass_errors_total", "Reconcile passes that failed unexpectedly", registry=REGISTRY)
TRANSITIONS = Counter("xgen_model_transitions_total", "State transitions", ["model", "to"], registry=REGISTRY)
LOAD_SECONDS = Histogram(
    "xgen_model_load_seconds",
    "Time from LOADING to LOADED",
    ["model"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
LOADS = Counter(
    "xgen_model_loads_total", "Loads started, by cause (spec, demand)", ["model", "cause"], registry=REGISTRY
)
UNLOADS = Counter(
    "xgen_model_unloads_total",
    "Unloads started, by cause (spec, idle: idle_unload_s, evict: room for another model)",
    ["model", "cause"],
    registry=REGISTRY,
)
SWAP_SECONDS = Histogram(
    "xgen_model_swap_seconds",
    "On-demand loads: from the first waiting request's arrival to the backend being ready",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
QUEUED = Gauge("xgen_queue_waiting", "/v1 requests waiting for a turn (max_concurrent)", ["model"], registry=REGISTRY)
REJECTED = Counter(
    "xgen_requests_rejected_total",
    "/v1 requests answered 429: the queue was full, or no turn came within queue_timeout_s",
    ["model", "reason"],
    registry=REGISTRY,
)
CLIENTS = Gauge("xgen_front_clients", "Client connections open to xgen's port", registry=REGISTRY)
CLIENTS_DROPPED = Counter(
    "xgen_front_clients_dropped_total",
    "Client connections xgen ended: a request head over 64 KiB, a head or body that stopped arriving, "
    "an answer the client did not take (server.client_timeout_s)",
    ["reason"],
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "xgen_queue_wait_seconds",
    "Time a /v1 request waited for a turn (max_concurrent)",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
GPU_MEMORY = Gauge("xgen_gpu_memory_bytes", "GPU memory", ["gpu", "kind"], registry=REGISTRY)
MODEL_MEMORY = Gauge(
    "xgen_model_memory_bytes",
    "Memory of a running model per device (gpu0 …, cpu): the planner's estimate, and what was measured",
    ["model", "device", "kind"],
    registry=REGISTRY,
)
RESTARTS = Gauge(
    "xgen_model_restarts", "Times a model's process was started again after a failure", ["model"], registry=REGISTRY
)
GPU_UTIL = Gauge("xgen_gpu_utilization_percent", "GPU utilisation", ["gpu"], registry=REGISTRY)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LE = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]  # as prometheus-client writes them


class RequestStats:
    """The request path's numbers (requests, latency, in flight, tokens) as plain ints, turned
    into metric families only when scraped: prometheus-client's locked counters cost ~6 µs a
    request, 5-10% of the proxy's CPU under load. Everything runs on the event loop's thread."""

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}
        self.requests: dict[tuple[str, str], int] = {}  # (model, status)
        self.latency: dict[tuple[str, str], list[float]] = {}  # (model, status): per-bucket counts, then the sum
        self.tokens: dict[tuple[str, str], int] = {}  # (model, prompt|completion)

    def begin(self, model: str) -> None:
        self.inflight[model] = self.inflight.get(model, 0) + 1

    def done(self, model: str, status: str, seconds: float) -> None:
        self.inflight[model] = self.inflight.get(model, 0) - 1
        self.answered(model, status, seconds)

    def answered(self, model: str, status: str, seconds: float | None = None) -> None:
        """A request answered (`seconds` None: answered by xgen before any backend was asked)."""
        key = (model, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is None:
            return
        counts = self.latency.get(key)
        if counts is None:
            counts = self.latency[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def add_tokens(self, model: str, kind: str, count: int) -> None:
        key = (model, kind)
        self.tokens[key] = self.tokens.get(key, 0) + count

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily("xgen_proxy_inflight_requests", "/v1 requests in flight", labels=["model"])
        for model, count in list(self.inflight.items()):
            inflight.add_metric([model], count)
        requests = CounterMetricFamily(
            "xgen_proxy_requests", "/v1 requests by model and status", labels=["model", "status"]
        )
        for (model, status), count in list(self.requests.items()):
            requests.add_metric([model, status], count)
        latency = HistogramMetricFamily(
            "xgen_proxy_request_seconds", "/v1 request duration (to the last byte)", labels=["model", "status"]
        )
        for (model, status), counts in list(self.latency.items()):
            cumulative = list(itertools.accumulate(counts[:-1]))
            latency.add_metric([model, status], list(zip(LE, cumulative, strict=True)), counts[-1])
        tokens = CounterMetricFamily("xgen_tokens", "Tokens reported by backends (usage)", labels=["model", "kind"])
        for (model, kind), count in list(self.tokens.items()):
            tokens.add_metric([model, kind], count)
        yield from (inflight, requests, latency, tokens)


STATS = RequestStats()
REGISTRY.register(STATS)


def observe_event(kind: str, data: dict[str, object]) -> None:
    """Update counters from a store event (called for every published event)."""
    if kind == "pass_error":
        PASS_ERRORS.inc()
    if kind == "load":
        LOADS.labels(str(data["model"]), str(data["cause"])).inc()
    if kind == "unload":
        UNLOADS.labels(str(data["model"]), str(data["cause"])).inc()
    if kind == "hung":
        HANGS.labels(str(data["model"])).inc()
    if kind == "replaced":
        REPLACEMENTS.labels(str(data["model"]), str(data["strategy"]), "ok" if data["ok"] else "failed").inc()
    if kind != "state":
        return
    model, to = str(data["model"]), str(data["to"])
    TRANSITIONS.labels(model, to).inc()
    info = data.get("info")
    swap = data.get("swap_s")
    if isinstance(swap, float | int):
        SWAP_SECONDS.labels(model).observe(swap)
    if to == ModelState.LOADED.value and isinstance(info, dict) and data.get("from") == ModelState.LOADING.value:
        started = info.get("started_at")
        since = info.get("since")
        if isinstance(started, float) and isinstance(since, float):
            LOAD_SECONDS.labels(model).observe(max(0.0, since - started))


def refresh(store: StateStore) -> None:
    """Gauges that mirror the store, set just before a scrape."""
    for gauge in (MODEL_STATE, CRASH_LOOPING, UPDATE_FAILED, MODEL_MEMORY, RESTARTS):
        gauge.clear()
    for name, info in store.models.items():
        CRASH_LOOPING.labels(name).set(info.crash_looping)
        UPDATE_FAILED.labels(name).set(info.failed_update is not None)
        RESTARTS.labels(name).set(info.restarts)
        for kind, sizes in (("estimated", info.estimated), ("measured", info.measured)):
            for device, size in (sizes or {}).items():
                MODEL_MEMORY.labels(name, device, kind).set(size)
        for state in ModelState:
            if state is not ModelState.GONE:
                MODEL_STATE.labels(name, state.value).set(1 if info.state is state else 0)
    for gpu in store.gpu.get("gpus", []):
        index = str(gpu["index"])
        GPU_MEMORY.labels(index, "total").set(gpu["memory_total"])
        if gpu.get("memory_used") is not None:
            GPU_MEMORY.labels(index, "used").set(gpu["memory_used"])
        if gpu.get("utilization") is not None:
            GPU_UTIL.labels(index).set(gpu["utilization"])


class _Usage(msgspec.Struct):
    """OpenAI's names, or Anthropic's and Responses' (input/output_tokens); the rest is skipped."""

    prompt_tokens: Any = None
    completion_tokens: Any = None
    input_tokens: Any = None
    output_tokens: Any = None


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_ANSWER = msgspec.json.Decoder(_Answer)


def count_tokens(model: str, body: bytes) -> int:
    """Usage from a non-streamed answer (or one event's JSON); returns the tokens generated.
    msgspec reads the top-level `usage` and skips the rest without building it: 0.6 µs on a
    chat answer, where json.loads was 7% of the proxy's CPU under load and a regex scan 2.8 µs."""
    try:
        usage = _ANSWER.decode(body).usage
    except msgspec.DecodeError:  # not JSON, or a `usage` that is not an object
        return 0
    if usage is None:
        return 0
    prompt = usage.prompt_tokens if isinstance(usage.prompt_tokens, int) else usage.input_tokens
    generated = usage.completion_tokens if isinstance(usage.completion_tokens, int) else usage.output_tokens
    if isinstance(prompt, int) and prompt > 0:
        STATS.add_tokens(model, "prompt", prompt)
    if not isinstance(generated, int) or generated <= 0:
        return 0
    STATS.add_tokens(model, "completion", generated)
    return generated


def count_stream_tokens(model: str, last_chunk: bytes) -> int:
    """Usage from a copy of a stream's last chunk, if the backend put it there; returns the
    tokens generated."""
    for line in reversed(last_chunk.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            return count_tokens(model, line[6:])
    return 0

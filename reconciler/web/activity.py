"""Recent activity per model for the status page's sparklines: requests/s, generated tokens/s
and median latency over the last ten minutes, in 10 s buckets, kept in memory (no database).

Each bucket holds a request count, a token count and a latency histogram (log-spaced bins), so a
model costs a few KB however busy it is; the median is read from the histogram (its bin's upper
edge: a sparkline's precision, not a benchmark's). The clock is passed in, for tests.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

BUCKET_S = 10
BUCKETS = 60  # ten minutes
# latency bin upper edges in seconds: 5 ms … 2 min, about ×2.2 each
EDGES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


@dataclass
class _Bucket:
    start: int = -1  # bucket number (time // BUCKET_S)
    requests: int = 0
    tokens: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(EDGES) + 1))


class Activity:
    def __init__(self) -> None:
        self.models: dict[str, list[_Bucket]] = {}

    def _bucket(self, model: str, now: float) -> _Bucket:
        ring = self.models.get(model)
        if ring is None:  # not setdefault: its default would build 60 buckets on every request
            ring = self.models[model] = [_Bucket() for _ in range(BUCKETS)]
        number = int(now // BUCKET_S)
        bucket = ring[number % BUCKETS]
        if bucket.start != number:  # a slot from ten minutes ago: start it afresh
            bucket.start, bucket.requests, bucket.tokens = number, 0, 0
            bucket.latency = [0] * (len(EDGES) + 1)
        return bucket

    def request(self, model: str, seconds: float, tokens: int, now: float) -> None:
        """An answered request: its latency and the tokens it generated."""
        bucket = self._bucket(model, now)
        bucket.requests += 1
        bucket.tokens += tokens
        bucket.latency[bisect.bisect_left(EDGES, seconds)] += 1

    def forget(self, keep: set[str]) -> None:
        """Drop the series of models no longer in the spec."""
        for name in set(self.models) - keep:
            del self.models[name]

    def to_json(self, now: float) -> dict[str, Any]:
        """Oldest first: one value per bucket for the last BUCKETS buckets (the current one
        included, still filling); p50 is null for a bucket without requests."""
        current = int(now // BUCKET_S)
        out: dict[str, Any] = {}
        for name, ring in self.models.items():
            rps, tps, p50 = [], [], []
            for number in range(current - BUCKETS + 1, current + 1):
                bucket = ring[number % BUCKETS]
                live = bucket.start == number
                rps.append(round(bucket.requests / BUCKET_S, 2) if live else 0.0)
                tps.append(round(bucket.tokens / BUCKET_S, 1) if live else 0.0)
                p50.append(_median(bucket.latency) if live and bucket.requests else None)
            out[name] = {"requests_per_s": rps, "tokens_per_s": tps, "p50_ms": p50}
        return {"bucket_s": BUCKET_S, "until": current * BUCKET_S + BUCKET_S, "models": out}


def _median(histogram: list[int]) -> float:
    """The upper edge (ms) of the bin holding the middle request."""
    half, seen = (sum(histogram) + 1) // 2, 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= half:
            return round(1000 * (EDGES[i] if i < len(EDGES) else EDGES[-1] * 2), 1)
    return 0.0

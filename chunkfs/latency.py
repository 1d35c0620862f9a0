"""Latency and error figures of one kind of backend request (S3, Redis), for status.

A mount's average since it started hides a slow minute, so besides the mean this keeps
a recent mean (exponentially weighted: about the last minute, or the last 64 requests
when there are more), the maximum, the last error, and
cumulative counts per bound (``le_ms``, Prometheus-style: the node metrics turn them
into gauges a dashboard can derive percentiles from). O(1) per request, no lists.
"""

from __future__ import annotations

import math
import time
from typing import Any

BOUNDS_MS = (1, 5, 10, 50, 100, 500, 1000, 5000)
RECENT_S = 60.0


class Latency:
    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.recent = 0.0
        self._at = 0.0
        self.buckets = [0] * (len(BOUNDS_MS) + 1)
        self.last_error = ""
        self.last_error_at = 0.0

    def observe(self, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        if self.count == 1:
            self.recent = seconds
        else:
            weight = 1.0 - math.exp(-max(0.0, now - self._at) / RECENT_S)
            # a burst of requests within one instant still moves the mean a little each
            weight = max(weight, 1.0 / 64)
            self.recent += (seconds - self.recent) * weight
        self._at = now
        ms = seconds * 1000
        for i, bound in enumerate(BOUNDS_MS):
            if ms <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1

    def error(self, what: str) -> None:
        """Remember the last failure (a short description: operation and error type)."""
        self.last_error = what[:200]
        self.last_error_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        cumulative, le = 0, {}
        for bound, n in zip((*map(str, BOUNDS_MS), "inf"), self.buckets, strict=True):
            cumulative += n
            le[bound] = cumulative
        return {"avg_ms": round(self.total / self.count * 1000, 3) if self.count else 0.0,
                "recent_ms": round(self.recent * 1000, 3), "max_ms": round(self.max * 1000, 3),
                "le_ms": le, "last_error": self.last_error,
                "last_error_at": round(self.last_error_at, 3)}

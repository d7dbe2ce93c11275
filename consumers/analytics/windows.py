"""What one tumbling window holds for one model or tenant, as JSON-ready values.

A window's figures live in a Faust table, whose changelog stores them as JSON, so
`WindowStats` turns to and from a plain dict. Distributions keep an exact count,
sum, min and max (so means are exact) and a sparse log-bucketed histogram for the
quantiles: constant size whatever the traffic, each quantile within one bucket
(``BUCKET_GROWTH``, 10 %) of the true value and never outside [min, max].
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .timings import RequestSummary

BUCKET_GROWTH = 1.1
_SMALLEST = 1e-4  # seconds (or tokens/s): everything below shares bucket 0


def _bucket(value: float) -> int:
    if value <= _SMALLEST:
        return 0
    return 1 + int(math.log(value / _SMALLEST, BUCKET_GROWTH))


def _upper_bound(bucket: int) -> float:
    return _SMALLEST * BUCKET_GROWTH**bucket


@dataclass(slots=True)
class Distribution:
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    buckets: Counter[int] = field(default_factory=Counter)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.buckets[_bucket(value)] += 1

    def quantile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(max(_upper_bound(bucket), self.low), self.high)
        return self.high  # not reached: the buckets hold `count` values

    def report(self) -> dict[str, float | int | None]:
        if not self.count:
            return {"count": 0, "mean": None, "min": None, "max": None, "p50": None, "p99": None}
        return {
            "count": self.count,
            "mean": self.total / self.count,
            "min": self.low,
            "max": self.high,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total": self.total,
            "low": self.low if self.count else None,
            "high": self.high if self.count else None,
            "buckets": {str(b): n for b, n in self.buckets.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Distribution:
        if not data.get("count"):
            return cls()
        return cls(
            count=data["count"],
            total=data["total"],
            low=data["low"],
            high=data["high"],
            buckets=Counter({int(b): n for b, n in data["buckets"].items()}),
        )


_DISTRIBUTIONS = ("queue_wait_s", "ttft_submission_s", "ttft_pickup_s", "inter_token_s",
                  "tokens_per_s")  # fmt: skip


@dataclass(slots=True)
class WindowStats:
    """Requests that ended in one window, for one model or one tenant."""

    requests: int = 0
    completion_tokens: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    queue_wait_s: Distribution = field(default_factory=Distribution)
    ttft_submission_s: Distribution = field(default_factory=Distribution)
    ttft_pickup_s: Distribution = field(default_factory=Distribution)
    inter_token_s: Distribution = field(default_factory=Distribution)
    tokens_per_s: Distribution = field(default_factory=Distribution)

    def add(self, summary: RequestSummary) -> None:
        self.requests += 1
        self.completion_tokens += summary.completion_tokens
        self.outcomes[summary.outcome] += 1
        for name in ("queue_wait_s", "ttft_submission_s", "ttft_pickup_s", "tokens_per_s"):
            value = getattr(summary, name)
            if value is not None:
                getattr(self, name).add(value)
        for gap in summary.inter_token_s:
            self.inter_token_s.add(gap)

    def report(self) -> dict[str, Any]:
        """The window as `/summary` shows it."""
        return {
            "requests": self.requests,
            "completion_tokens": self.completion_tokens,
            "outcomes": dict(self.outcomes),
            **{name: getattr(self, name).report() for name in _DISTRIBUTIONS},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completion_tokens": self.completion_tokens,
            "outcomes": dict(self.outcomes),
            **{name: getattr(self, name).to_json() for name in _DISTRIBUTIONS},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> WindowStats:
        if not data:
            return cls()
        return cls(
            requests=data["requests"],
            completion_tokens=data["completion_tokens"],
            outcomes=Counter(data["outcomes"]),
            **{name: Distribution.from_json(data[name]) for name in _DISTRIBUTIONS},
        )

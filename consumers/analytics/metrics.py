"""The analytics consumer's Prometheus figures, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from schemas.requests import ANY_MODEL

from .timings import RequestSummary

# The label of a model no worker has served here: a request that failed before
# pickup for a name made up by its client, say. Each label value is a new series
# per metric, so a client-controlled value never becomes one.
UNKNOWN_MODEL = "unknown"

# From a token every few ms on a GPU to a long queue on a busy CPU worker.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class AnalyticsMetrics:
    """Histograms and counters per model. Tenants are in `/summary` only: a label
    per tenant would grow Prometheus' series without bound."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "tokenbus_analytics_ttft_seconds",
            "Time to first token, from submission or from pickup by a worker",
            ["model", "since"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "tokenbus_analytics_inter_token_latency_seconds",
            "Gap between consecutive token events of a request",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "tokenbus_analytics_queue_wait_seconds",
            "Submission to pickup by a worker",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "tokenbus_analytics_requests",
            "Requests that ended, by finish reason ('failed' for a failed event)",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "tokenbus_analytics_tokens",
            "Completion tokens generated",
            ["model"],
            registry=self.registry,
        )
        self.malformed = Counter(
            "tokenbus_analytics_malformed_messages",
            "Undecodable messages skipped",
            ["topic"],
            registry=self.registry,
        )
        self.fenced = Counter(
            "tokenbus_analytics_fenced_events",
            "Events not counted: a stale worker's (fenced) or a duplicate",
            registry=self.registry,
        )

        # Models a worker has said it serves (in a `started` event): few, and not
        # the client's to choose.
        self._served: set[str] = set()

    def model_label(self, summary: RequestSummary) -> str:
        """The model as a label value: one that workers serve, ``default``, or
        ``unknown``."""
        if summary.model_served:
            self._served.add(summary.model)
            return summary.model
        if summary.model in self._served or summary.model == ANY_MODEL:
            return summary.model
        return UNKNOWN_MODEL

    def record(self, summary: RequestSummary) -> str:
        """Count ``summary``; returns the model label it was counted under."""
        model = self.model_label(summary)
        self.requests.labels(model, summary.outcome).inc()
        self.tokens.labels(model).inc(summary.completion_tokens)
        if summary.queue_wait_s is not None:
            self.queue_wait.labels(model).observe(summary.queue_wait_s)
        if summary.ttft_submission_s is not None:
            self.ttft.labels(model, "submission").observe(summary.ttft_submission_s)
        if summary.ttft_pickup_s is not None:
            self.ttft.labels(model, "pickup").observe(summary.ttft_pickup_s)
        for gap in summary.inter_token_s:
            self.inter_token.labels(model).observe(gap)
        return model

"""The guard's Prometheus figures, in a registry of its own (``TOKENBUS_GUARD_METRICS_PORT``)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# From a verdict a few ms after its token to a guard far behind.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GuardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.verdict_latency = Histogram(
            "tokenbus_guard_verdict_latency_seconds",
            "From the newest event a verdict judges (its ts) to the verdict",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Policy names come from the policy file (few), never from a client.
        self.violations = Counter(
            "tokenbus_guard_violations",
            "Violations found, by category and policy rule",
            ["category", "policy"],
            registry=self.registry,
        )
        self.streams = Counter(
            "tokenbus_guard_streams",
            "Streams seen from their start, by moderation mode (off: not judged)",
            ["mode"],
            registry=self.registry,
        )
        self.events = Counter(
            "tokenbus_guard_events", "Events of moderated streams judged", registry=self.registry
        )
        self.verdicts = Counter(
            "tokenbus_guard_verdicts", "Verdicts published", registry=self.registry
        )
        self.fenced = Counter(
            "tokenbus_guard_fenced_events",
            "Events left out by the fencing rule: a stale worker's, or a duplicate",
            registry=self.registry,
        )
        self.malformed = Counter(
            "tokenbus_guard_malformed_messages",
            "Undecodable messages skipped",
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "tokenbus_guard_open_streams", "Streams being judged", registry=self.registry
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

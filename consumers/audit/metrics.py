"""The audit consumer's counters as Prometheus metrics (``TOKENBUS_AUDIT_METRICS_PORT``)."""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from tokenbus.bus.lag import PartitionLag

from .ingest import AuditStats


class AuditCollector(Collector):
    def __init__(self, stats: AuditStats) -> None:
        self._stats = stats

    def collect(self) -> Any:
        stats = self._stats
        stored = CounterMetricFamily(
            "tokenbus_audit_records_stored", "Records written to the audit store", labels=["kind"]
        )
        stored.add_metric(["request"], stats.requests)
        stored.add_metric(["event"], stats.events)
        stored.add_metric(["verdict"], stats.verdicts)
        yield stored
        skipped = CounterMetricFamily(
            "tokenbus_audit_events_not_stored",
            "Events the fencing rule left out of the stream",
            labels=["reason"],
        )
        skipped.add_metric(["fenced"], stats.fenced)
        skipped.add_metric(["duplicate"], stats.duplicates)
        skipped.add_metric(["gap"], stats.gaps)
        yield skipped
        malformed = CounterMetricFamily(
            "tokenbus_audit_malformed_messages", "Undecodable messages skipped", labels=["topic"]
        )
        for topic, count in stats.malformed.items():
            malformed.add_metric([topic], count)
        yield malformed
        yield CounterMetricFamily(
            "tokenbus_audit_checkpoints", "Signed checkpoints written", value=stats.checkpoints
        )


def audit_lag() -> PartitionLag:
    return PartitionLag(
        "tokenbus_audit_lag_records",
        "Records of tokenbus.requests, tokenbus.tokens and tokenbus.verdicts not yet in "
        "the audit store: "
        "log end minus the store's position",
    )


def serve_metrics(
    stats: AuditStats, port: int, host: str = "127.0.0.1", *, lag: Collector | None = None
) -> WSGIServer:
    """Serve ``/metrics`` on ``host:port``; loopback unless told otherwise. ``lag``: the
    consumer's `PartitionLag`, exported with the counters."""
    registry = CollectorRegistry()
    registry.register(AuditCollector(stats))
    if lag is not None:
        registry.register(lag)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server

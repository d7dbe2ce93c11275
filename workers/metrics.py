"""The worker's Prometheus metrics (``TOKENBUS_WORKER_METRICS_PORT``): what vLLM and
TGI users watch, read from the scheduler when scraped (nothing on the hot path)."""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenbus.bus.lag import PartitionLag

from .batching import Scheduler

# The label of a request for a model this worker does not serve (client-chosen names
# never become label values: each would be a new series).
UNKNOWN_MODEL = "unknown"

# From a few tokens on a GPU to a long queue and a long answer on a busy CPU worker.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class RequestMetrics(Collector):
    """The Kafka side's figures: end-to-end latency and the group's lag.

    The end-to-end latency is observed here, by the worker that published the
    terminal event, once the broker has it: exactly one worker does that per request
    (one that finds the stream already ended publishes nothing), so each request is
    counted once. The relay would count it once per relay instance (each reads every
    partition) and only while one holds the stream; analytics is optional.
    """

    def __init__(self) -> None:
        self.latency = Histogram(
            "tokenbus_worker_e2e_request_latency_seconds",
            "Submission (submitted_at) to the terminal event's ts, by the worker that "
            "published it; outcome is the finish reason, or 'failed'",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.lag = PartitionLag(
            "tokenbus_worker_lag_records",
            "Records of tokenbus.requests this worker holds and has not finished: "
            "log end minus the offset it commits up to (in flight, queued, not fetched)",
        )

    def collect(self) -> Any:
        yield from self.latency.collect()
        yield from self.lag.collect()


class WorkerCollector(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Any:
        scheduler, stats = self._scheduler, self._scheduler.stats
        sequences = GaugeMetricFamily(
            "tokenbus_worker_sequences", "Sequences in the batch or waiting", labels=["state"]
        )
        sequences.add_metric(["running"], scheduler.in_flight)
        sequences.add_metric(["waiting"], scheduler.waiting)
        yield sequences
        yield GaugeMetricFamily(
            "tokenbus_worker_max_sequences", "Sequences in the batch at most", scheduler.max_batch
        )
        positions = GaugeMetricFamily(
            "tokenbus_worker_kv_cache_positions",
            "KV cache positions: reserved by the sequences in flight, allocated, the cap",
            labels=["kind"],
        )
        positions.add_metric(["reserved"], scheduler.reserved_positions)
        positions.add_metric(["allocated"], scheduler.allocated_positions)
        positions.add_metric(["cap"], scheduler.max_batch_tokens)
        yield positions
        yield CounterMetricFamily(
            "tokenbus_worker_steps", "Forward passes for the whole batch", value=stats.steps
        )
        yield CounterMetricFamily(
            "tokenbus_worker_step_seconds", "Time in those passes", value=stats.step_seconds
        )
        yield CounterMetricFamily(
            "tokenbus_worker_failed_steps",
            "Passes that raised (then run one sequence at a time)",
            value=stats.failed_steps,
        )
        tokens = CounterMetricFamily(
            "tokenbus_worker_tokens", "Tokens prefilled and generated", labels=["kind"]
        )
        tokens.add_metric(["prompt"], stats.prompt_tokens)
        tokens.add_metric(["generated"], stats.generated_tokens)
        yield tokens


def serve_metrics(
    scheduler: Scheduler,
    port: int,
    host: str = "127.0.0.1",
    *,
    requests: RequestMetrics | None = None,
) -> WSGIServer:
    """Serve ``/metrics`` on ``host:port`` from a thread of its own. Loopback unless
    told otherwise: the figures are for the operator's scraper, not the world."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(scheduler))
    if requests is not None:
        registry.register(requests)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server

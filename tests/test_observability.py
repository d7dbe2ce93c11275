"""The observability kit's metrics against a real broker, relay and model: HTTP
requests by route template, end-to-end latency observed once, and consumer lag
(the worker group's on tokenbus.requests, the audit consumer's)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from consumers.audit.metrics import serve_metrics as serve_audit_metrics
from producers import TokenbusClient
from schemas import FailedEvent, FinishedEvent
from tokenbus.bus.kafka import new_consumer, start_producer, stop_all
from tokenbus.bus.lag import PartitionLag
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel

from .audit_support import auditing, publishing, request_message, stream_events
from .conftest import assert_complete, collect, eventually, serving, working

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(collector: Collector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    return samples(generate_latest(registry).decode())


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def test_http_requests_are_counted_by_route_template_not_by_path(
    kafka: KafkaSettings,
) -> None:
    async with serving(kafka) as (_, http):
        assert (await http.get("/healthz")).status_code == 200
        bad_id = await http.get("/v1/requests/not-a-request-id/events")
        unknown = await http.get("/no/such/page")
        invalid = await http.post("/v1/requests", json={"prompt": ""})
        found = samples((await http.get("/metrics")).text)

    total = "tokenbus_http_requests_total"
    events_route = "/v1/requests/{request_id}/events"
    assert found[key(total, method="GET", route="/healthz", status="200")] == 1
    status = str(bad_id.status_code)
    assert 400 <= bad_id.status_code < 500
    assert found[key(total, method="GET", route=events_route, status=status)] == 1
    assert unknown.status_code == 404
    assert found[key(total, method="GET", route="unmatched", status="404")] == 1
    status = str(invalid.status_code)
    assert found[key(total, method="POST", route="/v1/requests", status=status)] == 1
    duration = "tokenbus_http_request_duration_seconds_count"
    assert found[key(duration, method="GET", route=events_route)] == 1
    routes = {dict(labels).get("route") for name, labels in found if name == total}
    assert not any(route and "not-a-request-id" in route for route in routes)


async def test_an_sse_stream_is_timed_to_its_headers_and_counted_once(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    async with (
        serving(kafka) as (url, http),
        working(kafka, smollm) as worker,
        TokenbusClient(url) as client,
    ):
        began = time.time()
        submission = await client.submit(messages=LONG, max_tokens=6, temperature=0)
        events = await collect(client, submission.request_id)
        unknown = await client.submit(prompt="Hi", model="no-such-model", max_tokens=3)
        failed = await collect(client, unknown.request_id)
        took = time.time() - began
        latency = "tokenbus_worker_e2e_request_latency_seconds"
        # Observed once the worker has the broker's ack of the terminal event, which
        # may come after the relay has delivered it.
        await eventually(lambda: len(_counts(scrape(worker.metrics), latency)) == 2)
        found = samples((await http.get("/metrics")).text)
        by_worker = scrape(worker.metrics)

    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent) and isinstance(failed[-1], FailedEvent)
    reason = events[-1].finish_reason.value
    assert _counts(by_worker, latency) == {
        (("model", smollm.name), ("outcome", reason)): 1,
        (("model", "unknown"), ("outcome", "failed")): 1,
    }
    seconds = by_worker[key(f"{latency}_sum", model=smollm.name, outcome=reason)]
    assert 0 < seconds <= took
    events_route = "/v1/requests/{request_id}/events"
    count = found[key("tokenbus_http_requests_total", method="GET", route=events_route,
                      status="200")]  # fmt: skip
    assert count == 2
    timed = found[key("tokenbus_http_request_duration_seconds_sum", method="GET",
                      route=events_route)]  # fmt: skip
    assert timed < took


def _counts(found: Samples, histogram: str) -> dict[tuple[tuple[str, str], ...], float]:
    name = f"{histogram}_count"
    return {labels: value for (found_name, labels), value in found.items() if found_name == name}


async def test_the_worker_lag_counts_requests_not_yet_finished(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    lag = "tokenbus_worker_lag_records"
    async with (
        serving(kafka) as (url, http),
        working(kafka, smollm) as worker,
        TokenbusClient(url) as client,
    ):
        submission = await client.submit(messages=LONG, max_tokens=400, temperature=0)

        def behind() -> float:
            found = scrape(worker.metrics)
            return sum(v for (name, _), v in found.items() if name == lag)

        await eventually(lambda: behind() == 1)  # in flight: not committed past it
        assert (await http.delete(f"/v1/requests/{submission.request_id}")).status_code == 202
        assert_complete(await collect(client, submission.request_id))
        await eventually(lambda: behind() == 0)
        found = scrape(worker.metrics)
    partitions = {dict(labels)["partition"] for name, labels in found if name == lag}
    assert partitions == {"0", "1", "2", "3"}
    assert {dict(labels)["topic"] for name, labels in found if name == lag} == {
        kafka.topics.requests
    }


@pytest.mark.broker_behaviour
async def test_lag_is_the_fetch_high_watermark_minus_what_is_done(kafka: KafkaSettings) -> None:
    """After a multi-record batch too, where Tansu's ListOffsets falls short; and for
    a paused partition, which is not fetched."""
    tp = TopicPartition(kafka.topics.tokens, 0)
    producer = await start_producer(kafka, linger_ms=50)
    consumer = new_consumer(kafka)
    try:
        batch = [await producer.send(tp.topic, b"x", partition=0) for _ in range(5)]
        for delivery in batch:
            await delivery
        await consumer.start()
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        read = 0
        async with asyncio.timeout(30):
            while read < 5:
                fetched = await consumer.getmany(timeout_ms=1000)
                read += sum(len(records) for records in fetched.values())
        lag = PartitionLag("test_lag_records", "test", refresh_s=0)
        await lag.measure(consumer)
        assert lag.records == {tp: 0}
        await lag.measure(consumer, lambda _: 2)
        assert lag.records == {tp: 3}
        assert scrape(lag)[key("test_lag_records", topic=tp.topic, partition="0")] == 3

        consumer.pause(tp)
        for _ in range(2):
            await producer.send_and_wait(tp.topic, b"y", partition=0)

        async def two_behind() -> bool:  # the end of a paused partition is asked aside
            await lag.measure(consumer)
            return lag.records == {tp: 2}

        await eventually(two_behind)
    finally:
        await stop_all(consumer, producer)


@pytest.mark.broker_behaviour
async def test_the_audit_lag_is_served_and_reaches_zero(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    request = request_message()
    port = free_port()
    async with (
        publishing(kafka) as log,
        auditing(kafka, str(tmp_path / "audit.db"), Ed25519PrivateKey.generate()) as consumer,
    ):
        await log.request(request)
        await log.events(stream_events(request.request_id, tokens=4))
        await eventually(lambda: log.reached_by(consumer.positions))
        await eventually(lambda: bool(consumer.lag.records))
        await eventually(lambda: all(v == 0 for v in consumer.lag.records.values()))
        server = serve_audit_metrics(consumer.stats, port, lag=consumer.lag)
        try:
            async with httpx.AsyncClient() as http:
                found = samples((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
        finally:
            server.shutdown()
            server.server_close()
    series = {
        (dict(labels)["topic"], dict(labels)["partition"]): value
        for (name, labels), value in found.items()
        if name == "tokenbus_audit_lag_records"
    }
    written = {(topic, str(partition)) for topic, partition in log.ends}
    assert written <= set(series)
    assert all(value == 0 for value in series.values())

"""The embedded broker (Tansu) keeps its log in memory: a restart empties it. Every
reader must notice that the log is now younger than its position and read it from
the start; before, the relay's hub waited at its old offset and live subscribers of
new requests got nothing while /readyz said 200.

Tansu-specific (Apache Kafka keeps its log), so this runs in the Tansu run, on an
embedded broker of its own that it restarts."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from producers import TokenbusClient
from producers.submitter import Submitter
from schemas import Cancel, uuid7
from tokenbus.bus.broker import EmbeddedBroker
from tokenbus.bus.kafka import ensure_topics, new_consumer, new_producer
from tokenbus.bus.ports import free_port
from tokenbus.bus.restarts import LogRestarts
from tokenbus.bus.settings import KafkaSettings
from workers.control import CancelWatcher

from .conftest import ON_TANSU, assert_complete, collect, eventually, serving
from .test_fanout import TOKENS, metric, publish_stream, submit_only

pytestmark = [
    pytest.mark.broker_behaviour,
    pytest.mark.skipif(
        not ON_TANSU, reason="Tansu-specific: only the embedded broker loses its log on restart"
    ),
]


async def test_after_a_restart_with_an_empty_log_live_subscribers_get_their_events() -> None:
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    try:
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}."
        )
        await ensure_topics(kafka)
        async with serving(kafka) as (url, http), TokenbusClient(url) as client:
            await eventually(lambda: _ready(http))
            # Streams before the restart move the hub's positions well past zero.
            for _ in range(2):
                before = await submit_only(kafka)
                reader = asyncio.create_task(collect(client, before.request_id))
                await publish_stream(kafka, before)
                assert_complete(await asyncio.wait_for(reader, 60))

            broker.stop()
            broker.start()
            await ensure_topics(kafka)
            # The hub notices the new (empty) log before the new stream is written, so
            # what it reads is counted once; that it would read the stream anyway, had
            # the stream come first, is test_a_new_log_written_before_the_hub_looks_...
            await eventually(lambda: _restarts_seen(http))

            read_before = await metric(http, "tokenbus_relay_events_read_total")
            after = await submit_only(kafka)
            reader = asyncio.create_task(collect(client, after.request_id))
            await eventually(lambda: _subscribed(http))
            await publish_stream(kafka, after)
            events = await asyncio.wait_for(reader, 60)
            assert_complete(events)
            assert len(events) == TOKENS + 2
            # Delivered live by the hub, which read the new log, not only by a log read.
            read = await metric(http, "tokenbus_relay_events_read_total") - read_before
            assert read == TOKENS + 2
            assert (await http.get("/readyz")).status_code == 200
    finally:
        broker.stop()


async def test_the_cancel_watcher_reads_a_restarted_log_from_its_start() -> None:
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    try:
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}.",
            partitions=1,
        )  # fmt: skip
        await ensure_topics(kafka)
        cancels = CancelWatcher(kafka)
        task = asyncio.create_task(cancels.run())
        try:
            await eventually(cancels.caught_up.is_set)
            early = [uuid7() for _ in range(5)]
            await _cancel(kafka, *early)
            await eventually(lambda: all(cancels.cancelled(r) for r in early))

            broker.stop()
            broker.start()
            await ensure_topics(kafka)
            late = uuid7()
            await _cancel(kafka, late)
            await eventually(lambda: cancels.cancelled(late) is not None)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        broker.stop()


async def test_a_reader_notices_a_new_log_that_has_already_passed_its_position() -> None:
    """The race the high watermark alone loses: the restarted broker's log grows past
    the reader's old position before the reader looks. The new cluster id tells."""
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    try:
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}.",
            partitions=1,
        )  # fmt: skip
        await ensure_topics(kafka)
        tp = TopicPartition(kafka.topics.control, 0)
        await _produce(kafka, tp, [b"old-0", b"old-1", b"old-2"])
        consumer = new_consumer(kafka)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            restarts = LogRestarts(consumer, check_cluster_every_s=0)
            assert await _read(consumer, tp, 3) == [b"old-0", b"old-1", b"old-2"]
            assert await restarts.rewind([tp]) == []  # the same cluster, at its end

            broker.stop()
            broker.start()
            await ensure_topics(kafka)
            new = [f"new-{i}".encode() for i in range(5)]
            await _produce(kafka, tp, new)

            async def rewound() -> bool:
                return await restarts.rewind([tp]) == [tp]

            await eventually(rewound)
            assert await _read(consumer, tp, 5) == new
            assert restarts.count == 1
        finally:
            await consumer.stop()
    finally:
        broker.stop()


async def _produce(kafka: KafkaSettings, tp: TopicPartition, values: list[bytes]) -> None:
    producer = new_producer(kafka)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(tp.topic, value, partition=tp.partition)
    finally:
        await producer.stop()


async def _read(consumer: AIOKafkaConsumer, tp: TopicPartition, count: int) -> list[bytes]:
    values: list[bytes] = []
    async with asyncio.timeout(30):
        while len(values) < count:
            batches = await consumer.getmany(tp, timeout_ms=500)
            values += [record.value for record in batches.get(tp, []) if record.value]
    return values


async def _cancel(kafka: KafkaSettings, *request_ids: uuid.UUID) -> None:
    submitter = Submitter(kafka)
    try:
        for request_id in request_ids:
            await submitter.cancel(Cancel(request_id=request_id, ts=datetime.now(UTC)))
    finally:
        await submitter.close()


async def _restarts_seen(http: httpx.AsyncClient) -> bool:
    return await metric(http, "tokenbus_relay_log_restarts_total") >= 1


async def _subscribed(http: httpx.AsyncClient) -> bool:
    return await metric(http, "tokenbus_relay_subscribers") == 1


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200

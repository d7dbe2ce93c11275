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

from producers import TokenbusClient
from producers.submitter import Submitter
from schemas import Cancel, uuid7
from tokenbus.bus.broker import EmbeddedBroker
from tokenbus.bus.kafka import ensure_topics
from tokenbus.bus.settings import KafkaSettings
from workers.control import CancelWatcher

from .conftest import ON_TANSU, assert_complete, collect, eventually, free_port, serving
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


async def _cancel(kafka: KafkaSettings, *request_ids: uuid.UUID) -> None:
    submitter = Submitter(kafka)
    try:
        for request_id in request_ids:
            await submitter.cancel(Cancel(request_id=request_id, ts=datetime.now(UTC)))
    finally:
        await submitter.close()


async def _subscribed(http: httpx.AsyncClient) -> bool:
    return await metric(http, "tokenbus_relay_subscribers") == 1


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200

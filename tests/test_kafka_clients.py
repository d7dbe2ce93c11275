"""The Kafka clients every part builds (`tokenbus.bus.kafka`), on whichever broker the
session runs: the idempotent producer where the broker grants a producer id, topics
every broker serves once `ensure_topics` returns."""

from __future__ import annotations

import asyncio
import uuid

import anyio
import pytest
from aiokafka.errors import KafkaError

from tokenbus.bus.kafka import (
    ensure_topics,
    new_consumer,
    partitions_of,
    start_producer,
    stop_all,
)
from tokenbus.bus.settings import KafkaSettings

from .conftest import ON_TANSU, Broker, eventually

pytestmark = pytest.mark.broker_behaviour


def _settings(broker: Broker, **overrides: object) -> KafkaSettings:
    prefix = f"c{uuid.uuid4().hex[:10]}."
    return KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix=prefix, **overrides)  # type: ignore[arg-type]


async def test_the_producer_is_idempotent_wherever_the_broker_grants_a_producer_id(
    broker: Broker,
) -> None:
    kafka = _settings(broker)
    await ensure_topics(kafka)
    producer = await start_producer(kafka)
    try:
        # Apache Kafka grants one; Tansu advertises InitProducerId but refuses it.
        idempotent = producer._txn_manager is not None
        assert idempotent is not ON_TANSU
        await producer.send_and_wait(kafka.topics.requests, b"x", key=b"k")
    finally:
        await producer.stop()


async def test_idempotence_required_of_a_broker_that_refuses_it_is_a_clear_error(
    broker: Broker,
) -> None:
    kafka = _settings(broker, enable_idempotence=True)
    await ensure_topics(kafka)
    if not ON_TANSU:
        producer = await start_producer(kafka)
        assert producer._txn_manager is not None
        await producer.stop()
        return
    with pytest.raises(KafkaError, match="TOKENBUS_ENABLE_IDEMPOTENCE=true cannot be honoured"):
        await start_producer(kafka)


async def test_idempotence_turned_off_is_off(broker: Broker) -> None:
    kafka = _settings(broker, enable_idempotence=False)
    await ensure_topics(kafka)
    producer = await start_producer(kafka)
    try:
        assert producer._txn_manager is None
    finally:
        await producer.stop()


async def test_once_ensure_topics_returns_a_fresh_reader_finds_every_partition(
    broker: Broker,
) -> None:
    kafka = _settings(broker, partitions=3)
    await ensure_topics(kafka)
    consumer = new_consumer(kafka)
    await consumer.start()
    try:
        for topic in kafka.topics.all():
            assert [tp.partition for tp in await partitions_of(consumer, topic)] == [0, 1, 2]
    finally:
        # aiokafka's consumer stopped before its background task first ran raises
        # CancelledError (on Tansu nothing above needed to wait): let it run once.
        await asyncio.sleep(0)
        await consumer.stop()


async def test_a_group_consumer_stopped_under_a_cancel_still_closes_its_connections(
    broker: Broker,
) -> None:
    """aiokafka's stop() cancelled while it waits for the group's coordination task
    leaves the consumer's connections open for good (a worker cancelled at the end
    of a test leaked two, and the next test failed on their ResourceWarning).
    `stop_all` finishes the stop first, then raises the cancel."""
    kafka = _settings(broker, partitions=1)
    await ensure_topics(kafka)
    consumer = new_consumer(kafka, group_id=f"{kafka.topic_prefix}group")
    consumer.subscribe([kafka.topics.requests])
    await consumer.start()
    try:
        await eventually(lambda: bool(consumer.assignment()), within=60)
        stopping = asyncio.create_task(stop_all(consumer))
        await asyncio.sleep(0)  # let it begin: stop() now waits on the coordination task
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        open_connections = [c for c in consumer._client._conns.values() if c.connected()]
        assert open_connections == []
    finally:
        await consumer.stop()  # returns at once once stopped


async def test_a_stop_cut_short_by_a_cancel_scope_ends_in_that_scope(broker: Broker) -> None:
    """The cancellation `stop_all` raises once the stop is done is the one it got,
    so anyio's scope knows it as its own; a new, bare one escaped ``move_on_after``
    (a relay's log read cut short by its deadline while stopping; CI of stop 23)."""
    kafka = _settings(broker, partitions=1)
    await ensure_topics(kafka)
    consumer = new_consumer(kafka)
    await consumer.start()
    with anyio.move_on_after(0) as scope:  # cancels at stop_all's first wait
        await stop_all(consumer)
    assert scope.cancelled_caught
    assert [c for c in consumer._client._conns.values() if c.connected()] == []


async def test_a_stop_that_never_ends_is_abandoned_and_its_connections_closed(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka's group coordinator can wait for ever when it closes
    (aio-libs/aiokafka#773); a process must still shut down, so `stop_all` gives a
    stop ``within_s`` and then closes the client's connections itself."""
    kafka = _settings(broker, partitions=1)
    await ensure_topics(kafka)
    consumer = new_consumer(kafka, group_id=f"{kafka.topic_prefix}group")
    consumer.subscribe([kafka.topics.requests])
    await consumer.start()
    await eventually(lambda: bool(consumer.assignment()), within=60)
    coordinator = consumer._coordinator
    assert coordinator is not None
    close = coordinator.close
    swallowed = 0

    async def close_never_ending() -> None:
        nonlocal swallowed
        while True:  # a task that swallows its cancel, like the heartbeat of #773
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 1:
                    break  # let the test end its own task at the end

    coordinator.close = close_never_ending
    try:
        async with asyncio.timeout(20):
            await stop_all(consumer, within_s=1)
        assert [c for c in consumer._client._conns.values() if c.connected()] == []
        assert "took over 1 s: closing its connections" in caplog.text
    finally:
        coordinator.close = close
        await close()  # its tasks (its heartbeat reconnected meanwhile) and their
        await consumer._client.close()  # connections, so that this test leaks none

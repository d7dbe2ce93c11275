"""The one place Kafka clients are built, so every part talks to the broker alike:
each takes its connection options (servers, TLS, SASL) from `client_options`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    UnknownError,
    UnsupportedVersionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest

from schemas import message_key

from .kafka_connection import KafkaSetupError, check_connection, client_options, ssl_context
from .settings import KafkaSettings

__all__ = [
    "KafkaSetupError",
    "TopicMissing",
    "at_end",
    "check_connection",
    "client_options",
    "ensure_topics",
    "new_consumer",
    "new_producer",
    "partitions_of",
    "position_now",
    "ssl_context",
    "start_producer",
    "stop_all",
]

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_T = TypeVar("_T")
# Fewer brokers up and unfenced than the replication factor: a cluster (re)starting.
_INVALID_REPLICATION_FACTOR = 38
_REPLICA_NOT_AVAILABLE = 9


def new_producer(
    kafka: KafkaSettings, *, idempotent: bool = False, **overrides: Any
) -> AIOKafkaProducer:
    """A producer, not started; `start_producer` is what the parts use."""
    options: dict[str, Any] = client_options(kafka) | {
        "acks": "all",
        "enable_idempotence": idempotent,
        "linger_ms": kafka.linger_ms,
    }
    return AIOKafkaProducer(**(options | overrides))


async def start_producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A started producer, idempotent wherever the broker supports it.

    ``enable_idempotence`` unset means: ask the broker. An idempotent producer
    gets its producer id at start (InitProducerId), so a broker that lacks it
    (Tansu advertises the API but answers with an unknown error) refuses at once
    and the producer is started again without. Set to true, that refusal is an
    error; set to false, the broker is not asked.
    """
    wanted = kafka.enable_idempotence
    producer = new_producer(kafka, idempotent=wanted is not False, **overrides)
    try:
        with _quiet_producer_id_refusal():
            await producer.start()
    except (UnknownError, UnsupportedVersionError) as exc:
        await stop_all(producer)
        if wanted:
            raise KafkaError(
                f"the broker at {kafka.bootstrap} refuses InitProducerId ({exc!r}), so "
                "TOKENBUS_ENABLE_IDEMPOTENCE=true cannot be honoured: unset it"
            ) from exc
        _log_once(kafka.bootstrap)
        producer = new_producer(kafka, idempotent=False, **overrides)
        try:
            await producer.start()
        except BaseException:
            await stop_all(producer)
            raise
    except BaseException:
        await stop_all(producer)
        raise
    return producer


_told: set[str] = set()


class _ProducerIdRefusal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "InitProducerId" not in record.getMessage()


@contextlib.contextmanager
def _quiet_producer_id_refusal() -> Iterator[None]:
    """aiokafka logs a refused InitProducerId as an error; here it is an answer
    (the broker has no idempotent producer), which start_producer reports itself."""
    sender = logging.getLogger("aiokafka.producer.sender")
    refusal = _ProducerIdRefusal()
    sender.addFilter(refusal)
    try:
        yield
    finally:
        sender.removeFilter(refusal)


def _log_once(bootstrap: str) -> None:
    if bootstrap not in _told:
        _told.add(bootstrap)
        log.info(
            "the broker at %s has no idempotent producer (InitProducerId): producing "
            "with acks=all alone, so a retried send may be written twice (readers "
            "drop such duplicates by seq)",
            bootstrap,
        )


STOP_WITHIN_S = 30.0


async def stop_all(
    *clients: AIOKafkaConsumer | AIOKafkaProducer | None, within_s: float = STOP_WITHIN_S
) -> None:
    """Stop each client to its end, even if the caller is cancelled meanwhile (the
    cancel is raised once all are stopped), in ``within_s`` at most each. ``None``
    stands for a client not made yet (a ``finally`` reached before it was).

    aiokafka's ``stop()`` is not cancel-safe: it marks the client closed first, then
    waits (a group consumer for its coordination task, possibly mid-JoinGroup), and
    closes the connections last. Cancelled in that wait, it leaves them open for good,
    since a second ``stop()`` returns at once. So it runs to its end (`to_completion`);
    but one that has not ended in ``within_s`` (aiokafka's group coordinator can wait
    for ever on its own tasks: aio-libs/aiokafka#773) is abandoned and the client's
    connections closed, so a process can always shut down. A group then sees the
    member gone at its session timeout instead of at once.

    The cancellation raised is the one received, not a new one: anyio knows its
    cancel scope's own by the message it carries, and would take a bare one for a
    cancellation from outside (a read cut short by ``move_on_after`` would raise)."""
    cancelled: asyncio.CancelledError | None = None
    for client in clients:
        if client is None:
            continue
        try:
            await to_completion(_stop(client, within_s))
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        raise cancelled


async def _stop(client: AIOKafkaConsumer | AIOKafkaProducer, within_s: float) -> None:
    stopping = asyncio.ensure_future(client.stop())
    await asyncio.wait([stopping], timeout=within_s)
    if not stopping.done():
        log.error(
            "stopping a Kafka %s took over %g s: closing its connections without waiting "
            "for the rest (a consumer group sees this member gone at its session timeout)",
            type(client).__name__, within_s,
        )  # fmt: skip
        stopping.cancel()
        # Cancelled where it waits (a task of aiokafka's that swallows the cancel may
        # not end: not waited for long); what it had not done yet is done here.
        await asyncio.wait([stopping], timeout=1)
        await client._client.close()  # the network client: every connection it holds
    elif not stopping.cancelled() and (exc := stopping.exception()) is not None:
        log.warning("stopping a Kafka client failed: %r", exc)


def new_consumer(
    kafka: KafkaSettings, *topics: str, group_id: str | None = None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = client_options(kafka) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }
    return AIOKafkaConsumer(*topics, **(options | overrides))


async def ensure_topics(kafka: KafkaSettings, *, timeout_s: float = 30.0) -> None:
    """Create the topics if they are missing (an existing topic is left alone), and
    return once every broker can lead and serve each of their partitions.

    Apache Kafka answers CreateTopics once the controller has the topic; each
    broker learns of it a moment later. A reader started in that moment finds no
    such topic, so this waits until every broker's metadata lists every partition
    with a leader. While too few brokers are up and unfenced for the replication
    factor (a cluster starting or restarting) the controller refuses the topic;
    that is asked again until ``timeout_s``, then reported."""
    admin = AIOKafkaAdminClient(**client_options(kafka))
    wanted = kafka.topics.all()
    refusal = ""
    try:
        await admin.start()  # inside: one failing halfway is closed too
        async with asyncio.timeout(timeout_s):
            while refusal := await _create(admin, kafka, wanted):  # noqa: ASYNC110
                await asyncio.sleep(0.5)  # brokers coming back; bounded by the timeout
            while not await _known_everywhere(admin, list(wanted)):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # metadata propagating; bounded by the timeout
    except TimeoutError as exc:
        if refusal:
            raise KafkaError(f"{refusal}, still after {timeout_s:g}s") from exc
        raise KafkaError(
            f"the topics {', '.join(wanted)} were created but not every broker of "
            f"{kafka.bootstrap} serves them after {timeout_s:g}s"
        ) from exc
    finally:
        await admin.close()
    log.info("topics ready: %s (%d partitions)", ", ".join(wanted), kafka.partitions)


async def _create(admin: AIOKafkaAdminClient, kafka: KafkaSettings, names: tuple[str, ...]) -> str:
    """Create what is missing; the reason when too few brokers can take the replicas
    now (asked again), empty once every topic exists."""
    response = await admin.create_topics(
        [NewTopic(name, kafka.partitions, kafka.replication_factor) for name in names]
    )
    for name, code, message in response.topic_errors:
        if code == _INVALID_REPLICATION_FACTOR:
            return f"could not create topic {name!r}: {message} (error {code})"
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            raise KafkaError(f"could not create topic {name!r}: {message} (error {code})")
    return ""


async def _known_everywhere(admin: AIOKafkaAdminClient, topics: list[str]) -> bool:
    client = admin._client  # the admin's connected client; its API has no per-node send
    await client.force_metadata_update()
    for broker in client.cluster.brokers():
        try:
            metadata = (await client.send(broker.nodeId, MetadataRequest(topics))).to_object()
        except KafkaError as exc:
            if exc.retriable:  # a broker starting or stopping: ask again
                return False
            raise
        for topic in metadata["topics"]:
            if topic["error_code"] != 0 or not topic["partitions"]:
                return False
            # A partition with a replica down still serves (REPLICA_NOT_AVAILABLE).
            if any(
                p["error_code"] not in (0, _REPLICA_NOT_AVAILABLE) or p["leader"] < 0
                for p in topic["partitions"]
            ):
                return False
    return True


class TopicMissing(KafkaError):  # type: ignore[misc]
    """A topic tokenbus reads does not exist; `tokenbus topics` creates it."""


def partition_for(request_id: uuid.UUID, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in the Java client and
    aiokafka) puts a request's messages on. Requests and tokens have the same count,
    so a request and its tokens share a partition index."""
    return (int(murmur2(message_key(request_id))) & 0x7FFFFFFF) % partitions


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic``, as the broker says now.

    A consumer's client knows only the topics it tracks: on Apache Kafka a fresh
    one knows none (Tansu sends every topic in the first metadata answer), so the
    topic is added to what it tracks, which fetches its metadata."""
    ids = consumer.partitions_for_topic(topic)
    if not ids:
        await consumer._client.add_topic(topic)
        ids = consumer.partitions_for_topic(topic)
    if not ids:
        raise TopicMissing(f"topic {topic!r} does not exist; `tokenbus topics` creates it")
    return [TopicPartition(topic, p) for p in sorted(ids)]


def position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position in ``tp`` if it has one now, else None, without
    waiting. aiokafka's ``position()`` waits until a pending reset completes, and a
    reset needs the partition's leader: with a broker away that is the whole outage,
    which a metrics read or a check in a reader's loop must not wait out. (Reads
    aiokafka's subscription state, which it has no public way to ask.)"""
    if tp not in consumer.assignment():
        return None
    state = consumer._subscription.subscription.assignment.state_value(tp)
    return state.position if state is not None and state.has_valid_position else None


async def to_completion(step: Awaitable[_T]) -> _T:
    """Await ``step`` to its end even if the caller is cancelled meanwhile (however
    often: anyio re-delivers a scope's cancellation); the cancellation is raised
    once it is done. For a client's start and stop: cut halfway, they leave a
    connection that nothing closes."""
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        raise


async def at_end(consumer: AIOKafkaConsumer, *partitions: TopicPartition) -> bool:
    """Whether the consumer has read everything in these partitions so far.

    Uses the high-watermark from fetch responses, not ListOffsets(LATEST): Tansu
    answers the latter with the last batch's base offset + 1, short of the end
    after a multi-record batch.
    """
    for tp in partitions:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True

"""The one place Kafka clients are built, so every part talks to the broker alike."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from .settings import KafkaSettings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def new_producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "client_id": kafka.client_id,
        "acks": "all",
        "enable_idempotence": kafka.enable_idempotence,
        "linger_ms": kafka.linger_ms,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    return AIOKafkaProducer(**(options | overrides))


def new_consumer(
    kafka: KafkaSettings, *topics: str, group_id: str | None = None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "client_id": kafka.client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    return AIOKafkaConsumer(*topics, **(options | overrides))


async def ensure_topics(kafka: KafkaSettings) -> None:
    """Create the three topics if they are missing (an existing topic is left alone)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id=kafka.client_id)
    await admin.start()
    try:
        wanted = kafka.topics.all()
        response = await admin.create_topics(
            [NewTopic(name, kafka.partitions, kafka.replication_factor) for name in wanted]
        )
        for name, code, message in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise KafkaError(f"could not create topic {name!r}: {message} (error {code})")
    finally:
        await admin.close()
    log.info("topics ready: %s (%d partitions)", ", ".join(wanted), kafka.partitions)


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

"""This worker as a member of the ``tokenbus-workers`` group: joining it, and what a
rebalance or an expulsion does to the partitions it owns.

aiokafka tells a member of a rebalance through a listener: every partition is
revoked when it begins and the new assignment arrives when it ends. The listener
here turns that into terms of ownership (ownership.py; the assignor keeps most
partitions where they are, assignor.py) and forgets the offsets of partitions
lost (offsets.py): their requests are uncommitted, so their new owners serve them.

aiokafka does not tell a member that the group expelled it (it froze past its
session timeout, and its partitions are someone else's already). It resets the
member's generation before rejoining, in a private attribute of the consumer;
`expelled` reads it. That is the one read of aiokafka's private state in the
workers, and `tests/test_membership.py` pins it, so that an aiokafka upgrade that
moves it fails a test rather than leaving expelled workers generating on.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.protocol.commit import OffsetCommitRequest

from tokenbus.bus.kafka import new_consumer
from tokenbus.bus.settings import KafkaSettings, WorkerSettings

from .assignor import StickyAssignor
from .offsets import OffsetTracker
from .ownership import Ownership

log = logging.getLogger(__name__)


def group_consumer(
    kafka: KafkaSettings, settings: WorkerSettings, ownership: Ownership, offsets: OffsetTracker
) -> AIOKafkaConsumer:
    """A consumer of ``tokenbus.requests`` in the worker group, not yet started,
    whose rebalances move ``ownership`` and ``offsets``."""
    consumer = new_consumer(
        kafka,
        group_id=settings.group_id,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,  # a request waits for it on Tansu
        # One assignor only: aiokafka 0.14 sends a JoinGroup per assignor offered,
        # and on Apache Kafka the second restarts the rebalance (aiokafka#1168).
        partition_assignment_strategy=(StickyAssignor(lambda: ownership.partitions),),
    )
    consumer.subscribe([kafka.topics.requests], listener=_Rebalance(consumer, ownership, offsets))
    return consumer


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self, consumer: AIOKafkaConsumer, ownership: Ownership, offsets: OffsetTracker
    ) -> None:
        self._consumer = consumer
        self._ownership = ownership
        self._offsets = offsets

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._ownership.partitions and expelled(self._consumer):
            # The group expelled us (we froze past the session timeout): our
            # partitions are someone else's already. Stop everything at once.
            lost = self._ownership.lose_all()
            self._offsets.forget(lost)
            log.warning("expelled from the group; stopping the requests of %s", _names(lost))
        else:
            self._ownership.rebalancing()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        assigned = set(assigned)
        held = self._ownership.partitions
        lost = await self._ownership.assigned(assigned)
        # Queued and running jobs of lost partitions are dropped (the worker checks
        # its term before serving and at every step): they are uncommitted, so the
        # partitions' new owners serve them.
        self._offsets.forget(lost)
        log.info("partitions kept %s, lost %s, new %s", _names(held & assigned), _names(lost),
                 _names(assigned - held))  # fmt: skip


def expelled(consumer: AIOKafkaConsumer | None) -> bool:
    """Whether the group has expelled this member: aiokafka then resets its
    generation before rejoining (a private attribute, read with a fallback)."""
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", 0)
    return bool(generation == OffsetCommitRequest.DEFAULT_GENERATION_ID)


def _names(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"

"""The one read of aiokafka's private state in the workers, pinned.

A worker that the group expelled (it froze past its session timeout) must stop its
requests at once: their partitions are someone else's already. aiokafka says so
only by resetting the member's generation, on the consumer's private group
coordinator, and `workers.membership.expelled` reads it there with a fallback. An
aiokafka that moved it would make the fallback answer "not expelled" for ever, and
an expelled worker would generate on; these tests fail first.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.commit import OffsetCommitRequest

from workers.membership import expelled

MOVED = (
    "aiokafka no longer keeps the group generation where workers.membership.expelled "
    "reads it (consumer._coordinator.generation): an expelled worker would generate on. "
    "Find where this aiokafka keeps it and read it there."
)


async def test_a_group_consumer_keeps_its_group_coordinator_where_expelled_reads_it() -> None:
    consumer = AIOKafkaConsumer(group_id="tokenbus-workers", bootstrap_servers="127.0.0.1:9")
    try:
        assert hasattr(consumer, "_coordinator"), MOVED
        assert not expelled(consumer)  # not started: no coordinator yet
    finally:
        await consumer.stop()
    # Started in a group, the consumer keeps a GroupCoordinator there.
    assert "self._coordinator = GroupCoordinator(" in inspect.getsource(AIOKafkaConsumer.start), (
        MOVED
    )


def test_a_member_whose_generation_aiokafka_resets_is_expelled() -> None:
    coordinator = SimpleNamespace(generation=7, member_id="m", request_rejoin=lambda: None)
    consumer = SimpleNamespace(_coordinator=coordinator)
    assert not expelled(consumer)
    # What aiokafka does when the group no longer knows the member (a heartbeat or a
    # commit answered UnknownMemberId or IllegalGeneration).
    GroupCoordinator.reset_generation(coordinator)
    assert coordinator.generation == OffsetCommitRequest.DEFAULT_GENERATION_ID, MOVED
    assert expelled(consumer)

"""Terms of ownership: kept through a rebalance, ended when a partition moves."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from workers.ownership import Ownership

P0, P1, P2 = (TopicPartition("tokenbus.requests", p) for p in range(3))


async def test_a_partition_kept_through_a_rebalance_keeps_its_term() -> None:
    ownership = Ownership()
    assert await ownership.assigned({P0, P1}) == set()
    t0, t1 = ownership.term(P0), ownership.term(P1)
    assert t0 is not None and t1 is not None and t0 != t1
    ownership.rebalancing()
    assert not ownership.settled.is_set()
    assert ownership.holds(P0, t0) and ownership.holds(P1, t1)  # held until told otherwise
    assert await ownership.assigned({P0, P2}) == {P1}
    assert ownership.settled.is_set()
    assert ownership.holds(P0, t0) and not ownership.holds(P1, t1)
    assert ownership.term(P1) is None and ownership.term(P2) is not None


async def test_a_partition_that_comes_back_starts_a_new_term() -> None:
    ownership = Ownership()
    await ownership.assigned({P0})
    first = ownership.term(P0)
    assert first is not None
    await ownership.assigned(set())
    await ownership.assigned({P0})
    assert ownership.term(P0) not in (None, first)
    assert not ownership.holds(P0, first)  # a job of the old term neither commits nor publishes


async def test_an_expelled_member_loses_everything_at_once() -> None:
    ownership = Ownership()
    await ownership.assigned({P0, P1})
    assert ownership.lose_all() == {P0, P1}
    assert ownership.partitions == set() and not ownership.settled.is_set()


async def test_reassigned_waits_for_the_next_assignment() -> None:
    ownership = Ownership()
    await ownership.assigned({P0})
    waiting = asyncio.create_task(ownership.reassigned())
    await asyncio.sleep(0)  # let it start waiting: an assignment before it must not count
    assert not waiting.done()
    await ownership.assigned({P0})
    async with asyncio.timeout(5):
        await waiting

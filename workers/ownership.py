"""Which partitions of ``tokenbus.requests`` this worker owns, through rebalances.

aiokafka's group protocol is eager: at every rebalance each member gives up all
its partitions (``on_partitions_revoked``) and learns its new assignment once the
group has rejoined (``on_partitions_assigned``). Most partitions come back to
the member that had them (`assignor.StickyAssignor` sees to that), and nothing
about a request on such a partition has moved. So a request in flight is not
stopped when the rebalance begins; it goes on generating, and is stopped only if
the new assignment shows that its partition went elsewhere. What it published
meanwhile is continued from by the partition's new owner, and what it published
after the new owner's claim is fenced off (`schemas.fencing`), so the window is
harmless either way.

Each spell of ownership of a partition is a *term*. A job is served under the
term in which its message was received and is abandoned once that term ends: a
partition that leaves and comes back starts a new term, so no job of the old
one commits or publishes for the new.

A member that the group expelled (it froze past its session timeout) has lost
its partitions already, before it rejoins: `lose_all` ends every term at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

from aiokafka import TopicPartition


class Ownership:
    def __init__(self) -> None:
        self._terms: dict[TopicPartition, int] = {}
        self._numbers = itertools.count(1)
        self.settled = asyncio.Event()  # no rebalance in progress
        self.settled.set()
        self._assignments = 0  # assignments so far (`reassigned` waits for the next)
        self._changed = asyncio.Condition()

    @property
    def partitions(self) -> set[TopicPartition]:
        """The partitions held now (during a rebalance: those held when it began)."""
        return set(self._terms)

    def term(self, tp: TopicPartition) -> int | None:
        """The current term of ``tp``; None when this worker does not hold it."""
        return self._terms.get(tp)

    def holds(self, tp: TopicPartition, term: int) -> bool:
        return self._terms.get(tp) == term

    def rebalancing(self) -> None:
        """A rebalance has begun: every partition is held until the assignment says otherwise."""
        self.settled.clear()

    def lose_all(self) -> set[TopicPartition]:
        """End every term now; return the partitions lost."""
        lost, self._terms = set(self._terms), {}
        self.settled.clear()
        return lost

    async def assigned(self, assignment: Iterable[TopicPartition]) -> set[TopicPartition]:
        """The group's new assignment: partitions kept keep their terms, new ones
        start a term, and the rest end theirs. Returns the partitions lost."""
        assignment = set(assignment)
        lost = set(self._terms) - assignment
        for tp in lost:
            del self._terms[tp]
        for tp in sorted(assignment - self._terms.keys()):
            self._terms[tp] = next(self._numbers)
        self.settled.set()
        async with self._changed:
            self._assignments += 1
            self._changed.notify_all()
        return lost

    async def reassigned(self) -> None:
        """Wait for the next assignment (after a commit the group refused, say)."""
        async with self._changed:
            seen = self._assignments
            await self._changed.wait_for(lambda: self._assignments > seen)

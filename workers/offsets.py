"""Which offsets of ``tokenbus.requests`` are safe to commit.

A request's offset may be committed only once its terminal event is on the
broker, and with several requests of one partition in flight, only up to the
lowest one still unfinished: committing past it would lose it if this worker died.
"""

from __future__ import annotations

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._open: dict[TopicPartition, set[int]] = {}
        self._highest: dict[TopicPartition, int] = {}

    def seen(self, tp: TopicPartition, offset: int) -> bool:
        """Whether ``offset`` was received already: a partition kept through a
        rebalance is fetched again from its committed offset."""
        return offset <= self._highest.get(tp, -1)

    def received(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, set()).add(offset)
        self._highest[tp] = max(offset, self._highest.get(tp, -1))

    def finished(self, tp: TopicPartition, offset: int) -> int | None:
        """Mark an offset done; return the offset to commit for ``tp``, if any moved."""
        pending = self._open.get(tp)
        if pending is None or offset not in pending:
            return None  # the partition was revoked meanwhile
        pending.discard(offset)
        return self.committable(tp)

    def committable(self, tp: TopicPartition) -> int | None:
        """The offset to commit for ``tp`` now: its lowest unfinished one, or past the highest."""
        if tp not in self._highest:
            return None
        pending = self._open.get(tp)
        return min(pending) if pending else self._highest[tp] + 1

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._open.pop(tp, None)
            self._highest.pop(tp, None)

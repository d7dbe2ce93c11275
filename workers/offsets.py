"""Which offsets of ``tokenbus.requests`` are safe to commit, and which requests no
other worker can have fetched.

A request's offset may be committed only once its terminal event is on the
broker, and with several requests of one partition in flight, only up to the
lowest one still unfinished: committing past it would lose it if this worker died.

A request that reached the partition's log after this worker took the partition
was fetched by no earlier owner (they gave the partition up before), so it has no
earlier try: the worker starts the model on it before its claim (takeover.py). The
first fetch of a partition taken reports the log's end then; requests from there
on are *unseen*. A request below it may be an earlier owner's, or this worker's
before a restart: one that killed the process it ran in is counted by its claims,
and is never started before the log has been read.
"""

from __future__ import annotations

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._open: dict[TopicPartition, set[int]] = {}
        self._highest: dict[TopicPartition, int] = {}
        self._unseen_from: dict[TopicPartition, int] = {}

    def seen(self, tp: TopicPartition, offset: int) -> bool:
        """Whether ``offset`` was received already: a partition kept through a
        rebalance is fetched again from its committed offset."""
        return offset <= self._highest.get(tp, -1)

    def fetched(self, tp: TopicPartition, highwater: int | None) -> None:
        """A fetch of ``tp`` reported the log's end at ``highwater``; the first since
        this worker took tp marks where unseen requests begin."""
        if highwater is not None:
            self._unseen_from.setdefault(tp, highwater)

    def unseen(self, tp: TopicPartition, offset: int) -> bool:
        """Whether the request at ``offset`` reached the log after this worker took tp."""
        start = self._unseen_from.get(tp)
        return start is not None and offset >= start

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
            self._unseen_from.pop(tp, None)

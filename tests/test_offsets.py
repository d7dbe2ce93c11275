"""Commits go only up to the lowest unfinished offset of a partition."""

from __future__ import annotations

from aiokafka import TopicPartition

from workers.offsets import OffsetTracker

TP = TopicPartition("tokenbus.requests", 0)


def test_commit_waits_for_the_lowest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.received(TP, offset)
    assert tracker.finished(TP, 12) == 10  # 10 and 11 still run: nothing past 10
    assert tracker.finished(TP, 10) == 11
    assert tracker.finished(TP, 11) == 13  # all done: commit after the highest


def test_partitions_are_independent() -> None:
    other = TopicPartition("tokenbus.requests", 1)
    tracker = OffsetTracker()
    tracker.received(TP, 5)
    tracker.received(other, 7)
    assert tracker.finished(other, 7) == 8
    assert tracker.finished(TP, 5) == 6


def test_a_revoked_partition_commits_nothing() -> None:
    tracker = OffsetTracker()
    tracker.received(TP, 3)
    tracker.forget({TP})
    assert tracker.finished(TP, 3) is None


def test_offsets_fetched_again_after_a_rebalance_are_known() -> None:
    tracker = OffsetTracker()
    for offset in (4, 5):
        tracker.received(TP, offset)
    assert tracker.finished(TP, 5) == 4
    # The partition stayed through a rebalance: it is fetched again from 4.
    assert tracker.seen(TP, 4) and tracker.seen(TP, 5) and not tracker.seen(TP, 6)
    assert tracker.committable(TP) == 4
    assert tracker.finished(TP, 4) == 6
    tracker.forget({TP})
    assert not tracker.seen(TP, 4) and tracker.committable(TP) is None

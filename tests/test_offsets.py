"""Commits go only up to the lowest unfinished offset of a partition; requests that
reached a partition after this worker took it are unseen by any other."""

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


def test_requests_after_the_first_fetch_of_a_partition_taken_are_unseen() -> None:
    tracker = OffsetTracker()
    assert not tracker.unseen(TP, 0)  # nothing fetched yet: nothing known
    tracker.fetched(TP, None)  # an assignment not fetched from yet
    assert not tracker.unseen(TP, 0)
    tracker.fetched(TP, 20)  # the log ended at 20: what is below, an earlier owner had
    tracker.fetched(TP, 25)  # later fetches move nothing
    assert not tracker.unseen(TP, 19)
    assert tracker.unseen(TP, 20) and tracker.unseen(TP, 24)


def test_a_partition_lost_and_taken_again_starts_over() -> None:
    tracker = OffsetTracker()
    tracker.fetched(TP, 20)
    tracker.forget({TP})  # lost: another worker may fetch what comes next
    assert not tracker.unseen(TP, 30)
    tracker.fetched(TP, 40)  # taken again
    assert not tracker.unseen(TP, 30) and tracker.unseen(TP, 40)

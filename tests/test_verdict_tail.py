"""The verdict tail holds what it read from its lookback on, for at most
``max_requests`` requests; a strict replay of a request beyond that (older than the
lookback, or dropped from the tail) still gets the verdicts the log holds: the tail
reads them back from the log, rather than waiting for verdicts that will never come
and failing closed; once for all who wait, and no longer than someone waits. With
the real broker; the verdicts are written as a guard writes them, with the
timestamps of an older time where the test needs one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import UTC, datetime

import pytest

from schemas import (
    ModerationMode,
    Verdict,
    Violation,
    encode,
    message_key,
    uuid7,
)
from tokenbus.bus.kafka import start_producer
from tokenbus.bus.log import LogReader
from tokenbus.bus.settings import KafkaSettings
from tokenbus.bus.verdicts import GuardTimeout, VerdictTail

from .conftest import ON_TANSU, eventually, running

pytestmark = pytest.mark.broker_behaviour

TEN_MINUTES_MS = 600_000
FLAG = Violation(seq=2, end_seq=3, category="email", policy="pii.email", policy_version="1",
                 span=(10, 26))  # fmt: skip


def _verdict(rid: uuid.UUID, through: int, *violations: Violation, final: bool = False) -> Verdict:
    return Verdict(request_id=rid, guard="g", epoch=1, judged_through=through,
                   violations=list(violations), tenant="t", mode=ModerationMode.STRICT,
                   policy_version="1", final=final, ts=datetime.now(UTC))  # fmt: skip


def _judged(rid: uuid.UUID) -> list[Verdict]:
    """A guard's verdicts on a stream of six events whose seq 2-3 hold an address."""
    return [_verdict(rid, 1), _verdict(rid, 3, FLAG), _verdict(rid, 5, final=True)]


async def _publish(
    kafka: KafkaSettings, verdicts: list[Verdict], *, timestamp_ms: int | None = None
) -> None:
    """As the guard publishes them (keyed by request id); ``timestamp_ms``: the
    records' timestamp, for a verdict written that long ago."""
    producer = await start_producer(kafka)
    try:
        for verdict in verdicts:
            await producer.send_and_wait(
                kafka.topics.verdicts,
                encode(verdict),
                key=message_key(verdict.request_id),
                timestamp_ms=timestamp_ms,
            )
    finally:
        await producer.stop()


def _in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_a_strict_replay_older_than_the_lookback_gets_its_verdicts_from_the_log(
    kafka: KafkaSettings,
) -> None:
    submitted_ms = int(time.time() * 1000) - TEN_MINUTES_MS
    rid = uuid7(submitted_ms)
    await _publish(kafka, _judged(rid), timestamp_ms=submitted_ms + 1000)
    tail = VerdictTail(kafka, lookback_s=60)
    async with running(tail.run(), tail.caught_up):
        if not ON_TANSU:  # Tansu seeks by when it wrote a record, not by its timestamp
            assert tail.view(rid) is None  # before the lookback: run() did not read them
        # Two strict subscribers at once share one read of the log.
        first, second = await asyncio.gather(
            tail.wait_judged(rid, 5, deadline=_in(30)), tail.wait_judged(rid, 5, deadline=_in(30))
        )
        assert first is second is tail.view(rid)
        assert first.judged_through == 5 and first.final
        assert first.flagged == FLAG and first.withheld(2) and not first.withheld(1)
        assert tail.read_back == 1
        await tail.wait_judged(rid, 5, deadline=_in(30))  # read once: held from now on
        assert tail.read_back == 1


async def test_a_violation_before_the_lookback_is_not_missed_for_a_later_watermark(
    kafka: KafkaSettings,
) -> None:
    """The stream's first verdicts lie before the lookback, its last within: the
    tail's own view has the watermark but not the violation."""
    submitted_ms = int(time.time() * 1000) - TEN_MINUTES_MS
    rid = uuid7(submitted_ms)
    early, late = _judged(rid)[:2], _judged(rid)[2:]
    await _publish(kafka, early, timestamp_ms=submitted_ms + 1000)
    await _publish(kafka, late)  # now
    tail = VerdictTail(kafka, lookback_s=60)
    async with running(tail.run(), tail.caught_up):
        if not ON_TANSU:  # Tansu seeks by when it wrote a record, not by its timestamp
            partial = tail.view(rid)
            assert partial is not None and partial.judged_through == 5
            assert partial.flagged is None
        view = await tail.wait_judged(rid, 5, deadline=_in(30))
        assert view.judged_through == 5 and view.flagged == FLAG


async def test_a_view_dropped_for_max_requests_is_read_back_from_the_log(
    kafka: KafkaSettings,
) -> None:
    tail = VerdictTail(kafka, max_requests=1)
    async with running(tail.run(), tail.caught_up):
        dropped, newer = uuid7(), uuid7()
        await _publish(kafka, _judged(dropped))
        await eventually(lambda: tail.watermark(dropped) == 5)
        await _publish(kafka, [_verdict(newer, 0)])
        await eventually(lambda: tail.view(dropped) is None)
        view = await tail.wait_judged(dropped, 5, deadline=_in(30))
        assert view.judged_through == 5 and view.final and view.flagged == FLAG
        assert tail.read_back == 1
        # The view read back is whole: asked again, the tail answers from it.
        await tail.wait_judged(dropped, 5, deadline=_in(30))
        assert tail.read_back == 1


async def test_with_nothing_on_the_log_a_strict_replay_still_fails_closed(
    kafka: KafkaSettings,
) -> None:
    tail = VerdictTail(kafka, lookback_s=60)
    async with running(tail.run(), tail.caught_up):
        never_judged = uuid7(int(time.time() * 1000) - TEN_MINUTES_MS)
        with pytest.raises(GuardTimeout):
            await tail.wait_judged(never_judged, 0, deadline=_in(5))
        assert tail.read_back == 1 and tail.view(never_judged) is None


class _HeldReader(LogReader):
    """A log reader that holds each verdict it has read until let go: a read the
    test can catch under way, its consumer started and fetching."""

    def __init__(self, kafka: KafkaSettings) -> None:
        super().__init__(kafka=kafka)
        self.reading = asyncio.Event()
        self.go = asyncio.Event()

    async def verdicts(self, request_id: uuid.UUID) -> AsyncGenerator[Verdict, None]:
        async with aclosing(super().verdicts(request_id)) as verdicts:
            async for verdict in verdicts:
                self.reading.set()
                await self.go.wait()
                yield verdict


async def test_a_subscriber_that_hangs_up_mid_read_stops_the_read(kafka: KafkaSettings) -> None:
    submitted_ms = int(time.time() * 1000) - TEN_MINUTES_MS
    rid = uuid7(submitted_ms)
    await _publish(kafka, _judged(rid), timestamp_ms=submitted_ms + 1000)
    reader = _HeldReader(kafka)
    tail = VerdictTail(kafka, lookback_s=60, log_reader=reader)
    async with running(tail.run(), tail.caught_up):
        waiting = asyncio.create_task(tail.wait_judged(rid, 5, deadline=_in(30)))
        await asyncio.wait_for(reader.reading.wait(), 30)
        waiting.cancel()  # the subscriber hangs up
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # No one waits for the read now: it is cancelled, and ends once its consumer
        # has stopped.
        await eventually(lambda: not _reads_under_way())
        reader.go.set()
        view = await tail.wait_judged(rid, 5, deadline=_in(30))  # a read of its own
        assert view.flagged == FLAG and tail.read_back == 2


def _reads_under_way() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("verdicts-of-")]

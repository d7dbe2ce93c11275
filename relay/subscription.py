"""One subscriber's stream: seq ``after + 1`` onwards, contiguous, no duplicates,
ending with the terminal event, whatever mix of sources it takes.

    1. register with the hub (taking what it holds and a live queue at once)
    2. if the hub does not hold the stream from `next_seq`, read the log first:
       up to the first held event, or to the end of the log
    3. the held events, then the live queue
    4. a live event beyond `next_seq` (a gap) is filled from the log first;
       an overflowed queue (a slow subscriber) goes back to step 1

Every source is filtered by one rule, ``seq == next_seq``, so overlaps between
them are harmless. Events come in batches (what the hub held, what a fetch from
the log brought, everything queued since the subscriber last looked), so a
subscriber that has fallen a little behind catches up in one write.

When the log no longer holds ``next_seq`` (retention deleted it), the
subscription raises `StreamTruncated` instead of skipping ahead: a client never
sees a silent gap.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing

from schemas import StreamEvent, is_terminal
from tokenbus.bus.log import LogReader
from tokenbus.bus.verdicts import VerdictTail

from .hub import Held, Listener, StreamHub, SubscriberOverflow
from .strict import judged


class StreamTruncated(Exception):
    def __init__(self, request_id: uuid.UUID, wanted: int, available: int | None) -> None:
        where = (
            f"the earliest still held is {available}"
            if available is not None
            else ("none of its events are still held")
        )
        super().__init__(
            f"seq {wanted} of {request_id} is no longer in the log ({where}); "
            "the retention window has passed it"
        )


class ResumedPastEnd(Exception):
    """Asked for events after ``after`` of a stream that ended at ``end`` < ``after``."""

    def __init__(self, request_id: uuid.UUID, after: int, end: int) -> None:
        super().__init__(
            f"request {request_id} ended at seq {end}; there is nothing after seq {after} "
            f"(resume after a seq up to {end})"
        )
        self.end = end


class _Cursor:
    def __init__(self, request_id: uuid.UUID, after: int) -> None:
        self.request_id = request_id
        self.next_seq = after + 1
        self.done = False

    def accept(self, event: StreamEvent) -> bool:
        # Each source (the hub, the log) already applied the fencing rule in log
        # order; here only the seq decides.
        if self.done or event.seq != self.next_seq:
            if not self.done and is_terminal(event) and event.seq < self.next_seq:
                self._ended_before(event.seq)
            return False
        self.next_seq += 1
        self.done = is_terminal(event)
        return True

    def _ended_before(self, end: int) -> None:
        """The stream ended at or before where this subscriber asked to start: no seq
        it waits for can come. (The route answers this before the response starts;
        this covers a stream that ended in between.)"""
        if end == self.next_seq - 1:
            self.done = True  # resumed at the terminal event: complete, nothing to send
        else:
            raise ResumedPastEnd(self.request_id, self.next_seq - 1, end)


async def subscribe(
    hub: StreamHub,
    log: LogReader,
    request_id: uuid.UUID,
    *,
    after: int = -1,
    strict: VerdictTail | None = None,
    strict_wait_s: float = 15.0,
) -> AsyncIterator[list[Held]]:
    """The stream from seq ``after + 1``, in batches (never empty) of contiguous
    events, each batch as much as was at hand. ``strict``: the guard's verdicts, for
    a strictly moderated stream (`relay.strict`; raises `GuardTimeout`)."""
    batches = _subscribe(hub, log, request_id, after)
    if strict is not None:
        batches = judged(batches, strict, request_id, strict_wait_s)
    async with aclosing(batches) as subscription:
        async for batch in subscription:
            yield batch


async def _subscribe(
    hub: StreamHub, log: LogReader, request_id: uuid.UUID, after: int
) -> AsyncGenerator[list[Held], None]:
    cursor = _Cursor(request_id, after)
    while not cursor.done:
        with hub.listen(request_id) as listener:
            try:
                async for batch in _follow(listener, log, request_id, cursor):
                    yield batch
            except SubscriberOverflow:
                continue  # re-register; what we missed comes from the hub or the log


async def subscribe_events(
    hub: StreamHub,
    log: LogReader,
    request_id: uuid.UUID,
    *,
    after: int = -1,
    strict: VerdictTail | None = None,
    strict_wait_s: float = 15.0,
) -> AsyncIterator[StreamEvent]:
    """`subscribe`, one event at a time (for a reader that shapes each event itself)."""
    batches = subscribe(
        hub, log, request_id, after=after, strict=strict, strict_wait_s=strict_wait_s
    )
    async for batch in batches:
        for held in batch:
            yield held.event


def _accepted(cursor: _Cursor, items: Iterable[Held]) -> list[Held]:
    taken: list[Held] = []
    for held in items:
        if cursor.accept(held.event):
            taken.append(held)
        if cursor.done:
            break
    return taken


async def _from_log(
    log: LogReader, cursor: _Cursor, request_id: uuid.UUID, before: int | None
) -> AsyncIterator[list[Held]]:
    """From the log: ``cursor.next_seq`` up to ``before`` (or the end of the log)."""
    async for events in log.event_batches(request_id, from_seq=cursor.next_seq, before_seq=before):
        batch: list[Held] = []
        for event in events:
            if event.seq > cursor.next_seq:  # retention took what lies between
                if batch:
                    yield batch
                raise StreamTruncated(request_id, cursor.next_seq, event.seq)
            if cursor.accept(event):
                batch.append(Held(event))
            if cursor.done:
                break
        if batch:
            yield batch
        if cursor.done:
            return
    if before is not None and cursor.next_seq < before:
        raise StreamTruncated(request_id, cursor.next_seq, before)


async def _follow(
    listener: Listener, log: LogReader, request_id: uuid.UUID, cursor: _Cursor
) -> AsyncIterator[list[Held]]:
    held = listener.backlog
    if not held or held[0].event.seq > cursor.next_seq:
        async for batch in _from_log(log, cursor, request_id, held[0].event.seq if held else None):
            yield batch
        if cursor.done:
            return
    batch = _accepted(cursor, held)
    if batch:
        yield batch
    while not cursor.done:
        batch = []
        for item in await listener.take():
            if item.event.seq > cursor.next_seq:
                # A gap in the live events: what is taken so far, then the log up to
                # this one.
                if batch:
                    yield batch
                    batch = []
                async for missed in _from_log(log, cursor, request_id, item.event.seq):
                    yield missed
            if cursor.accept(item.event):
                batch.append(item)
            if cursor.done:
                break
        if batch:
            yield batch

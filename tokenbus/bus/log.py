"""Reading a request's messages back from the log: what was submitted, its stream,
the guard's verdicts on it.

No index is needed: a request id is a UUIDv7, whose timestamp is when the request
was submitted, and every message about a request is keyed by its id (so it sits
on one known partition). A read seeks that partition to the timestamp (minus the
allowed clock skew) with ListOffsets-by-time, then scans forward keeping only the
request's messages.

Where the log ends is taken from the fetch high-watermark (see `tokenbus.bus.kafka.at_end`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import (
    GenerationRequest,
    MalformedMessage,
    StreamEvent,
    StreamView,
    Verdict,
    decode_event,
    decode_request,
    decode_verdict,
    is_terminal,
    message_key,
    uuid7_unix_ms,
)

from .kafka import at_end, new_consumer, partition_for, partitions_of, stop_all, to_completion
from .settings import KafkaSettings

log = logging.getLogger(__name__)


class LogReadTimeout(TimeoutError):
    pass


@dataclass(frozen=True, slots=True)
class Submitted:
    request: GenerationRequest | None  # None: the message under this id was malformed


class LogReader:
    """Reads one request's messages back from the log.

    Each read has a consumer of its own (it assigns itself one partition). Reusing
    started consumers was tried: it saved ~8 ms a read but made some reads wait out
    aiokafka's fetcher (~200 ms) after the reassignment.
    """

    def __init__(
        self, *, kafka: KafkaSettings, clock_skew_ms: int = 30_000, timeout_s: float = 15.0
    ) -> None:
        self._kafka = kafka
        self._skew_ms = clock_skew_ms
        self._timeout_s = timeout_s

    async def find_request(
        self, request_id: uuid.UUID, *, stop: Callable[[Submitted], bool] = lambda _: True
    ) -> Submitted | None:
        """What was submitted under this id, or None if nothing was. Once found, the
        read ends if ``stop`` says so, else it goes on to the end of the log, as a
        search for an id never submitted does: the two then take the same time."""
        if uuid7_unix_ms(request_id) > time.time() * 1000 + self._skew_ms:
            return None  # minted in the future: nobody submitted it
        found: Submitted | None = None
        scan = self._scan(self._kafka.topics.requests, request_id, until_end=True)
        async with aclosing(scan) as fetches:
            async for records in fetches:
                for record in records:
                    if found is None:
                        try:
                            found = Submitted(decode_request(record.value))
                        except MalformedMessage:
                            # Its stream holds the `failed` event that answered it.
                            found = Submitted(None)
                    if stop(found):
                        return found
        return found

    async def finished_at(self, request_id: uuid.UUID) -> int | None:
        """The seq of the stream's terminal event, if the log holds it by now."""
        async with aclosing(self.events(request_id, from_seq=0)) as events:
            async for event in events:
                if is_terminal(event):
                    return event.seq
        return None

    async def events(
        self, request_id: uuid.UUID, *, from_seq: int, before_seq: int | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        """The request's events with ``from_seq <= seq``, in order.

        With ``before_seq`` the read ends once ``before_seq - 1`` is reached (those
        events are known to exist); without it, at the current end of the log.
        """
        batches = self.event_batches(request_id, from_seq=from_seq, before_seq=before_seq)
        async with aclosing(batches) as read:
            async for batch in read:
                for event in batch:
                    yield event

    async def event_batches(
        self, request_id: uuid.UUID, *, from_seq: int, before_seq: int | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        """`events`, a fetch at a time: each list holds what one fetch brought (never
        empty), so a replay is sent in a few large writes."""
        if before_seq is not None and before_seq <= from_seq:
            return
        scan = self._scan(self._kafka.topics.tokens, request_id, until_end=before_seq is None)
        # The fencing rule over the whole stream, even below from_seq: an event is
        # part of the stream only as the rule decides in log order.
        view = StreamView(anchor_on_first=True)
        async with aclosing(scan) as fetches:
            async for records in fetches:
                batch: list[StreamEvent] = []
                last = False
                for record in records:
                    try:
                        event = decode_event(record.value)
                    except MalformedMessage as exc:
                        log.warning("skipping malformed event at offset %d: %s", record.offset, exc)
                        continue
                    if not view.accept(event) or event.seq < from_seq:
                        continue
                    if before_seq is not None and event.seq >= before_seq:
                        last = True
                        break
                    batch.append(event)
                    if before_seq is not None and event.seq == before_seq - 1:
                        last = True
                        break
                if batch:
                    yield batch
                if last:
                    return

    async def verdicts(self, request_id: uuid.UUID) -> AsyncGenerator[Verdict, None]:
        """The guard's verdicts on the request, in log order, to the current end of
        the log (malformed ones skipped)."""
        scan = self._scan(self._kafka.topics.verdicts, request_id, until_end=True)
        async with aclosing(scan) as fetches:
            async for records in fetches:
                for record in records:
                    try:
                        verdict = decode_verdict(record.value)
                    except MalformedMessage as exc:
                        log.warning(
                            "skipping malformed verdict at offset %d: %s", record.offset, exc
                        )
                        continue
                    yield verdict

    @property
    def clock_skew_ms(self) -> int:
        """How far a request id's time may lie after its first message's (clocks
        differ): reads seek that much before it."""
        return self._skew_ms

    async def _scan(
        self, topic: str, request_id: uuid.UUID, *, until_end: bool
    ) -> AsyncGenerator[list[ConsumerRecord[bytes, bytes]], None]:
        """The request's records, a fetch at a time (lists never empty)."""
        key = message_key(request_id)
        consumer = new_consumer(self._kafka, fetch_max_wait_ms=50)
        try:
            # A subscriber that hangs up has its task cancelled. Cancelled halfway,
            # aiokafka's start() leaves a connection that stop() never closes; so
            # start and stop run to their end, and a read is cancelled only between.
            await to_completion(consumer.start())
            tp = await self._locate(consumer, topic, request_id)
            if tp is None:
                return
            # The deadline bounds how long the broker may go without giving us a
            # record, never the time our caller spends with the ones we yield (a
            # paced or slow replay may take as long as it likes).
            idle_since = time.monotonic()
            while True:
                batch = (await consumer.getmany(tp, timeout_ms=50)).get(tp, [])
                if batch:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self._timeout_s:
                    raise LogReadTimeout(
                        f"the broker gave nothing from {topic} for {request_id} in "
                        f"{self._timeout_s:g}s"
                    )
                mine = [record for record in batch if record.key == key]
                if mine:
                    yield mine
                if until_end and await at_end(consumer, tp):
                    return
        finally:
            await stop_all(consumer)

    async def _locate(
        self, consumer: AIOKafkaConsumer, topic: str, request_id: uuid.UUID
    ) -> TopicPartition | None:
        partitions = await partitions_of(consumer, topic)
        tp = TopicPartition(topic, partition_for(request_id, len(partitions)))
        since = max(uuid7_unix_ms(request_id) - self._skew_ms, 0)
        found = (await consumer.offsets_for_times({tp: since}))[tp]
        # Nothing at or after that time. (Kafka answers with no offset; Tansu with a
        # timestamp of -1.)
        if found is None or found.timestamp < 0:
            return None
        # Assigned and positioned in one step, once the offset is known: assigned
        # first, aiokafka's fetcher would send a ListOffsets of its own for a
        # position the seek then replaces.
        consumer.assign([tp])
        consumer.seek(tp, found.offset)
        return tp

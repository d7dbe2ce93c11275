"""The StreamHub: this relay's single reader of ``tokenbus.tokens``.

It reads every partition once (assigned, no consumer group: every relay instance
sees everything) and hands each event to the subscribers of its request. It also
keeps the recent streams in memory, bounded, so a subscriber arriving late or
reconnecting is usually served without touching the log.

A subscriber's queue is bounded. One that falls behind is not waited for and not
dropped: its listener is marked overflowed, and the subscription goes back to the
log from where it stood (see `subscription.py`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from prometheus_client import Histogram

from schemas import (
    MalformedMessage,
    StartedEvent,
    StreamEvent,
    StreamView,
    decode_event,
    sse_frame,
)
from tokenbus.bus.kafka import new_consumer, partitions_of, stop_all
from tokenbus.bus.restarts import LogRestarts
from tokenbus.bus.settings import KafkaSettings, ServerSettings

log = logging.getLogger(__name__)


class SubscriberOverflow(Exception):
    """This subscriber fell behind the live stream; read the log instead."""


class Held:
    """An event as the relay holds it, with its SSE frame encoded once, when first
    needed, and shared by every subscriber that sends it."""

    __slots__ = ("_frame", "event", "ts")

    def __init__(self, event: StreamEvent) -> None:
        self.event = event
        self.ts = event.ts.timestamp()  # once, for every subscriber's delivery delay
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = sse_frame(self.event)
        return self._frame


class Listener:
    """A subscriber's view of one request's live events.

    Offering an event is a deque append (and a wake-up for the first one queued);
    the subscriber takes everything queued at once, so a burst of events costs it
    one trip through its stream and one socket write.
    """

    __slots__ = ("_capacity", "_queue", "_waiter", "backlog", "overflowed")

    def __init__(self, backlog: list[Held], capacity: int) -> None:
        self.backlog = backlog  # what the hub held when the listener was registered
        self._queue: list[Held] = []  # swapped out whole by take(); lighter than a deque
        self._capacity = capacity
        self._waiter: asyncio.Future[None] | None = None
        self.overflowed = False

    def offer(self, held: Held) -> bool:
        """Queue an event without ever waiting; False when this one overflowed it."""
        if self.overflowed:
            return True
        if len(self._queue) >= self._capacity:
            self.overflowed = True
            self._wake()
            return False
        self._queue.append(held)
        self._wake()
        return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Held]:
        """Every event queued, oldest first, waiting for one if none is; raises
        `SubscriberOverflow` once the queue is drained after an overflow."""
        while not self._queue:
            if self.overflowed:
                raise SubscriberOverflow
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken, self._queue = self._queue, []
        return taken


@dataclass
class _Stream:
    events: list[Held] = field(default_factory=list)  # contiguous seqs
    listeners: set[Listener] = field(default_factory=set)
    view: StreamView = field(default_factory=lambda: StreamView(anchor_on_first=True))
    model: str | None = None  # from its `started` event, once seen

    def append(self, event: StreamEvent) -> Held | None:
        """Keep ``event`` if the fencing rule accepts it as the next of the held run."""
        if event.attempt >= self.view.attempt and self.events and event.seq > self.view.next_seq:
            # A gap we did not see (not possible in one partition's order, but a
            # malformed event skipped would do it): hold only from here on.
            self.events.clear()
            self.view = StreamView(anchor_on_first=True)
        if not self.view.accept(event):
            return None
        held = Held(event)
        self.events.append(held)
        return held


class StreamHub:
    def __init__(self, *, kafka: KafkaSettings, settings: ServerSettings) -> None:
        self._kafka = kafka
        self._max_streams = settings.relay_max_streams
        self._capacity = settings.subscriber_buffer
        self._streams: OrderedDict[uuid.UUID, _Stream] = OrderedDict()
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        self.models_seen: set[str] = set()  # for GET /v1/models
        self.events_read = 0
        self.malformed = 0
        self.overflows = 0  # subscribers that fell behind and went back to the log
        self.log_restarts = 0  # times the broker was seen to have lost its log
        # Event ts -> its SSE frame sent, per subscriber; see stream_routes._frames for what
        # counts as live. Unregistered: the app's collector exports it with the rest.
        self.delivery_delay = Histogram(
            "tokenbus_relay_delivery_delay_seconds",
            "Event ts to its SSE frame sent, for events generated while the subscriber "
            "was connected (replays of older events are not counted)",
            labelnames=("model",),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=None,
        )

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def subscribers(self) -> int:
        return sum(len(s.listeners) for s in self._streams.values())

    def holds(self, request_id: uuid.UUID) -> bool:
        stream = self._streams.get(request_id)
        return stream is not None and bool(stream.events)

    def last_held(self, request_id: uuid.UUID) -> StreamEvent | None:
        """The latest event this hub holds of the stream (its end, once terminal)."""
        stream = self._streams.get(request_id)
        return stream.events[-1].event if stream is not None and stream.events else None

    def model_of(self, request_id: uuid.UUID) -> str | None:
        """The stream's model, if this hub has read its `started` event."""
        stream = self._streams.get(request_id)
        return stream.model if stream is not None else None

    @contextmanager
    def listen(self, request_id: uuid.UUID) -> Iterator[Listener]:
        """Register for a request's live events. The backlog and the queue are taken
        together (no await between), so no event falls between them."""
        stream = self._streams.get(request_id)
        if stream is None:
            stream = self._streams[request_id] = _Stream()
        listener = Listener(list(stream.events), self._capacity)
        stream.listeners.add(listener)
        try:
            yield listener
        finally:
            stream.listeners.discard(listener)
            self._evict()

    async def run(self) -> None:
        """Read tokenbus.tokens until cancelled."""
        topic = self._kafka.topics.tokens
        consumer = new_consumer(self._kafka, fetch_max_wait_ms=self._kafka.fetch_max_wait_ms)
        try:
            await consumer.start()
            partitions = await partitions_of(consumer, topic)
            consumer.assign(partitions)
            # Start at the end: older streams are read back from the log on demand.
            await consumer.seek_to_end(*partitions)
            restarts = LogRestarts(consumer)
            self.ready.set()
            log.info("relay hub reading %s (%d partitions)", topic, len(partitions))
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        self._dispatch(record.value, record.topic, record.partition, record.offset)
                quiet = [tp for tp in partitions if not batches.get(tp)]
                if await restarts.rewind(quiet):
                    self.log_restarts = restarts.count
        finally:
            self.ready.clear()
            await stop_all(consumer)

    def _dispatch(self, value: bytes | None, topic: str, partition: int, offset: int) -> None:
        try:
            event = decode_event(value)
        except MalformedMessage as exc:
            self.malformed += 1
            log.warning("skipping malformed event at %s[%d]@%d: %s", topic, partition, offset, exc)
            return
        self.events_read += 1
        stream = self._streams.get(event.request_id)
        if stream is None:
            stream = self._streams[event.request_id] = _Stream()
            self._evict()
        else:
            self._streams.move_to_end(event.request_id)
        if isinstance(event, StartedEvent):
            self.models_seen.add(event.model)
            stream.model = event.model
        held = stream.append(event)
        if held is None:
            return
        for listener in stream.listeners:
            if not listener.offer(held):
                self.overflows += 1

    def _evict(self) -> None:
        """Forget the least recently active streams nobody is listening to."""
        excess = len(self._streams) - self._max_streams
        if excess <= 0:
            return  # the common case, on every disconnect: no copy of the table
        for request_id in list(self._streams):
            if excess <= 0:
                break
            if not self._streams[request_id].listeners:
                del self._streams[request_id]
                excess -= 1

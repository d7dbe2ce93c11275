"""Cancellations: every worker reads all of ``tokenbus.control`` (assigned, no
group), because the worker generating a request is not the one that owns the
control partition its Cancel lands on.

On start the watcher reads back ``lookback_s`` of cancels, and serving waits until
it has caught up, so a request cancelled before any worker picked it up is never
generated.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict

from schemas import Cancel, MalformedMessage, decode_cancel
from tokenbus.bus.kafka import at_end, new_consumer, partitions_of
from tokenbus.bus.restarts import LogRestarts
from tokenbus.bus.settings import KafkaSettings

log = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(
        self, kafka: KafkaSettings, *, lookback_s: float = 3600, max_entries: int = 100_000
    ) -> None:
        self._kafka = kafka
        self._lookback_ms = int(lookback_s * 1000)
        self._max_entries = max_entries
        self._cancelled: OrderedDict[uuid.UUID, Cancel] = OrderedDict()
        self.caught_up = asyncio.Event()
        self.malformed = 0

    def cancelled(self, request_id: uuid.UUID) -> Cancel | None:
        return self._cancelled.get(request_id)

    async def run(self) -> None:
        topic = self._kafka.topics.control
        consumer = new_consumer(self._kafka, fetch_max_wait_ms=100)
        try:
            await consumer.start()
            partitions = await partitions_of(consumer, topic)
            consumer.assign(partitions)
            since = int(time.time() * 1000) - self._lookback_ms
            starts = await consumer.offsets_for_times({tp: since for tp in partitions})
            for tp, found in starts.items():
                if found is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, found.offset)
            restarts = LogRestarts(consumer)
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._record(record.value, record.offset)
                await restarts.rewind([tp for tp in partitions if not batches.get(tp)])
                if not self.caught_up.is_set() and await at_end(consumer, *partitions):
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def _record(self, value: bytes | None, offset: int) -> None:
        try:
            cancel = decode_cancel(value)
        except MalformedMessage as exc:
            self.malformed += 1
            log.warning("skipping malformed cancel at offset %d: %s", offset, exc)
            return
        self._cancelled[cancel.request_id] = cancel
        self._cancelled.move_to_end(cancel.request_id)
        while len(self._cancelled) > self._max_entries:
            self._cancelled.popitem(last=False)

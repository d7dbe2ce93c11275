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
from tokenbus.bus.settings import KafkaSettings
from tokenbus.bus.tail import follow

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
        await follow(
            self._kafka,
            self._kafka.topics.control,
            self._record,
            since_ms=int(time.time() * 1000) - self._lookback_ms,
            caught_up=self.caught_up,
            fetch_max_wait_ms=100,
            poll_timeout_ms=500,
        )

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

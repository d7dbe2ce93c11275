"""Consumer lag per partition, as a Prometheus gauge: how many records a reader has
yet to finish.

Lag is the log end minus where the reader stands (its committed or stored
offset, which it passes in; its position where it has none). The log end is the
high watermark of its own fetch responses, not ListOffsets(LATEST): Tansu answers
the latter with the last batch's base offset + 1, short of the end after a
multi-record batch (see `kafka.at_end`). A paused partition is not fetched, so
for those the end is also asked with ListOffsets, at most every ``refresh_s``,
and the larger of the two kept.

Measured by the reader's own loop (where the offsets are), read by the scrape
thread: the dict is replaced whole, never mutated, so a scrape sees one
measurement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .kafka import position_now


class PartitionLag(Collector):
    def __init__(self, name: str, documentation: str, *, refresh_s: float = 1.0) -> None:
        self._name = name
        self._documentation = documentation
        self._refresh_s = refresh_s
        self._lag: dict[TopicPartition, int] = {}
        self._listed: dict[TopicPartition, int] = {}
        self._listed_at = float("-inf")
        self._listing: asyncio.Task[dict[TopicPartition, int]] | None = None

    @property
    def records(self) -> dict[TopicPartition, int]:
        """The last measurement: records behind, per partition."""
        return self._lag

    async def measure(
        self,
        consumer: AIOKafkaConsumer,
        done_through: Callable[[TopicPartition], int | None] = lambda tp: None,
    ) -> None:
        """Measure the lag of every partition ``consumer`` is assigned, never waiting
        on the broker: the reader's loop calls this, and a broker away must not hold
        it (the ends of paused partitions are asked in the background).
        ``done_through(tp)``: the offset of the first record not yet finished (what
        is or will be committed), None to use the consumer's position."""
        assigned = consumer.assignment()
        paused = consumer.paused() & assigned
        self._list_ends(consumer, paused)
        lag: dict[TopicPartition, int] = {}
        for tp in assigned:
            end = consumer.highwater(tp)
            if end is None:
                continue  # not fetched yet: no end known, and maybe no position
            if tp in paused:
                end = max(end, self._listed.get(tp, end))
            at = done_through(tp)
            if at is None:
                at = position_now(consumer, tp)
            if at is not None:
                lag[tp] = max(end - at, 0)
        self._lag = lag

    def _list_ends(self, consumer: AIOKafkaConsumer, paused: set[TopicPartition]) -> None:
        """Take the answer of the last ListOffsets, and ask again (at most every
        ``refresh_s``, one at a time) in a task of its own: aiokafka retries it for
        the whole request timeout while a leader is away, and cancelling it midway
        is not something aiokafka promises to survive."""
        if self._listing is not None and self._listing.done():
            failed = self._listing.cancelled() or self._listing.exception() is not None
            self._listed = {} if failed else self._listing.result()
            self._listing = None
        if not paused or self._listing is not None:
            return
        if time.monotonic() - self._listed_at < self._refresh_s:
            return
        self._listed_at = time.monotonic()
        self._listing = asyncio.create_task(consumer.end_offsets(list(paused)))
        # Seen here or dropped with the consumer: never "exception never retrieved".
        self._listing.add_done_callback(lambda task: task.cancelled() or task.exception())

    def clear(self) -> None:
        self._lag = {}

    def collect(self) -> Any:
        family = GaugeMetricFamily(self._name, self._documentation, labels=["topic", "partition"])
        for tp, records in sorted(self._lag.items()):
            family.add_metric([tp.topic, str(tp.partition)], records)
        yield family

"""Following a whole topic from a point in time on: every partition, assigned (no
group: each reader reads all of it), the way the workers read ``tokenbus.control``
and the workers and a strict relay read ``tokenbus.verdicts``.

Each partition is sought to the first record at or after ``since_ms`` by
ListOffsets-by-time; a partition with none (Kafka answers with no offset; Tansu
with a timestamp of -1, and an offset that is not the end) is read from where it
ended when the tail started. A broker that loses its log (`LogRestarts`) is read
again from its start. Once every partition has been read to its end, ``caught_up``
is set: every record written before the tail started, from ``since_ms`` on, has
been handed over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .kafka import at_end, new_consumer, partitions_of, stop_all
from .restarts import LogRestarts
from .settings import KafkaSettings


async def follow(
    kafka: KafkaSettings,
    topic: str,
    on_record: Callable[[bytes | None, int], object],
    *,
    since_ms: int,
    caught_up: asyncio.Event,
    fetch_max_wait_ms: int,
    poll_timeout_ms: int,
) -> None:
    """Hand each record's value and offset to ``on_record``, in log order per
    partition, until cancelled. ``fetch_max_wait_ms``: how long the broker may hold
    a fetch for records to arrive; ``poll_timeout_ms``: how long one poll waits."""
    consumer = new_consumer(kafka, fetch_max_wait_ms=fetch_max_wait_ms)
    try:
        await consumer.start()
        partitions = await partitions_of(consumer, topic)
        consumer.assign(partitions)
        # The ends first: a partition with nothing since ``since_ms`` is read from
        # where it ended before the lookup, so a record written during the lookup
        # is read, not skipped (as a seek to the end after it would).
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
        for tp, found in starts.items():
            if found is None or found.timestamp < 0:
                consumer.seek(tp, ends[tp])
            else:
                consumer.seek(tp, found.offset)
        restarts = LogRestarts(consumer)
        while True:
            batches = await consumer.getmany(timeout_ms=poll_timeout_ms)
            for records in batches.values():
                for record in records:
                    on_record(record.value, record.offset)
            await restarts.rewind([tp for tp in partitions if not batches.get(tp)])
            if not caught_up.is_set() and await at_end(consumer, *partitions):
                caught_up.set()
    finally:
        await stop_all(consumer)

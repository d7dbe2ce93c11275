"""Noticing that the broker lost its log, so a reader goes back to the start of it.

The embedded broker (Tansu) keeps its log in memory only: a restart empties it,
and offsets start again from zero. Apache Kafka answers a fetch past the end with
OffsetOutOfRange, which the consumer's ``auto_offset_reset`` handles; Tansu answers
with no records and the new, lower high watermark, so a reader that does not look
waits at its old position forever, or, once the new log has grown past that
position, reads on from there and never sees the new log's first records.

Two signs, either enough:

- the cluster id changed: `tokenbus.bus.broker.EmbeddedBroker` gives each start a
  new id, so a restarted embedded broker is a new cluster, which is what it is.
  This one does not race the new log's growth. Asked at most once a second
  (one small Metadata request);
- a partition's high watermark is below the reader's position (any broker that
  loses its log and keeps its id). A position never passes the high watermark of
  the fetch that delivered the records before it, so this is not a false alarm on
  a live log.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

from .kafka import position_now

log = logging.getLogger(__name__)


class LogRestarts:
    """``await restarts.rewind(quiet)`` after each fetch: reads a lost log again
    from its start, and returns the partitions it rewound."""

    def __init__(self, consumer: AIOKafkaConsumer, *, check_cluster_every_s: float = 1.0) -> None:
        self._consumer = consumer
        self._every_s = check_cluster_every_s
        self._cluster_id: str | None = None
        self._asked_at = float("-inf")
        self.count = 0  # times a lost log was noticed (a metric)

    async def rewind(self, quiet: list[TopicPartition]) -> list[TopicPartition]:
        """``quiet``: the partitions the last fetch returned nothing for (those of a
        log that now ends before our position look exactly like that)."""
        if await self._cluster_changed():
            rewound = sorted(self._consumer.assignment())
        else:
            rewound = [tp for tp in quiet if await self._behind(tp)]
        if rewound:
            self.count += 1
            log.warning(
                "the log of %s ends before this reader's position or is a new "
                "cluster's (the broker restarted without its log): reading it from the start",
                ", ".join(f"{tp.topic}[{tp.partition}]" for tp in rewound),
            )
            await self._consumer.seek_to_beginning(*rewound)
        return rewound

    async def _behind(self, tp: TopicPartition) -> bool:
        highwater = self._consumer.highwater(tp)
        position = position_now(self._consumer, tp)  # none while a reset is pending
        return highwater is not None and position is not None and highwater < position

    async def _cluster_changed(self) -> bool:
        now = time.monotonic()
        if now - self._asked_at < self._every_s:
            return False
        self._asked_at = now
        cluster_id = await _cluster_id(self._consumer)
        if cluster_id is None:
            return False  # not known now (the broker is away): ask again later
        before, self._cluster_id = self._cluster_id, cluster_id
        return before is not None and before != cluster_id


async def _cluster_id(consumer: AIOKafkaConsumer) -> str | None:
    """The cluster id a broker answers with, or None while none answers. aiokafka's
    cluster metadata drops it, so it is asked for (no topics: a small answer)."""
    client = consumer._client  # the consumer's connected client; its API has no raw send
    node_id = client.get_random_node()
    if node_id is None:
        return None
    try:
        response = await client.send(node_id, MetadataRequest([]))
    except (KafkaError, OSError):
        return None
    cluster_id: str | None = getattr(response, "cluster_id", None)  # from version 2 on
    return cluster_id

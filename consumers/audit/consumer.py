"""The audit consumer: every request and every event, into the store, exactly once.

It reads every partition of ``tokenbus.requests``, ``tokenbus.tokens`` and
``tokenbus.verdicts`` (one audit instance: the checkpoint chain is linear), from
the positions the store holds. Each fetch becomes one transaction with its
records, the streams' fencing state and the offsets after it, so killing it
anywhere and starting it again neither duplicates nor loses a record. Offsets
are also committed to the consumer group ``group_id``, best effort, for lag
monitoring only; the store is what it resumes from.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tokenbus.bus.kafka import ensure_topics, new_consumer, partitions_of, stop_all
from tokenbus.bus.restarts import LogRestarts
from tokenbus.bus.settings import AuditSettings, KafkaSettings

from .checkpoints import Checkpointer
from .ingest import AuditStats, Ingest, StreamStates, VerdictChains
from .keys import public_key_hex
from .metrics import audit_lag
from .records import Position
from .store import AuditStore
from .witness import Publisher, default_store_id

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_MS = 200
_GROUP_COMMIT_EVERY_S = 5.0  # group offsets are for lag monitoring: no need to be current

_T = TypeVar("_T")


async def _blocking(call: Callable[[], _T]) -> _T:
    """Run a store call in a thread. A cancel waits for it: a thread cannot be
    stopped, and the next store call must not overlap a transaction in flight."""
    task = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


class AuditConsumer:
    """``await run()`` until cancelled; it checkpoints and closes on the way out.

    ``settings.from_beginning`` reads the whole log again, whatever the store's positions
    (records it already holds are recognised and skipped): with a fresh store,
    that rebuilds it, hash for hash.
    """

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        settings: AuditSettings,
        store: AuditStore,
        key: Ed25519PrivateKey,
    ) -> None:
        self._kafka = kafka
        self._settings = settings
        self._store = store
        self._key = key
        self._from_beginning = settings.from_beginning
        self.stats = AuditStats()
        self._ingest = Ingest(
            topics=kafka.topics,
            states=StreamStates(load=store.streams, capacity=settings.state_cache),
            stats=self.stats,
            cluster=kafka.bootstrap,
            verdicts=VerdictChains.of(store, capacity=settings.state_cache),
        )
        self._checkpointer = Checkpointer(
            store=store,
            key=key,
            every_records=settings.checkpoint_every_records,
            every_s=settings.checkpoint_every_s,
        )
        public = key.public_key().public_bytes_raw()
        self._witness = Publisher(kafka, settings.store_id or default_store_id(public))
        # Where it stands: the next offset of each partition, as written to the store.
        self.positions: dict[Position, int] = {}
        self.ready = asyncio.Event()  # set once it is assigned and positioned
        self.lag = audit_lag()  # served with stats by `tokenbus audit run`
        self._group_committed = time.monotonic()

    async def run(self) -> None:
        await _blocking(self._store.open)
        try:
            await self._checkpoint()  # what a crashed run wrote after its last checkpoint
            consumer = await self._start_consumer()
            try:
                self.ready.set()
                await self._consume(consumer)
            finally:
                await self._commit_group(consumer)
                await stop_all(consumer)
        finally:
            await self._final_checkpoint()
            await self._witness.close()
            await _blocking(self._store.close)

    async def _start_consumer(self) -> AIOKafkaConsumer:
        await ensure_topics(self._kafka)
        consumer = new_consumer(
            self._kafka,
            group_id=self._settings.group_id,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        try:
            await consumer.start()  # inside: a start that fails halfway is stopped too
            topics = self._kafka.topics
            assigned = [
                *await partitions_of(consumer, topics.requests),
                *await partitions_of(consumer, topics.tokens),
                *await partitions_of(consumer, topics.verdicts),
            ]
            consumer.assign(assigned)
            stored = await _blocking(
                functools.partial(self._store.positions, self._kafka.bootstrap)
            )
            if self._from_beginning:
                stored = {}
            ends = await consumer.end_offsets(assigned)
            self.positions = {}
            for tp in assigned:
                offset = stored.get((tp.topic, tp.partition))
                if offset is not None and offset > ends[tp]:
                    # A log younger than the store (the embedded broker keeps it in
                    # memory only; Tansu does not answer out-of-range fetches). Reading
                    # it all again is always safe: what the store holds is skipped.
                    # (Tansu may report an end short of the last batch, which costs
                    # only such a re-read.)
                    log.warning("%s[%d] ends before the store's position %d: reading it "
                                "from the beginning", tp.topic, tp.partition, offset)  # fmt: skip
                    offset = None
                if offset is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, offset)
                    self.positions[(tp.topic, tp.partition)] = offset
        except BaseException:
            await stop_all(consumer)
            raise
        log.info(
            "audit consumer reading %d partitions into %s (%s); checkpoints signed by %s",
            len(assigned),
            self._store.description,
            "from the beginning" if self._from_beginning else "from the store's positions",
            public_key_hex(self._key.public_key()),
        )
        return consumer

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        restarts = LogRestarts(consumer)
        while True:
            fetched = await consumer.getmany(
                timeout_ms=_FETCH_TIMEOUT_MS, max_records=self._settings.max_batch
            )
            records = [record for batch in fetched.values() for record in batch]
            if records:
                await _blocking(functools.partial(self._write, records))
            await self.lag.measure(consumer, self._stored_through)
            # Reading a restarted log again is safe: what the store holds is skipped.
            quiet = [tp for tp in consumer.assignment() if not fetched.get(tp)]
            await restarts.rewind(quiet)
            if time.monotonic() - self._group_committed >= _GROUP_COMMIT_EVERY_S:
                await self._commit_group(consumer)
            if self._checkpointer.due():
                await self._checkpoint()

    def _write(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        batch = self._ingest.build(records)
        self._store.write(batch)
        self._ingest.committed(batch)
        self._checkpointer.written(len(batch.events) + len(batch.requests) + len(batch.verdicts))
        self.positions.update(batch.positions)

    def _stored_through(self, tp: TopicPartition) -> int | None:
        return self.positions.get((tp.topic, tp.partition))

    async def _commit_group(self, consumer: AIOKafkaConsumer) -> None:
        """Best effort, and never while cancelled halfway: the store holds the positions."""
        self._group_committed = time.monotonic()
        offsets = {TopicPartition(t, p): offset for (t, p), offset in self.positions.items()}
        if not offsets:
            return
        try:
            # Shielded, so a cancel is raised by shield at once (wait_for cannot
            # swallow it); the commit goes on to its end or its timeout.
            await asyncio.shield(asyncio.wait_for(consumer.commit(offsets), timeout=5))  # noqa: TID251
        except (KafkaError, TimeoutError) as exc:
            log.debug("could not commit the audit group's offsets: %s", exc)

    async def _checkpoint(self) -> None:
        checkpoint = await _blocking(self._checkpointer.checkpoint)
        if checkpoint is not None:
            await self._witness.publish(checkpoint)
            self.stats.checkpoints += 1
            log.info(
                "checkpoint %d: %d records of %d requests, hash %s",
                checkpoint.body.number,
                checkpoint.body.records,
                checkpoint.body.requests,
                checkpoint.hash.hex(),
            )

    async def _final_checkpoint(self) -> None:
        try:
            await asyncio.shield(self._checkpoint())
        except Exception:
            log.exception("could not write the final checkpoint; the next run will make it")

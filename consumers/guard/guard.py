"""The guard: a reader of ``tokenbus.tokens`` that judges every moderated stream and
publishes its verdicts to ``tokenbus.verdicts``.

Guards form a consumer group (``tokenbus-guard``): each judges the streams of the
partitions it holds, so they scale like the workers. A stream is judged from its
`started` event (which names the tenant and the moderation mode) on; to judge a
stream again after a restart the guard must read it from its start, so it
commits, per partition, the offset of the first event of the oldest stream it is
still judging (or its position, when none is open). A guard that restarts (or
takes a partition over) reads those streams again and judges them again under a
new ``epoch``; readers ignore a verdict with an older epoch than one they have
seen (`schemas.verdicts`), so a guard that froze and lost its partitions cannot
overrule the one that took them.

Per fetch, it adds each event to its stream's judge, then judges every stream the
fetch touched and publishes one verdict for each whose watermark moved or that
has new violations.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from schemas import (
    MalformedMessage,
    ModerationMode,
    StreamEvent,
    Verdict,
    decode_event,
    encode,
    message_key,
)
from tokenbus.bus.kafka import ensure_topics, new_consumer, start_producer, stop_all
from tokenbus.bus.restarts import LogRestarts
from tokenbus.bus.settings import GuardSettings, KafkaSettings

from .judge import Similarity, StreamJudge, describes
from .metrics import GuardMetrics
from .policies import Policies
from .recognizers import Recognizer, recognizers_for

log = logging.getLogger(__name__)

_DONE_REMEMBERED = 100_000  # finished streams whose late (stale) events are ignored


@dataclass
class _Open:
    judge: StreamJudge
    tp: TopicPartition
    first_offset: int
    published_through: int = -1


class Guard:
    """``await run()`` until cancelled."""

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        settings: GuardSettings,
        policies: Policies,
        similarity: Similarity | None = None,
    ) -> None:
        self._kafka = kafka
        self._settings = settings
        self._policies = policies
        self._similarity = similarity  # needed if a policy names topics
        self._recognizers: dict[str, list[Recognizer]] = {}
        self._open: OrderedDict[uuid.UUID, _Open] = OrderedDict()
        self._done: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._epochs: dict[TopicPartition, int] = {}
        self.metrics = GuardMetrics()
        self.ready = asyncio.Event()  # set once it holds partitions
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._committed_at = time.monotonic()

    @property
    def guard_id(self) -> str:
        return self._settings.guard_id

    async def run(self) -> None:
        await ensure_topics(self._kafka)
        settings = self._settings
        self._consumer = consumer = new_consumer(
            self._kafka,
            group_id=self._kafka.topic_prefix + settings.group_id,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            fetch_max_wait_ms=20,
        )
        consumer.subscribe([self._kafka.topics.tokens], listener=_Rebalance(self))
        # The producer starts inside the try that stops the consumer: a consumer made
        # and dropped unstopped (the producer's start failing) warns when collected.
        self._producer = None
        try:
            self._producer = await start_producer(self._kafka)
            await consumer.start()
            log.info("guard %s judging %s into %s", self.guard_id, self._kafka.topics.tokens,
                     self._kafka.topics.verdicts)  # fmt: skip
            restarts = LogRestarts(consumer)
            while True:
                fetched = await consumer.getmany(timeout_ms=200, max_records=2000)
                if consumer.assignment():
                    self.ready.set()
                await self._judge_batch(
                    [(tp, record) for tp, records in fetched.items() for record in records]
                )
                quiet = [tp for tp in consumer.assignment() if not fetched.get(tp)]
                if await restarts.rewind(quiet):
                    self._forget(set(consumer.assignment()))
                if time.monotonic() - self._committed_at >= settings.commit_every_s:
                    await self._commit(consumer.assignment())
        finally:
            await stop_all(consumer, self._producer)

    # -- judging ----------------------------------------------------------------

    async def _judge_batch(
        self, records: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]]
    ) -> None:
        touched: dict[uuid.UUID, _Open] = {}
        for tp, record in records:
            try:
                event = decode_event(record.value)
            except MalformedMessage as exc:
                self.metrics.malformed.inc()
                log.warning("skipping malformed event at %s@%d: %s", tp, record.offset, exc)
                continue
            stream = self._stream(tp, record.offset, event)
            if stream is None:
                continue
            if stream.judge.add(event):
                self.metrics.events.inc()
                touched[event.request_id] = stream
            else:
                self.metrics.fenced.inc()
        for request_id, stream in touched.items():
            await self._judge(request_id, stream)
        assert self._producer is not None
        await self._producer.flush()  # each verdict out now, not after a linger

    def _stream(self, tp: TopicPartition, offset: int, event: StreamEvent) -> _Open | None:
        stream = self._open.get(event.request_id)
        if stream is not None:
            return stream
        described = describes(event)
        if described is None or event.request_id in self._done:
            # Not a stream's start: one begun before this guard's position (never
            # the case for a stream it must judge: see the module's docstring), a
            # stale event after a stream's end, or a failure before any start.
            return None
        tenant, mode = described
        self.metrics.streams.labels(mode.value).inc()
        if mode is ModerationMode.OFF:
            self._finished(event.request_id)
            return None
        policy = self._policies.for_tenant(tenant)
        judge = StreamJudge(
            event.request_id,
            tenant=tenant,
            mode=mode,
            policy=policy,
            recognizers=self._recognizers_for(tenant),
            similarity=self._similarity,
        )
        stream = self._open[event.request_id] = _Open(judge, tp, offset)
        while len(self._open) > self._settings.max_open_streams:
            forgotten, _ = self._open.popitem(last=False)
            log.warning("forgetting stream %s: more than %d open", forgotten,
                        self._settings.max_open_streams)  # fmt: skip
        self.metrics.open_streams.set(len(self._open))
        return stream

    def _recognizers_for(self, tenant: str) -> list[Recognizer]:
        known = self._recognizers.get(tenant)
        if known is None:
            known = self._recognizers[tenant] = recognizers_for(self._policies.for_tenant(tenant))
        return known

    async def _judge(self, request_id: uuid.UUID, stream: _Open) -> None:
        judge = stream.judge
        found = await asyncio.to_thread(judge.judge) if judge.policy.topics else judge.judge()
        if judge.judged_through == stream.published_through and not found:
            return
        now = datetime.now(UTC)
        verdict = Verdict(
            request_id=request_id,
            guard=self.guard_id,
            epoch=self._epochs.get(stream.tp, 0),
            judged_through=judge.judged_through,
            violations=found,
            tenant=judge.tenant,
            mode=judge.mode,
            policy_version=judge.policy.version,
            final=judge.final and judge.judged_through >= 0,
            ts=now,
            event_ts=judge.newest_ts,
        )
        assert self._producer is not None
        await self._producer.send(
            self._kafka.topics.verdicts, encode(verdict), key=message_key(request_id)
        )
        stream.published_through = judge.judged_through
        self.metrics.verdicts.inc()
        if judge.newest_ts is not None:
            self.metrics.verdict_latency.observe(max((now - judge.newest_ts).total_seconds(), 0))
        for violation in found:
            self.metrics.violations.labels(violation.category, violation.policy).inc()
            log.info("%s: %s (%s, policy version %s) at seq %d", request_id, violation.category,
                     violation.policy, violation.policy_version, violation.seq)  # fmt: skip
        if verdict.final:
            self._finished(request_id)

    def _finished(self, request_id: uuid.UUID) -> None:
        self._open.pop(request_id, None)
        self.metrics.open_streams.set(len(self._open))
        self._done[request_id] = None
        while len(self._done) > _DONE_REMEMBERED:
            self._done.popitem(last=False)

    # -- partitions and offsets -------------------------------------------------

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the streams of ``partitions`` (revoked, or their log restarted)."""
        lost = set(partitions)
        for request_id in [rid for rid, s in self._open.items() if s.tp in lost]:
            del self._open[request_id]
        self.metrics.open_streams.set(len(self._open))

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        epoch = int(time.time() * 1000)
        for tp in partitions:
            self._epochs[tp] = epoch
        self._done.clear()  # streams of a partition read again are judged again

    async def _commit(self, partitions: Iterable[TopicPartition]) -> None:
        """Commit where a restarted guard must read from to judge every open stream
        again: the first event of the oldest open stream, or the position."""
        self._committed_at = time.monotonic()
        assert self._consumer is not None
        offsets = {}
        for tp in partitions:
            firsts = [s.first_offset for s in self._open.values() if s.tp == tp]
            try:
                offsets[tp] = min(firsts) if firsts else await self._consumer.position(tp)
            except KafkaError:
                continue
        if not offsets:
            return
        try:
            async with asyncio.timeout(5):
                await self._consumer.commit(offsets)
        except (KafkaError, TimeoutError) as exc:
            log.info("could not commit the guard's offsets now: %r", exc)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        guard = self._guard
        if revoked:
            await guard._commit(revoked)
        guard._forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._guard.assigned(assigned)

"""Helpers for the audit tests: synthetic logs, stores on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import (
    AuditConsumer,
    AuditStats,
    AuditStore,
    Checkpointer,
    Ingest,
    StreamStates,
    VerdictChains,
    open_store,
)
from schemas import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StartedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    Topics,
    Usage,
    encode,
    message_key,
    uuid7,
)
from tokenbus.bus.kafka import new_producer
from tokenbus.bus.settings import AuditSettings, KafkaSettings

from .conftest import running

POSTGRES_URL = os.environ.get("TOKENBUS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TOPICS = Topics()


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A store URL whose tables live in a schema of their own, dropped afterwards."""
    schema = f"audit_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"PostgreSQL is not reachable at {POSTGRES_URL} (.ci/run starts it; or set "
            f"TOKENBUS_TEST_POSTGRES): {exc}"
        ) from exc
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def request_message(request_id: uuid.UUID | None = None, prompt: str = "Hi") -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id or uuid7(), prompt=prompt, submitted_at=datetime.now(UTC)
    )


def stream_events(
    request_id: uuid.UUID,
    *,
    tokens: int = 4,
    worker: str = "w1",
    attempt: int = 1,
    first_seq: int = 0,
    started: bool = True,
    finished: bool = True,
) -> list[StreamEvent]:
    """``started``, ``tokens`` token events (" t0", " t1" ...), then ``finished``."""
    now = datetime.now(UTC)
    common = {"request_id": request_id, "ts": now, "worker": worker, "attempt": attempt}
    events: list[StreamEvent] = []
    if started:
        events.append(
            StartedEvent(
                **common,
                seq=first_seq,
                model="m",
                model_revision="r1",
                prompt_tokens=3,
                queue_wait_ms=1.0,
            )
        )
    for i in range(tokens):
        seq = first_seq + len(events)
        events.append(TokenEvent(**common, seq=seq, text=f" t{i}", token_ids=[i]))
    if finished:
        events.append(
            FinishedEvent(
                **common,
                seq=first_seq + len(events),
                finish_reason=FinishReason.LENGTH,
                usage=Usage(prompt_tokens=3, completion_tokens=tokens),
                timings=Timings(ttft_ms=1.0, total_ms=2.0),
            )
        )
    return events


@dataclass(frozen=True, slots=True)
class LogRecord:
    topic: str
    partition: int
    offset: int
    value: bytes | None


@dataclass
class SyntheticLog:
    """A log as the consumer would fetch it (one partition per topic)."""

    topics: Topics = TOPICS
    records: list[LogRecord] = field(default_factory=list)
    _next: dict[str, int] = field(default_factory=dict)

    def append(self, topic: str, value: bytes | None) -> LogRecord:
        offset = self._next.get(topic, 0)
        self._next[topic] = offset + 1
        record = LogRecord(topic, 0, offset, value)
        self.records.append(record)
        return record

    def request(self, request: GenerationRequest) -> None:
        self.append(self.topics.requests, encode(request))

    def events(self, events: Sequence[StreamEvent]) -> None:
        for event in events:
            self.append(self.topics.tokens, encode(event))


def ingest(
    store: AuditStore, records: Sequence[LogRecord], stats: AuditStats | None = None
) -> Ingest:
    """Write records the way the consumer does (one batch)."""
    pipeline = Ingest(
        topics=TOPICS,
        states=StreamStates(load=store.streams),
        stats=stats or AuditStats(),
        verdicts=VerdictChains.of(store),
    )
    batch = pipeline.build(records)
    store.write(batch)
    pipeline.committed(batch)
    return pipeline


def checkpoint(store: AuditStore, key: Ed25519PrivateKey) -> None:
    Checkpointer(store=store, key=key).checkpoint()


class Published:
    """Produces to the test's topics and remembers each partition's end offset."""

    def __init__(self, producer: AIOKafkaProducer, kafka: KafkaSettings) -> None:
        self._producer = producer
        self.topics = kafka.topics
        self.ends: dict[tuple[str, int], int] = {}

    async def send(self, topic: str, request_id: uuid.UUID, value: bytes | None) -> None:
        meta = await self._producer.send_and_wait(topic, value, key=message_key(request_id))
        position = (meta.topic, meta.partition)
        self.ends[position] = max(self.ends.get(position, 0), meta.offset + 1)

    async def request(self, request: GenerationRequest) -> None:
        await self.send(self.topics.requests, request.request_id, encode(request))

    async def events(self, events: Sequence[StreamEvent]) -> None:
        for event in events:
            await self.send(self.topics.tokens, event.request_id, encode(event))

    def reached_by(self, positions: dict[tuple[str, int], int]) -> bool:
        return all(positions.get(p, 0) >= end for p, end in self.ends.items())


@contextlib.asynccontextmanager
async def publishing(kafka: KafkaSettings) -> AsyncIterator[Published]:
    producer = new_producer(kafka)
    await producer.start()
    try:
        yield Published(producer, kafka)
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def auditing(
    kafka: KafkaSettings,
    store_url: str,
    key: Ed25519PrivateKey,
    *,
    from_beginning: bool = False,
) -> AsyncIterator[AuditConsumer]:
    """A real audit consumer in this process; stopped (cleanly) on the way out."""
    settings = AuditSettings(
        store=store_url, group_id=f"{kafka.topic_prefix}audit", from_beginning=from_beginning
    )
    consumer = AuditConsumer(kafka=kafka, settings=settings, store=open_store(store_url), key=key)
    async with running(consumer.run(), consumer.ready):
        yield consumer

"""Helpers for the audit tests: synthetic logs, stores on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import (
    AuditStats,
    AuditStore,
    Checkpointer,
    Ingest,
    StreamStates,
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
    uuid7,
)

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
        topics=TOPICS, states=StreamStates(load=store.streams), stats=stats or AuditStats()
    )
    batch = pipeline.build(records)
    store.write(batch)
    pipeline.committed(batch)
    return pipeline


def checkpoint(store: AuditStore, key: Ed25519PrivateKey) -> None:
    Checkpointer(store=store, key=key).checkpoint()

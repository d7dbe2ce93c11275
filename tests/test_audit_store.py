"""The audit store on both backends (SQLite and a real PostgreSQL): records,
positions and fencing state written together, idempotent re-delivery, the fencing
rule, and checkpoints that verify."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import AuditStats, AuditStore, Batch, EventRecord, open_store, verify
from schemas import decode_event, uuid7

from .audit_support import (
    TOPICS,
    SyntheticLog,
    checkpoint,
    ingest,
    postgres_schema,
    request_message,
    stream_events,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditStore]:
    if request.param == "sqlite":
        with open_store(str(tmp_path / "audit.db")) as opened:
            yield opened
    else:
        with postgres_schema() as url, open_store(url) as opened:
            yield opened


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def values(store: AuditStore, request_id: uuid.UUID) -> list[bytes]:
    return [record.value for record in store.events(request_id)]


def test_records_positions_and_state_are_written_together(store: AuditStore) -> None:
    log = SyntheticLog()
    request = request_message()
    log.request(request)
    log.events(stream_events(request.request_id, tokens=3))
    ingest(store, log.records)

    assert store.request(request.request_id) is not None
    assert [decode_event(v).seq for v in values(store, request.request_id)] == [0, 1, 2, 3, 4]
    assert store.positions() == {(TOPICS.requests, 0): 1, (TOPICS.tokens, 0): 5}
    [state] = store.streams([request.request_id]).values()
    assert (state.next_seq, state.head) == (5, store.events(request.request_id)[-1].hash)


def test_redelivery_after_a_restart_adds_nothing(store: AuditStore) -> None:
    log = SyntheticLog()
    request = request_message()
    log.request(request)
    log.events(stream_events(request.request_id, tokens=3))
    ingest(store, log.records[:3])
    # A new consumer (empty cache) is handed everything again, as after a crash
    # between the store's commit and Kafka's.
    stats = AuditStats()
    ingest(store, log.records, stats)

    assert len(store.events(request.request_id)) == 5
    assert (stats.events, stats.requests, stats.duplicates) == (3, 0, 3)


def test_a_failed_write_leaves_nothing_behind(store: AuditStore) -> None:
    request_id = uuid7()
    record = EventRecord(request_id, 0, 1, "started", b"{}", b"h" * 32, 0, 0)
    batch = Batch(events=[record, record], positions={(TOPICS.tokens, 0): 2})  # duplicate key
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.write(batch)
    assert store.events(request_id) == [] and store.positions() == {}


def test_fencing_a_lower_attempt_after_a_higher_one_is_not_stored(store: AuditStore) -> None:
    request_id = uuid7()
    old = stream_events(request_id, tokens=3, worker="old", attempt=100, finished=False)
    new = stream_events(request_id, tokens=2, worker="new", attempt=200, first_seq=2,
                        started=False)  # fmt: skip
    log = SyntheticLog()
    log.events(old[:2])  # seq 0, 1 from the first worker
    log.events(new[:1])  # the new owner claims seq 2
    log.events(old[2:])  # the stale worker wakes: its seq 2, 3 are fenced
    log.events(new[1:])
    stats = AuditStats()
    ingest(store, log.records, stats)

    stored = [decode_event(v) for v in values(store, request_id)]
    assert [(e.seq, e.worker) for e in stored] == [
        (0, "old"), (1, "old"), (2, "new"), (3, "new"), (4, "new")
    ]  # fmt: skip
    assert stats.fenced == 2


def test_fencing_the_first_event_per_seq_wins(store: AuditStore) -> None:
    request_id = uuid7()
    first = stream_events(request_id, tokens=2)
    again = stream_events(request_id, tokens=2)  # same seqs, same attempt, other text
    again = [e.model_copy(update={"worker": "w2"}) for e in again]
    log = SyntheticLog()
    log.events(first[:2])
    log.events(again[:3])  # seq 0, 1 repeated; seq 2 is new and accepted
    ingest(store, log.records[:3])  # spread over two batches
    ingest(store, log.records[3:])

    stored = [decode_event(v) for v in values(store, request_id)]
    assert [(e.seq, e.worker) for e in stored] == [(0, "w1"), (1, "w1"), (2, "w2")]


def test_checkpoints_chain_and_verify_clean(store: AuditStore, key: Ed25519PrivateKey) -> None:
    log = SyntheticLog()
    requests = [request_message() for _ in range(3)]
    for request in requests:
        log.request(request)
        log.events(stream_events(request.request_id, tokens=3))
    ingest(store, log.records[:9])
    checkpoint(store, key)
    ingest(store, log.records[9:])
    checkpoint(store, key)
    checkpoint(store, key)  # nothing new: no checkpoint

    checkpoints = store.checkpoints()
    assert [c.body.number for c in checkpoints] == [1, 2]
    assert checkpoints[1].body.previous == checkpoints[0].hash
    assert (checkpoints[1].body.records, checkpoints[1].body.requests) == (15, 3)
    report = verify(store, key.public_key())
    assert report.clean, report.findings
    assert (report.requests, report.records, report.uncovered) == (3, 15, 0)
    other = Ed25519PrivateKey.generate().public_key()
    assert {f.kind for f in verify(store, other).findings} == {"checkpoint"}


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET value = value",
        "DELETE FROM audit_events",
        "DELETE FROM audit_requests",
        "UPDATE audit_checkpoints SET signature = signature",
        "DELETE FROM audit_checkpoint_leaves",
    ],
)
def test_records_and_checkpoints_cannot_be_updated_or_deleted(
    store: AuditStore, key: Ed25519PrivateKey, statement: str
) -> None:
    log = SyntheticLog()
    request = request_message()
    log.request(request)
    log.events(stream_events(request.request_id, tokens=1))
    ingest(store, log.records)
    checkpoint(store, key)
    refused = pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only")
    with refused, store._transaction():
        store._query(statement)
    assert len(store.events(request.request_id)) == 3
    assert verify(store, key.public_key()).clean


def test_positions_are_kept_per_cluster(store: AuditStore) -> None:
    """Two embedded brokers (two `tokenbus up`) writing to one store never take each
    other's offsets."""
    store.write(Batch(cluster="127.0.0.1:9092", positions={(TOPICS.tokens, 0): 7}))
    store.write(Batch(cluster="127.0.0.1:9093", positions={(TOPICS.tokens, 0): 3}))
    assert store.positions("127.0.0.1:9092") == {(TOPICS.tokens, 0): 7}
    assert store.positions("127.0.0.1:9093") == {(TOPICS.tokens, 0): 3}
    assert store.positions("kafka:9092") == {}


def test_events_past_a_gap_are_not_stored_counted_and_reported_once(
    store: AuditStore, caplog: pytest.LogCaptureFixture
) -> None:
    request_id = uuid7()
    log = SyntheticLog()
    log.events(stream_events(request_id, tokens=4)[2:])  # seq 0 and 1 never came
    stats = AuditStats()
    ingest(store, log.records, stats)
    assert store.events(request_id) == []
    assert stats.gaps == 4
    assert len([r for r in caplog.records if "expected seq 0" in r.getMessage()]) == 1

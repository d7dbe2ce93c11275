"""The audit consumer against the real (embedded) broker: malformed messages,
a kill -9 mid-ingest and a restart, and a rebuild of the store from the log."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import AuditStore, Batch, open_store, verify
from schemas import StreamEvent, encode, uuid7
from tokenbus.bus.kafka import new_consumer
from tokenbus.bus.settings import KafkaSettings, kafka_env

from .audit_support import (
    auditing,
    postgres_schema,
    publishing,
    request_message,
    stream_events,
)
from .conftest import eventually

pytestmark = pytest.mark.broker_behaviour


def contents(store: AuditStore) -> dict[uuid.UUID, tuple[bytes | None, list[tuple[int, bytes]]]]:
    """Every request's digest and (seq, hash) list: what two stores must agree on."""
    found = {}
    for request_id in store.request_ids():
        request = store.request(request_id)
        events = [(e.seq, e.hash) for e in store.events(request_id)]
        found[request_id] = (request.digest if request else None, events)
    return found


async def test_malformed_messages_are_skipped_and_counted(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    url = str(tmp_path / "audit.db")
    request = request_message()
    events = stream_events(request.request_id, tokens=3)
    async with publishing(kafka) as log, auditing(kafka, url, key) as consumer:
        topics = kafka.topics
        await log.send(topics.requests, uuid7(), b"{not json")
        await log.send(topics.tokens, request.request_id, b'{"type": "token", "seq": "x"}')
        await log.send(topics.tokens, request.request_id, None)  # a tombstone
        await log.request(request)
        await log.events(events)
        await eventually(lambda: log.reached_by(consumer.positions))

        assert dict(consumer.stats.malformed) == {topics.requests: 1, topics.tokens: 2}
        with open_store(url) as store:
            assert store.request(request.request_id) is not None
            assert [e.value for e in store.events(request.request_id)] == [
                encode(e) for e in events
            ]
    # Stopped: its group holds the same offsets (for lag monitoring).
    group = new_consumer(kafka, group_id=f"{kafka.topic_prefix}audit")
    await group.start()
    try:
        for (topic, partition), end in log.ends.items():
            assert await group.committed(TopicPartition(topic, partition)) == end
    finally:
        await group.stop()


async def test_rebuilt_from_the_log_the_store_matches_and_verifies(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """A store rebuilt into PostgreSQL from the log has the very hashes the SQLite
    one has (hashes hold only what came from the log)."""
    key = Ed25519PrivateKey.generate()
    original = str(tmp_path / "audit.db")
    async with publishing(kafka) as log:
        async with auditing(kafka, original, key) as consumer:
            for i in range(8):
                request = request_message(prompt=f"p{i}")
                await log.request(request)
                stale = stream_events(request.request_id, tokens=2, attempt=1, finished=False)
                await log.events(stale[:2])
                await log.events(
                    stream_events(
                        request.request_id, tokens=3, attempt=2, first_seq=2, started=False
                    )
                )
                await log.events(stale[2:])  # fenced
            await eventually(lambda: log.reached_by(consumer.positions))
        with postgres_schema() as rebuilt:
            async with auditing(kafka, rebuilt, key, from_beginning=True) as consumer:
                await eventually(lambda: log.reached_by(consumer.positions))
            with open_store(original) as first, open_store(rebuilt) as second:
                assert verify(second, key.public_key()).clean
                assert verify(first, key.public_key()).clean
                assert len(contents(second)) == 8
                assert contents(first) == contents(second)
                assert all(len(events) == 6 for _, events in contents(second).values())


def stored_events(path: Path) -> int:
    """Records in the store; -1 until the consumer has created it."""
    if not path.exists():
        return -1
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return -1


async def test_killed_mid_ingest_and_restarted_no_duplicate_no_gap(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.db"
    env = os.environ | kafka_env(kafka) | {
        "TOKENBUS_AUDIT_STORE": str(path),
        "TOKENBUS_AUDIT_SIGNING_KEY": key.private_bytes_raw().hex(),
        "TOKENBUS_AUDIT_GROUP_ID": f"{kafka.topic_prefix}audit",
        "TOKENBUS_AUDIT_MAX_BATCH": "50",  # many small transactions to land a kill in
        "TOKENBUS_AUDIT_CHECKPOINT_EVERY_RECORDS": "500",
        "TOKENBUS_LOG_LEVEL": "WARNING",
    }  # fmt: skip

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenbus", "audit", "run", env=env
        )

    requests = [request_message(prompt=f"p{i}") for i in range(200)]
    streams: dict[uuid.UUID, list[StreamEvent]] = {
        r.request_id: stream_events(r.request_id, tokens=8) for r in requests
    }
    total = sum(len(s) for s in streams.values())
    async with publishing(kafka) as log:

        async def publish_all() -> None:
            for request in requests:
                await log.request(request)
                await log.events(streams[request.request_id])

        first = await start()
        try:
            await eventually(lambda: stored_events(path) >= 0, within=60)  # it has started
            publishing_task = asyncio.create_task(publish_all())
            # Killed while events are flowing and it is ingesting them.
            await eventually(lambda: stored_events(path) >= 200, within=60)
            first.kill()
            await first.wait()
        finally:
            if first.returncode is None:
                first.kill()
        assert not publishing_task.done() and stored_events(path) < total
        second = await start()
        try:
            await publishing_task
            await eventually(lambda: stored_events(path) == total, within=120)
        finally:
            second.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(second.wait(), 30) in (0, 130)

    with open_store(str(path)) as store:
        for request_id, events in streams.items():
            assert [e.value for e in store.events(request_id)] == [encode(e) for e in events]
            assert store.request(request_id) is not None
        report = verify(store, key.public_key())
        assert report.clean, report.findings
        assert (report.records, report.uncovered) == (total, 0)  # checkpointed on SIGINT


async def test_a_log_younger_than_the_store_is_read_from_its_start(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """The embedded broker keeps its log in memory: after a restart the store's
    positions lie past the end of the new log, which must be read from offset 0."""
    key = Ed25519PrivateKey.generate()
    url = str(tmp_path / "audit.db")
    with open_store(url) as store:
        store.write(Batch(cluster=kafka.bootstrap, positions={
            (topic, partition): 1000
            for topic in (kafka.topics.requests, kafka.topics.tokens)
            for partition in range(kafka.partitions)
        }))  # fmt: skip
    request = request_message()
    async with publishing(kafka) as log:
        await log.request(request)
        await log.events(stream_events(request.request_id, tokens=2))
        async with auditing(kafka, url, key) as consumer:
            await eventually(lambda: consumer.stats.events == 4)
    with open_store(url) as store:
        assert len(store.events(request.request_id)) == 4
        assert store.request(request.request_id) is not None

"""The audit store's external anchor: the consumer publishes each signed checkpoint
to tokenbus.audit-checkpoints, and `audit verify --witness` (or a checkpoint noted
elsewhere, `--expect-checkpoint N:HASH`) catches a store whose history was
rewritten and whose checkpoints were all deleted, which the store alone cannot."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import open_store
from consumers.audit.witness import default_store_id, published
from tokenbus.bus.settings import KafkaSettings

from .audit_support import (
    SyntheticLog,
    auditing,
    checkpoint,
    ingest,
    publishing,
    request_message,
    stream_events,
)
from .conftest import eventually


async def audit_verify(kafka: KafkaSettings, store: Path, key: Ed25519PrivateKey, *flags: str):  # type: ignore[no-untyped-def]
    public = key.public_key().public_bytes_raw().hex()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(store.parent),
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "TOKENBUS_TOPIC_PREFIX": kafka.topic_prefix,
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokenbus", "audit", "verify", f"--store={store}",
         f"--public-key={public}", *flags],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


async def test_a_rewritten_store_without_checkpoints_fails_against_the_witness(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.db"
    requests = [request_message(prompt=f"p{i}") for i in range(2)]
    async with publishing(kafka) as log, auditing(kafka, str(path), key) as consumer:
        for request in requests:
            await log.request(request)
            await log.events(stream_events(request.request_id, tokens=4))
        await eventually(lambda: log.reached_by(consumer.positions))
    # Stopped cleanly: its last checkpoint is in the store and on the witness topic.
    with open_store(str(path), create=False) as store:
        held = store.checkpoints()
    store_id = default_store_id(key.public_key().public_bytes_raw())
    witnessed = await published(kafka, store_id)
    assert held and [c.hash for c in witnessed] == [c.hash for c in held]
    last = held[-1]
    expect = f"--expect-checkpoint={last.body.number}:{last.hash.hex()}"

    clean = await audit_verify(kafka, path, key, "--witness", expect)
    assert clean.returncode == 0, clean.stderr + clean.stdout

    # Rewrite history: one request gone without a trace, and every checkpoint with it.
    sql = sqlite3.connect(path)
    for (name,) in sql.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        sql.execute(f"DROP TRIGGER {name}")
    victim = str(requests[0].request_id)
    for table in ("audit_events", "audit_requests", "audit_streams"):
        sql.execute(f"DELETE FROM {table} WHERE request_id = ?", (victim,))
    sql.execute("DELETE FROM audit_checkpoint_leaves")
    sql.execute("DELETE FROM audit_checkpoints")
    sql.commit()
    sql.close()

    alone = await audit_verify(kafka, path, key)
    assert alone.returncode == 0  # the store is consistent with itself: it cannot tell
    witnessed_run = await audit_verify(kafka, path, key, "--witness")
    assert witnessed_run.returncode == 1
    assert f"checkpoint {last.body.number} published to the witness topic" in witnessed_run.stdout
    assert "deleted" in witnessed_run.stdout
    expected_run = await audit_verify(kafka, path, key, expect)
    assert expected_run.returncode == 1
    assert "expected (--expect-checkpoint)" in expected_run.stdout


async def test_old_records_no_checkpoint_covers_are_reported(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """Without the witness, a store whose checkpoints were deleted still shows it:
    records older than a few checkpoint intervals that no checkpoint covers."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.db"
    log = SyntheticLog()
    old, recent = request_message(prompt="old"), request_message(prompt="recent")
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    log.request(old)
    log.events([e.model_copy(update={"ts": long_ago}) for e in stream_events(old.request_id)])
    with open_store(str(path)) as store:
        ingest(store, log.records)
        checkpoint(store, key)  # covers the old request...
    sql = sqlite3.connect(path)  # ...until the checkpoints are deleted
    for (name,) in sql.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        sql.execute(f"DROP TRIGGER {name}")
    sql.execute("DELETE FROM audit_checkpoint_leaves")
    sql.execute("DELETE FROM audit_checkpoints")
    sql.commit()
    sql.close()
    done = len(log.records)
    log.request(recent)
    log.events(stream_events(recent.request_id))  # just written: not yet checkpointed
    with open_store(str(path)) as store:
        ingest(store, log.records[done:])

    result = await audit_verify(kafka, path, key)
    assert result.returncode == 1, result.stderr
    findings = [line for line in result.stdout.splitlines() if line.startswith("TAMPERED")]
    assert len(findings) == 1  # the recent request is not reported
    assert "uncovered" in findings[0] and str(old.request_id) in findings[0]

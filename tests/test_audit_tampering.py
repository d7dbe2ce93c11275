"""Every kind of tampering with a SQLite audit store, done with SQL as an attacker
with the file would, is found by `verify`, at the right record."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import AuditStore, Finding, event_hash, open_store, verify
from schemas import encode
from tokenbus.cli import main

from .audit_support import SyntheticLog, checkpoint, ingest, request_message, stream_events

TOKENS = 6  # events per request: started, 6 tokens, finished = seq 0..7


@dataclass
class Tampered:
    path: Path
    store: AuditStore
    key: Ed25519PrivateKey
    ids: list[uuid.UUID]  # three requests; the middle one is the victim
    sql: sqlite3.Connection

    @property
    def victim(self) -> str:
        return str(self.ids[1])

    def findings(self) -> list[Finding]:
        self.sql.commit()
        return verify(self.store, self.key.public_key()).findings

    def row(self, seq: int) -> tuple[bytes, bytes]:
        value, hash_ = self.sql.execute(
            "SELECT value, hash FROM audit_events WHERE request_id = ? AND seq = ?",
            (self.victim, seq),
        ).fetchone()
        return bytes(value), bytes(hash_)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Tampered]:
    """Three requests; checkpoint 1 after the victim's seq 0..3, checkpoint 2 after all."""
    log = SyntheticLog()
    requests = [request_message(prompt=f"p{i}") for i in range(3)]
    streams = [stream_events(r.request_id, tokens=TOKENS) for r in requests]
    for request in requests:
        log.request(request)
    log.events(streams[0])
    log.events(streams[1][:4])
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.db"
    with open_store(str(path)) as opened:
        ingest(opened, log.records)
        checkpoint(opened, key)
        done = len(log.records)
        log.events(streams[1][4:])
        log.events(streams[2])
        ingest(opened, log.records[done:])
        checkpoint(opened, key)
        sql = sqlite3.connect(path)
        # The attacker owns the file: the store's append-only triggers go first.
        triggers = sql.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
        assert triggers
        for (name,) in triggers:
            sql.execute(f"DROP TRIGGER {name}")
        tampered = Tampered(path, opened, key, [r.request_id for r in requests], sql)
        assert tampered.findings() == []  # clean before the test tampers
        yield tampered
        sql.close()


def only(findings: list[Finding]) -> Finding:
    assert len(findings) == 1, findings
    return findings[0]


def test_a_clean_store_verifies_with_exit_status_0(
    store: Tampered, capsys: pytest.CaptureFixture[str]
) -> None:
    public = store.key.public_key().public_bytes_raw().hex()
    assert main(["audit", "verify", "--store", str(store.path), "--public-key", public]) == 0
    assert "OK: 3 requests, 24 records, 2 checkpoints" in capsys.readouterr().err


def test_a_changed_byte_is_the_record_it_is_in(
    store: Tampered, capsys: pytest.CaptureFixture[str]
) -> None:
    value, _ = store.row(5)
    store.sql.execute(
        "UPDATE audit_events SET value = ? WHERE request_id = ? AND seq = 5",
        (value.replace(b" t4", b" t5"), store.victim),
    )
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("altered", store.victim, 5)

    public = store.key.public_key().public_bytes_raw().hex()
    assert main(["audit", "verify", "--store", str(store.path), "--public-key", public]) == 1
    out = capsys.readouterr().out
    assert f"TAMPERED altered: request {store.victim} seq 5" in out


def test_a_changed_byte_with_every_later_hash_recomputed_is_narrowed_by_checkpoints(
    store: Tampered,
) -> None:
    victim = uuid.UUID(store.victim)
    value, _ = store.row(5)
    head = store.row(4)[1]
    rows = [(value.replace(b" t4", b" t5"), 5)] + [(store.row(s)[0], s) for s in (6, 7)]
    for new_value, seq in rows:  # a careful attacker: the chain is consistent again
        head = event_hash(head, victim, seq, new_value)
        store.sql.execute(
            "UPDATE audit_events SET value = ?, hash = ? WHERE request_id = ? AND seq = ?",
            (new_value, head, store.victim, seq),
        )
    store.sql.execute(
        "UPDATE audit_streams SET head = ? WHERE request_id = ?", (head, store.victim)
    )
    finding = only(store.findings())
    # Checkpoint 1 still vouches for seq 0..3; checkpoint 2's head no longer matches.
    assert (finding.kind, str(finding.request_id), finding.seq) == ("rewritten", store.victim, 4)
    assert finding.checkpoint == 2


def test_a_deleted_record(store: Tampered) -> None:
    store.sql.execute("DELETE FROM audit_events WHERE request_id = ? AND seq = 3", (store.victim,))
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("missing", store.victim, 3)


def test_an_inserted_record(store: Tampered) -> None:
    # Room is made at seq 2 and a copy of seq 1 put there.
    for seq in range(7, 1, -1):
        store.sql.execute(
            "UPDATE audit_events SET seq = seq + 1 WHERE request_id = ? AND seq = ?",
            (store.victim, seq),
        )
    store.sql.execute(
        "INSERT INTO audit_events SELECT request_id, 2, attempt, type, value, hash,"
        " kafka_partition, kafka_offset FROM audit_events WHERE request_id = ? AND seq = 1",
        (store.victim,),
    )
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("moved", store.victim, 2)


def test_a_record_appended_after_the_terminal_event_with_a_valid_hash(store: Tampered) -> None:
    victim = uuid.UUID(store.victim)
    [token] = [e for e in stream_events(victim, tokens=1) if e.type == "token"]
    value = encode(token.model_copy(update={"seq": 8, "text": " extra"}))
    head = event_hash(store.row(7)[1], victim, 8, value)
    store.sql.execute(
        "INSERT INTO audit_events VALUES (?, 8, 1, 'token', ?, ?, 0, 99)",
        (store.victim, value, head),
    )
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("inserted", store.victim, 8)


def test_two_swapped_records(store: Tampered) -> None:
    (v2, h2), (v3, h3) = store.row(2), store.row(3)
    for value, hash_, seq in ((v3, h3, 2), (v2, h2, 3)):
        store.sql.execute(
            "UPDATE audit_events SET value = ?, hash = ? WHERE request_id = ? AND seq = ?",
            (value, hash_, store.victim, seq),
        )
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("moved", store.victim, 2)


def test_a_cut_tail(store: Tampered) -> None:
    store.sql.execute("DELETE FROM audit_events WHERE request_id = ? AND seq >= 5", (store.victim,))
    store.sql.execute(
        "UPDATE audit_streams SET next_seq = 5, head = ? WHERE request_id = ?",
        (store.row(4)[1], store.victim),
    )
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("truncated", store.victim, 5)
    assert "records 5..7 are missing: checkpoint 2 committed 8" in finding.message


def test_a_deleted_request(store: Tampered) -> None:
    for table in ("audit_events", "audit_requests", "audit_streams"):
        store.sql.execute(f"DELETE FROM {table} WHERE request_id = ?", (store.victim,))
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id)) == ("deleted", store.victim)


def test_a_deleted_request_message(store: Tampered) -> None:
    store.sql.execute("DELETE FROM audit_requests WHERE request_id = ?", (store.victim,))
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("deleted", store.victim, None)
    assert "request message is gone" in finding.message


def test_an_altered_request_message(store: Tampered) -> None:
    value = store.sql.execute(
        "SELECT value FROM audit_requests WHERE request_id = ?", (store.victim,)
    ).fetchone()[0]
    store.sql.execute(
        "UPDATE audit_requests SET value = ? WHERE request_id = ?",
        (bytes(value).replace(b'"p1"', b'"p9"'), store.victim),
    )
    finding = only(store.findings())
    assert (finding.kind, str(finding.request_id), finding.seq) == ("altered", store.victim, None)


def test_a_forged_checkpoint_signature(store: Tampered) -> None:
    store.sql.execute("UPDATE audit_checkpoints SET signature = ? WHERE number = 2", (b"x" * 64,))
    finding = only(store.findings())
    assert (finding.kind, finding.checkpoint) == ("checkpoint", 2)
    assert "signature" in finding.message


def test_a_checkpoint_resigned_by_another_key(store: Tampered) -> None:
    """An attacker who cut a tail and signed a fresh checkpoint over it with a key
    of their own: the trusted public key does not accept it."""
    forger = Ed25519PrivateKey.generate()
    store.sql.execute("DELETE FROM audit_events WHERE request_id = ? AND seq >= 5", (store.victim,))
    store.sql.execute("DELETE FROM audit_checkpoint_leaves WHERE number = 2")
    store.sql.execute("DELETE FROM audit_checkpoints WHERE number = 2")
    store.sql.execute(
        "UPDATE audit_streams SET next_seq = 5, head = ?, dirty = 1 WHERE request_id = ?",
        (store.row(4)[1], store.victim),
    )
    store.sql.commit()
    checkpoint(store.store, forger)
    kinds = {(f.kind, f.checkpoint) for f in store.findings()}
    assert ("checkpoint", 2) in kinds


def test_an_altered_checkpoint_leaf(store: Tampered) -> None:
    store.sql.execute(
        "UPDATE audit_checkpoint_leaves SET count = 5 WHERE number = 2 AND request_id = ?",
        (store.victim,),
    )
    finding = store.findings()[0]
    assert (finding.kind, finding.checkpoint) == ("checkpoint", 2)


def test_a_removed_checkpoint(store: Tampered) -> None:
    store.sql.execute("DELETE FROM audit_checkpoints WHERE number = 1")
    finding = only(store.findings())
    assert (finding.kind, finding.checkpoint) == ("checkpoint", 2)
    assert "checkpoint 1 is missing" in finding.message

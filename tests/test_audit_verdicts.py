"""The guard's verdicts in the audit store: chained beside the records they judged,
committed by checkpoints, found out by `verify` when tampered with, and shown by
`tokenbus audit show` (a stale guard's verdict held, but not counted)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import AuditStats, AuditStore, Finding, account, open_store, verify
from schemas import ModerationMode, StreamEvent, Verdict, Violation, encode
from tokenbus.cli import main

from .audit_support import (
    TOPICS,
    SyntheticLog,
    checkpoint,
    ingest,
    request_message,
    stream_events,
)

NOW = datetime.now(UTC)


def verdict(rid: uuid.UUID, epoch: int, through: int, *flags: Violation) -> Verdict:
    return Verdict(request_id=rid, guard=f"g{epoch}", epoch=epoch, judged_through=through,
                   violations=list(flags), tenant="default", mode=ModerationMode.MONITOR,
                   policy_version="1", final=False, ts=NOW)  # fmt: skip


# The stream's text is " t0 t1 t2 t3"; " t2" (seq 3) is flagged.
FLAG = Violation(seq=3, end_seq=3, category="deny", policy="deny", policy_version="1",
                 span=(7, 9))  # fmt: skip


@dataclass
class Audited:
    path: Path
    store: AuditStore
    key: Ed25519PrivateKey
    rid: uuid.UUID
    stats: AuditStats
    sql: sqlite3.Connection

    def findings(self) -> list[Finding]:
        self.sql.commit()
        return verify(self.store, self.key.public_key()).findings


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[Audited]:
    """One request, its events, and four verdicts (one twice, one a stale guard's),
    over two checkpoints."""
    log = SyntheticLog()
    request = request_message()
    rid = request.request_id
    events: list[StreamEvent] = stream_events(rid, tokens=4)
    log.request(request)
    log.events(events)
    first = encode(verdict(rid, 200, 2))
    log.append(TOPICS.verdicts, first)
    log.append(TOPICS.verdicts, first)  # a producer's retry: the same bytes again
    log.append(TOPICS.verdicts, encode(verdict(rid, 200, 4, FLAG)))
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.db"
    stats = AuditStats()
    with open_store(str(path)) as store:
        ingest(store, log.records, stats)
        checkpoint(store, key)
        done = len(log.records)
        log.append(TOPICS.verdicts, encode(verdict(rid, 100, 5)))  # a stale guard's
        log.append(TOPICS.verdicts, b"{not a verdict")
        log.append(TOPICS.verdicts, first)  # the log read again
        ingest(store, log.records[done:], stats)
        checkpoint(store, key)
        sql = sqlite3.connect(path)
        for (name,) in sql.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            sql.execute(f"DROP TRIGGER {name}")
        audited = Audited(path, store, key, rid, stats, sql)
        assert audited.findings() == []
        yield audited
        sql.close()


def test_verdicts_are_stored_once_each_and_shown_by_the_fencing_rule(audited: Audited) -> None:
    assert audited.stats.verdicts == 3
    # The retry, and the log read again (in a later batch: known by the store's digests).
    assert audited.stats.verdict_duplicates == 2
    assert audited.stats.malformed[TOPICS.verdicts] == 1
    moderation = account(audited.store, audited.rid)["moderation"]  # type: ignore[index]
    assert moderation["verdicts"] == 3 and moderation["fenced"] == 1
    assert moderation["judged_through"] == 4  # the stale guard's 5 does not count
    (violation,) = moderation["violations"]
    assert (violation["category"], violation["seq"], violation["text"]) == ("deny", 3, "t2")


def test_audit_show_prints_the_verdicts(
    audited: Audited, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "show", str(audited.rid), "--store", str(audited.path)]) == 0
    out = capsys.readouterr().out
    assert "judged through seq 4; 3 verdicts (1 from a stale guard, not counted)" in out
    assert "violation  seq 3..3 deny (deny, policy version 1): chars 7..9 't2'" in out


def test_an_altered_verdict(audited: Audited) -> None:
    (value,) = audited.sql.execute("SELECT value FROM audit_verdicts WHERE n = 1").fetchone()
    audited.sql.execute(
        "UPDATE audit_verdicts SET value = ? WHERE n = 1",
        (bytes(value).replace(b'"deny"', b'"x"'),),
    )
    (finding,) = audited.findings()
    assert finding.kind == "altered" and "verdict 1" in finding.message


def test_a_deleted_verdict(audited: Audited) -> None:
    audited.sql.execute("DELETE FROM audit_verdicts WHERE n = 1")
    (finding,) = audited.findings()
    assert finding.kind == "missing" and "verdict 1" in finding.message


def test_a_cut_off_verdict_tail(audited: Audited) -> None:
    audited.sql.execute("DELETE FROM audit_verdicts WHERE n = 2")
    audited.sql.execute("UPDATE audit_verdict_chains SET count = 2")
    kinds = {finding.kind for finding in audited.findings()}
    assert "truncated" in kinds


def test_an_altered_checkpoint_verdict_leaf(audited: Audited) -> None:
    audited.sql.execute("UPDATE audit_checkpoint_verdict_leaves SET count = count + 1")
    kinds = {(finding.kind, finding.checkpoint) for finding in audited.findings()}
    assert ("checkpoint", 1) in kinds

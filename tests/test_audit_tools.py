"""`tokenbus audit export` and `show` on a store filled from a synthetic log."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from consumers.audit import open_store
from schemas import uuid7
from tokenbus.cli import main

from .audit_support import SyntheticLog, ingest, request_message, stream_events

DAY_MS = 86_400_000
NOV_21_MS = 1_763_683_200_000  # 2025-11-21T00:00:00Z


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """One request submitted on 21 Nov, one on 23 Nov 2025."""
    log = SyntheticLog()
    for unix_ms in (NOV_21_MS + 3_600_000, NOV_21_MS + 2 * DAY_MS + 3_600_000):
        request = request_message(uuid7(unix_ms), prompt=f"at {unix_ms}")
        log.request(request)
        log.events(stream_events(request.request_id, tokens=2))
    path = tmp_path / "audit.db"
    with open_store(str(path)) as store:
        ingest(store, log.records)
    return path


def test_export_since_gives_later_requests_as_json_lines_with_hashes(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["audit", "export", "--store", str(store_path)]
    assert main([*args, "--since", "2025-11-22"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [(line["kind"], line["seq"]) for line in lines] == [
        ("request", None), ("event", 0), ("event", 1), ("event", 2), ("event", 3)
    ]  # fmt: skip
    [late] = {line["request_id"] for line in lines}
    assert lines[0]["message"]["prompt"] == f"at {NOV_21_MS + 2 * DAY_MS + 3_600_000}"
    with open_store(str(store_path)) as store:
        stored = store.events(uuid.UUID(late))
    assert [line["hash"] for line in lines[1:]] == [e.hash.hex() for e in stored]
    assert [line["message"] for line in lines[1:]] == [json.loads(e.value) for e in stored]

    assert main([*args, "--until", "2025-11-22"]) == 0
    early = {json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()}
    assert len(early) == 1 and early != {late}


def test_show_of_an_unknown_request_says_so(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "show", str(uuid7()), "--store", str(store_path)]) == 1
    assert "holds nothing of request" in capsys.readouterr().err


def test_metrics_count_what_was_stored_skipped_and_malformed() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from consumers.audit import AuditStats
    from consumers.audit.metrics import AuditCollector

    stats = AuditStats(events=7, fenced=2)
    stats.malformed["tokenbus.tokens"] += 1
    registry = CollectorRegistry()
    registry.register(AuditCollector(stats))
    text = generate_latest(registry).decode()
    assert 'tokenbus_audit_records_stored_total{kind="event"} 7.0' in text
    assert 'tokenbus_audit_events_not_stored_total{reason="fenced"} 2.0' in text
    assert 'tokenbus_audit_malformed_messages_total{topic="tokenbus.tokens"} 1.0' in text

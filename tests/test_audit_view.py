"""``GET /v1/requests/{id}/audit``: the audit view the console shows, from the real
audit store written by the real audit consumer reading the real broker; verified
against its signed checkpoints, readable by its tenant only."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tokenbus.bus.settings import AuditSettings, KafkaSettings

from .audit_support import auditing, publishing, stream_events
from .conftest import eventually, serving

ACME = {"Authorization": "Bearer sk-acme"}
GLOBEX = {"Authorization": "Bearer sk-globex"}
KEYS = {"sk-acme": "acme", "sk-globex": "globex"}


async def test_the_audit_view_of_a_request_its_verification_and_its_tenant_only(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    path = tmp_path / "audit.db"
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw().hex()
    audit = AuditSettings(store=str(path), public_key=public)
    async with serving(kafka, api_keys=KEYS, audit=audit) as (_, http):
        body = {"messages": [{"role": "user", "content": "Audit me"}], "max_tokens": 4,
                "temperature": 0, "seed": 7}  # fmt: skip
        submitted = await http.post("/v1/requests", json=body, headers=ACME)
        assert submitted.status_code == 202, submitted.text
        rid = uuid.UUID(submitted.json()["request_id"])
        url = f"/v1/requests/{rid}/audit"

        early = await http.get(url, headers=ACME)  # no store yet: said, not a 5xx
        assert early.status_code == 404 and early.json()["error"]["code"] == "not_audited_yet"

        async with publishing(kafka) as log, auditing(kafka, str(path), key):
            await log.events(stream_events(rid, tokens=4))

            async def audited() -> bool:
                response = await http.get(url, headers=ACME)
                return response.status_code == 200 and response.json()["outcome"] is not None

            await eventually(audited)
        found = (await http.get(url, headers=ACME)).json()
        assert found["request"]["tenant"] == "acme"
        assert found["request"]["messages"] == [{"role": "user", "content": "Audit me"}]
        assert found["request"]["sampling"]["seed"] == 7
        assert found["served_by"][0]["model_revision"] == "r1"
        assert found["workers"] == [{"worker": "w1", "attempt": 1}]
        assert found["text"] == " t0 t1 t2 t3"
        assert [e["seq"] for e in found["events"]] == list(range(6))
        assert found["outcome"]["finish_reason"] == "length"
        # The consumer signed a checkpoint as it stopped: every record is covered.
        assert found["verification"] == {"verified": True, "findings": [],
                                         "uncovered_records": 0, "checkpoints": 1}  # fmt: skip

        # Another tenant: the same 404 as an id never submitted.
        other = await http.get(url, headers=GLOBEX)
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "unknown_request"

        _alter_a_token(path, rid)
        tampered = (await http.get(url, headers=ACME)).json()["verification"]
        assert tampered["verified"] is False
        assert any(f.startswith("altered") for f in tampered["findings"]), tampered


async def test_a_relay_without_the_audit_store_says_how_to_get_the_view(
    kafka: KafkaSettings,
) -> None:
    async with serving(kafka) as (_, http):
        submitted = await http.post("/v1/requests", json={"prompt": "p", "max_tokens": 1})
        response = await http.get(f"/v1/requests/{submitted.json()['request_id']}/audit")
    assert response.status_code == 404
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "audit_view_off" and "TOKENBUS_AUDIT_VIEW" in error["message"]


def _alter_a_token(path: Path, request_id: uuid.UUID) -> None:
    """What an attacker owning the file does: drop the append-only triggers, rewrite."""
    sql = sqlite3.connect(path)
    try:
        for (name,) in sql.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            sql.execute(f"DROP TRIGGER {name}")
        sql.execute(
            "UPDATE audit_events SET value = replace(value, ' t1', ' XX')"
            " WHERE request_id = ? AND seq = 2",
            (str(request_id),),
        )
        sql.commit()
    finally:
        sql.close()

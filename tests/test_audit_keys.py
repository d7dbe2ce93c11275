"""Where the audit signing key comes from, and what verify trusts."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import AuditKeyError, signing_key, verifying_key
from tokenbus.bus.settings import AuditSettings


def test_sqlite_without_a_key_makes_one_next_to_the_store_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    settings = AuditSettings(store=str(tmp_path / "audit.db"))
    key = signing_key(settings)
    path = tmp_path / "audit.db.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = key.public_key().public_bytes_raw()
    assert (tmp_path / "audit.db.pub").read_text().strip() == public.hex()
    assert signing_key(settings).public_key().public_bytes_raw() == public  # kept, not remade
    trusted, source = verifying_key(settings)
    assert trusted.public_bytes_raw() == public and "next to the store" in source


def test_a_configured_public_key_wins_over_the_key_file(tmp_path: Path) -> None:
    settings = AuditSettings(store=str(tmp_path / "audit.db"))
    signing_key(settings)
    elsewhere = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    trusted, source = verifying_key(settings.model_copy(update={"public_key": elsewhere}))
    assert trusted.public_bytes_raw().hex() == elsewhere and source == "configured"


def test_postgresql_needs_a_configured_key() -> None:
    settings = AuditSettings(store="postgresql://audit@db/audit")
    with pytest.raises(AuditKeyError, match="TOKENBUS_AUDIT_SIGNING_KEY"):
        signing_key(settings)
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    configured = AuditSettings(store=settings.store, signing_key=base64.b64encode(seed).decode())
    assert signing_key(configured).private_bytes_raw() == seed


def test_a_malformed_key_says_what_is_wrong() -> None:
    settings = AuditSettings(store="postgresql://audit@db/audit", signing_key="abc")
    with pytest.raises(AuditKeyError, match="neither 64 hex digits nor base64"):
        signing_key(settings)

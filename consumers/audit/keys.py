"""Ed25519 keys for signing and checking checkpoints.

A seed or public key is given as 64 hex digits or as base64 (a key file may also
hold a PEM private key). Whoever holds both the signing key and the store can
rewrite history and sign it again, so `verify` should be given the public key from
somewhere the store's writer cannot change (``TOKENBUS_AUDIT_PUBLIC_KEY``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tokenbus.bus.settings import AuditSettings

from .backends import sqlite_path

log = logging.getLogger(__name__)

_KEY_SIZE = 32


class AuditKeyError(ValueError):
    """A key that cannot be read; the message says which and why."""


def _raw(text: str, what: str) -> bytes:
    text = text.strip()
    try:
        if len(text) == 2 * _KEY_SIZE:
            raw = bytes.fromhex(text)
        else:
            raw = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise AuditKeyError(f"{what} is neither 64 hex digits nor base64: {exc}") from None
    if len(raw) != _KEY_SIZE:
        raise AuditKeyError(f"{what} holds {len(raw)} bytes; an Ed25519 key is {_KEY_SIZE}")
    return raw


def private_key_from_text(text: str, what: str = "the signing key") -> Ed25519PrivateKey:
    if text.lstrip().startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise AuditKeyError(f"{what} is not a PEM key without a password: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditKeyError(f"{what} is a PEM key but not an Ed25519 one")
        return key
    return Ed25519PrivateKey.from_private_bytes(_raw(text, what))


def public_key_from_text(text: str, what: str = "the public key") -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_raw(text, what))


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes_raw().hex()


def read_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        return private_key_from_text(path.read_text(), what=f"key file {path}")
    except OSError as exc:
        raise AuditKeyError(f"cannot read the signing key file {path}: {exc.strerror}") from None


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``, generated (and written with mode 0600) if it is missing."""
    if path.exists():
        return read_key_file(path)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key.private_bytes_raw().hex() + "\n")
    public = public_key_hex(key.public_key())
    path.with_name(path.name.removesuffix(".key") + ".pub").write_text(public + "\n")
    log.warning(
        "generated an audit signing key in %s; public key %s (keep a copy of it elsewhere: "
        "verify with TOKENBUS_AUDIT_PUBLIC_KEY=%s)",
        path,
        public,
        public,
    )
    return key


def signature_valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def signing_key(settings: AuditSettings) -> Ed25519PrivateKey:
    """The consumer's key: the configured seed or key file; for a SQLite store with
    neither, ``<store>.key`` next to it (created on first use)."""
    if settings.signing_key is not None:
        return private_key_from_text(
            settings.signing_key.get_secret_value(), "TOKENBUS_AUDIT_SIGNING_KEY"
        )
    if settings.signing_key_file is not None:
        return read_key_file(settings.signing_key_file.expanduser())
    default = default_key_file(settings)
    if default is None:
        raise AuditKeyError(
            "no audit signing key: set TOKENBUS_AUDIT_SIGNING_KEY (an Ed25519 seed, hex or "
            "base64; `tokenbus audit keygen` makes one) or TOKENBUS_AUDIT_SIGNING_KEY_FILE"
        )
    return load_or_create(default)


def verifying_key(settings: AuditSettings) -> tuple[Ed25519PublicKey, str]:
    """The key `verify` trusts, and where it came from (to print)."""
    if settings.public_key:
        return public_key_from_text(settings.public_key, "TOKENBUS_AUDIT_PUBLIC_KEY"), "configured"
    if settings.signing_key is not None or settings.signing_key_file is not None:
        return signing_key(settings).public_key(), "derived from the configured signing key"
    default = default_key_file(settings)
    if default is not None and default.exists():
        return read_key_file(default).public_key(), f"derived from {default}, next to the store"
    raise AuditKeyError(
        "no key to check checkpoints with: set TOKENBUS_AUDIT_PUBLIC_KEY (or --public-key) to "
        "the public key the audit consumer logged when it started"
    )


def default_key_file(settings: AuditSettings) -> Path | None:
    if settings.store.startswith(("postgresql://", "postgres://")):
        return None
    path = sqlite_path(settings.store).expanduser()
    return path.with_name(path.name + ".key")

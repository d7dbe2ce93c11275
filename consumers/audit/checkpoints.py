"""Signed checkpoints: the chain of commitments that `verify` folds.

Each checkpoint names the requests written to since the previous one, with each
one's record count and chain head (its *leaves*), and hashes their digest with the
previous checkpoint's hash, the totals and the time; the hash is signed with
Ed25519. Records after the last checkpoint are covered by their chain hashes only,
so the consumer also checkpoints when it stops cleanly.
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .chain import GENESIS, CheckpointBody, delta_digest
from .records import Checkpoint
from .store import AuditStore


class Checkpointer:
    """Makes a checkpoint every ``every_records`` records or ``every_s`` seconds."""

    def __init__(
        self,
        *,
        store: AuditStore,
        key: Ed25519PrivateKey,
        every_records: int = 10_000,
        every_s: float = 60.0,
    ) -> None:
        self._store = store
        self._key = key
        self._public = key.public_key().public_bytes_raw()
        self._every_records = every_records
        self._every_s = every_s
        self._pending = 0
        self._since = time.monotonic()

    def written(self, records: int) -> None:
        self._pending += records

    def due(self) -> bool:
        if self._pending >= self._every_records:
            return True
        return self._pending > 0 and time.monotonic() - self._since >= self._every_s

    def checkpoint(self) -> Checkpoint | None:
        """Sign and store a checkpoint over what changed; None if nothing did.

        Blocking (it reads and writes the store): run it in a thread from async code.
        """
        self._pending = 0
        self._since = time.monotonic()
        leaves = self._store.dirty_leaves()
        verdict_leaves = self._store.dirty_verdict_leaves()
        if not leaves and not verdict_leaves:
            return None
        last = self._store.last_checkpoint()
        records, requests = self._store.totals()
        body = CheckpointBody(
            number=last.body.number + 1 if last else 1,
            previous=last.hash if last else GENESIS,
            delta=delta_digest(leaves, verdict_leaves),
            records=records,
            requests=requests,
            created_ms=time.time_ns() // 1_000_000,
        )
        digest = body.hash()
        checkpoint = Checkpoint(body, digest, self._key.sign(digest), self._public)
        self._store.add_checkpoint(checkpoint, leaves, verdict_leaves)
        return checkpoint

"""Topic names and the partitioner the parts agree on."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    requests: str = "tokenbus.requests"
    tokens: str = "tokenbus.tokens"
    control: str = "tokenbus.control"
    # Messages no worker could serve, as they were, with a `tokenbus-reason` header.
    dead_letter: str = "tokenbus.dead-letter"
    # Each signed audit checkpoint, keyed by the audit store's id: a witness outside
    # the store's host, for `tokenbus audit verify --witness`.
    audit_checkpoints: str = "tokenbus.audit-checkpoints"
    # The guard's verdicts on each stream, keyed by request id (schemas.verdicts).
    verdicts: str = "tokenbus.verdicts"

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        return cls(*(prefix + name for name in cls().all()))

    def all(self) -> tuple[str, str, str, str, str, str]:
        return (
            self.requests,
            self.tokens,
            self.control,
            self.dead_letter,
            self.audit_checkpoints,
            self.verdicts,
        )


def message_key(request_id: uuid.UUID) -> bytes:
    """Every message about a request is keyed by its id, so all land on one partition."""
    return str(request_id).encode()

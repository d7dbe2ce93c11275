"""What the audit store holds, as plain values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

from .chain import GENESIS, NO_REQUEST, CheckpointBody, Leaf, VerdictLeaf


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A message of ``tokenbus.requests``, its value exactly as the log held it."""

    request_id: uuid.UUID
    value: bytes
    digest: bytes  # chain.request_digest(request_id, value)
    partition: int
    offset: int


class EventRecord(NamedTuple):
    """An accepted event of ``tokenbus.tokens``: the stream's record ``seq``.

    (A NamedTuple: one is made per event ingested, three times faster than a frozen
    dataclass.)"""

    request_id: uuid.UUID
    seq: int
    attempt: int
    type: str
    value: bytes
    hash: bytes  # chain.event_hash(previous record's hash, request_id, seq, value)
    partition: int
    offset: int


class VerdictRecord(NamedTuple):
    """A message of ``tokenbus.verdicts``: the request's ``n``-th verdict, every one
    the log holds (a stale guard's too: readers fence them, `schemas.VerdictView`)."""

    request_id: uuid.UUID
    n: int
    value: bytes
    hash: bytes  # chain.verdict_hash(previous verdict's hash, request_id, n, value)
    digest: bytes  # sha256 of value: a verdict read twice is recognised by it
    partition: int
    offset: int


@dataclass(slots=True)
class VerdictChain:
    """Where a request's verdict chain stands."""

    request_id: uuid.UUID
    count: int = 0
    head: bytes = GENESIS

    def leaf(self) -> VerdictLeaf:
        return VerdictLeaf(self.request_id, self.count, self.head)


@dataclass(slots=True)
class StreamState:
    """Where a request's chain stands: the fencing state (`schemas.StreamView`'s
    attempt and next seq) and the chain head. Persisted with every batch, so a
    restarted consumer resumes exactly."""

    request_id: uuid.UUID
    request_digest: bytes = NO_REQUEST
    attempt: int = 0
    next_seq: int = 0
    head: bytes = GENESIS

    def leaf(self) -> Leaf:
        return Leaf(self.request_id, self.request_digest, self.next_seq, self.head)


Position = tuple[str, int]  # (topic, partition)


@dataclass(slots=True)
class Batch:
    """Everything one fetch adds, written in one transaction with the offsets after it."""

    cluster: str = ""  # whose offsets `positions` are (the consumer's bootstrap servers)
    requests: list[RequestRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    streams: dict[uuid.UUID, StreamState] = field(default_factory=dict)  # changed ones
    verdicts: list[VerdictRecord] = field(default_factory=list)
    verdict_chains: dict[uuid.UUID, VerdictChain] = field(default_factory=dict)  # changed ones
    positions: dict[Position, int] = field(default_factory=dict)  # next offset to read


@dataclass(frozen=True, slots=True)
class Checkpoint:
    body: CheckpointBody
    hash: bytes  # body.hash() as the writer computed it
    signature: bytes  # Ed25519 over `hash`
    public_key: bytes  # the signer's key, informative only: verify uses its own

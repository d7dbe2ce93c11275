"""The hashes that make the audit store tamper-evident.

Every request has its own chain: a record's hash is
``H(previous hash of that request || canonical bytes of the record)``, starting
from `GENESIS`. The canonical bytes hold only what came from the log (the request
id, the seq and the message value exactly as the broker delivered it), never an
ingest time, so a store rebuilt from the same log has the same hashes.

The guard's verdicts on a request (``tokenbus.verdicts``) are a second chain of the
request, in log order: ``H(previous verdict hash || n || value)`` from `GENESIS`.

A checkpoint commits to what changed since the previous one: the sorted list of
`Leaf` (request id, request digest, record count, chain head) of every request
written to since, then, if any verdict was, the sorted `VerdictLeaf` (request id,
verdict count, verdict chain head) of each (a checkpoint without verdicts has the
digest it had before verdicts existed), plus the previous checkpoint's hash. Folding the chain of
checkpoints gives the committed state of every request, so a deleted request, a
cut tail or an edited record no longer matches it.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

DIGEST_SIZE = 32
GENESIS = bytes(DIGEST_SIZE)  # the "previous hash" of a request's first record
NO_REQUEST = bytes(DIGEST_SIZE)  # a leaf's request digest while no request message is held

_EVENT = b"tokenbus.audit.event.v1\x00"
_REQUEST = b"tokenbus.audit.request.v1\x00"
_DELTA = b"tokenbus.audit.delta.v1\x00"
_VERDICT = b"tokenbus.audit.verdict.v1\x00"
_VERDICT_DELTA = b"tokenbus.audit.verdict-delta.v1\x00"
_CHECKPOINT = b"tokenbus.audit.checkpoint.v1\x00"


def event_hash(previous: bytes, request_id: uuid.UUID, seq: int, value: bytes) -> bytes:
    """The chain hash of one token-topic record (``value``: the Kafka value bytes)."""
    return hashlib.sha256(
        b"".join((_EVENT, previous, request_id.bytes, seq.to_bytes(8, "big"), value))
    ).digest()


def verdict_hash(previous: bytes, request_id: uuid.UUID, n: int, value: bytes) -> bytes:
    """The chain hash of the request's ``n``-th verdict (0, 1, 2 ... in log order)."""
    return hashlib.sha256(
        b"".join((_VERDICT, previous, request_id.bytes, n.to_bytes(8, "big"), value))
    ).digest()


def request_digest(request_id: uuid.UUID, value: bytes) -> bytes:
    """The digest of a request message (it is not in the event chain: requests and
    tokens are separate topics, so their relative order is not in the log)."""
    h = hashlib.sha256(_REQUEST)
    h.update(request_id.bytes)
    h.update(value)
    return h.digest()


@dataclass(frozen=True, slots=True)
class Leaf:
    """What a checkpoint commits to for one request."""

    request_id: uuid.UUID
    request_digest: bytes  # NO_REQUEST when the request message was not (yet) seen
    count: int  # records in the chain: seq 0 .. count - 1
    head: bytes  # hash of record count - 1; GENESIS when count == 0

    def encode(self) -> bytes:
        return (
            self.request_id.bytes + self.request_digest + struct.pack(">Q", self.count) + self.head
        )


@dataclass(frozen=True, slots=True)
class VerdictLeaf:
    """What a checkpoint commits to of one request's verdicts."""

    request_id: uuid.UUID
    count: int  # verdicts 0 .. count - 1
    head: bytes

    def encode(self) -> bytes:
        return self.request_id.bytes + struct.pack(">Q", self.count) + self.head


def delta_digest(leaves: Iterable[Leaf], verdict_leaves: Iterable[VerdictLeaf] = ()) -> bytes:
    h = hashlib.sha256(_DELTA)
    for leaf in sorted(leaves, key=lambda leaf: leaf.request_id.bytes):
        h.update(leaf.encode())
    verdicts = sorted(verdict_leaves, key=lambda leaf: leaf.request_id.bytes)
    if verdicts:
        h.update(_VERDICT_DELTA)
        for verdict in verdicts:
            h.update(verdict.encode())
    return h.digest()


@dataclass(frozen=True, slots=True)
class CheckpointBody:
    """The signed part of a checkpoint."""

    number: int  # 1, 2, 3 ...
    previous: bytes  # the previous checkpoint's hash; GENESIS for the first
    delta: bytes  # `delta_digest` of the leaves that changed since the previous one
    records: int  # event records in the store at this checkpoint
    requests: int  # requests (leaves) in the store at this checkpoint
    created_ms: int  # when it was made (Unix ms); informative, but signed

    def hash(self) -> bytes:
        h = hashlib.sha256(_CHECKPOINT)
        h.update(struct.pack(">Q", self.number))
        h.update(self.previous)
        h.update(self.delta)
        h.update(struct.pack(">QQQ", self.records, self.requests, self.created_ms))
        return h.digest()

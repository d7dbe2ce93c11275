"""The audit consumer and its tools: every request and event of the bus in an
append-only, hash-chained store with signed checkpoints (see docs/audit.md)."""

from .backends import open_store
from .chain import (
    GENESIS,
    CheckpointBody,
    Leaf,
    VerdictLeaf,
    event_hash,
    request_digest,
    verdict_hash,
)
from .checkpoints import Checkpointer
from .consumer import AuditConsumer
from .ingest import AuditStats, Ingest, StreamStates, VerdictChains
from .keys import AuditKeyError, signing_key, verifying_key
from .records import (
    Batch,
    Checkpoint,
    EventRecord,
    RequestRecord,
    StreamState,
    VerdictChain,
    VerdictRecord,
)
from .reports import account, audited, export_jsonl, show
from .store import AuditStore, StoreError
from .verify import Finding, Report, verify, verify_request

__all__ = [
    "GENESIS",
    "AuditConsumer",
    "AuditKeyError",
    "AuditStats",
    "AuditStore",
    "Batch",
    "Checkpoint",
    "CheckpointBody",
    "Checkpointer",
    "EventRecord",
    "Finding",
    "Ingest",
    "Leaf",
    "Report",
    "RequestRecord",
    "StoreError",
    "StreamState",
    "StreamStates",
    "VerdictChain",
    "VerdictChains",
    "VerdictLeaf",
    "VerdictRecord",
    "account",
    "audited",
    "event_hash",
    "export_jsonl",
    "open_store",
    "request_digest",
    "show",
    "signing_key",
    "verdict_hash",
    "verify",
    "verify_request",
    "verifying_key",
]

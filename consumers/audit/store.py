"""The append-only audit store: one interface, two small backends.

`open_store` picks the backend from the URL: ``postgresql://...`` is PostgreSQL
(psycopg 3), anything else a SQLite file (a path, or ``sqlite:///path``). Both
share the SQL below; they differ in placeholders, the blob type and how a
transaction is opened.

Each fetched batch is one transaction holding its records, the changed streams'
fencing state and the offsets after the batch: the store, not the consumer group,
is the source of truth for where to resume, so a crash anywhere leaves records
and positions in agreement.
"""

from __future__ import annotations

import abc
import contextlib
import uuid
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from .chain import CheckpointBody, Leaf, VerdictLeaf
from .records import (
    Batch,
    Checkpoint,
    EventRecord,
    Position,
    RequestRecord,
    StreamState,
    VerdictChain,
    VerdictRecord,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_requests (
    request_id TEXT PRIMARY KEY,
    submitted_ms BIGINT NOT NULL,
    value {blob} NOT NULL,
    digest {blob} NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (
    request_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    type TEXT NOT NULL,
    value {blob} NOT NULL,
    hash {blob} NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    PRIMARY KEY (request_id, seq)
);
CREATE TABLE IF NOT EXISTS audit_streams (
    request_id TEXT PRIMARY KEY,
    submitted_ms BIGINT NOT NULL,
    request_digest {blob} NOT NULL,
    attempt BIGINT NOT NULL,
    next_seq BIGINT NOT NULL,
    head {blob} NOT NULL,
    dirty INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_streams_dirty ON audit_streams (dirty);
CREATE INDEX IF NOT EXISTS audit_streams_submitted ON audit_streams (submitted_ms);
CREATE TABLE IF NOT EXISTS audit_offsets (
    cluster TEXT NOT NULL,
    topic TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (cluster, topic, kafka_partition)
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    number BIGINT PRIMARY KEY,
    previous {blob} NOT NULL,
    delta {blob} NOT NULL,
    records BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    hash {blob} NOT NULL,
    signature {blob} NOT NULL,
    public_key {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_verdicts (
    request_id TEXT NOT NULL,
    n BIGINT NOT NULL,
    value {blob} NOT NULL,
    hash {blob} NOT NULL,
    digest {blob} NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    PRIMARY KEY (request_id, n)
);
CREATE TABLE IF NOT EXISTS audit_verdict_chains (
    request_id TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    head {blob} NOT NULL,
    dirty INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_verdict_chains_dirty ON audit_verdict_chains (dirty);
CREATE TABLE IF NOT EXISTS audit_checkpoint_verdict_leaves (
    number BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    count BIGINT NOT NULL,
    head {blob} NOT NULL,
    PRIMARY KEY (number, request_id)
);
CREATE TABLE IF NOT EXISTS audit_checkpoint_leaves (
    number BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    request_digest {blob} NOT NULL,
    count BIGINT NOT NULL,
    head {blob} NOT NULL,
    PRIMARY KEY (number, request_id)
);
"""

# Records and checkpoints are never updated or deleted: the database refuses it, so
# no mistake (or tool run against the wrong store) rewrites history. (Someone who
# owns the database can drop these triggers: that is what the hashes are for.)
APPEND_ONLY_TABLES = (
    "audit_requests", "audit_events", "audit_checkpoints", "audit_checkpoint_leaves",
    "audit_verdicts", "audit_checkpoint_verdict_leaves",
)  # fmt: skip

_EVENT_COLUMNS = "request_id, seq, attempt, type, value, hash, kafka_partition, kafka_offset"
_VERDICT_COLUMNS = "request_id, n, value, hash, digest, kafka_partition, kafka_offset"
_CHECKPOINT_COLUMNS = (
    "number, previous, delta, records, requests, created_ms, hash, signature, public_key"
)


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says what to check."""


def submitted_ms(request_id: uuid.UUID) -> int:
    """When a request was submitted: its UUIDv7 timestamp (from the log, not ingest time)."""
    return request_id.int >> 80


class AuditStore(abc.ABC):
    """Open with `open()` (or ``with``), which creates the tables if they are missing."""

    _blob = "BLOB"
    _append_only: tuple[str, ...] = ()  # statements that make APPEND_ONLY_TABLES so

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the store is, for log lines (no password)."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[None]: ...

    @abc.abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    @abc.abstractmethod
    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def _insert_many(self, table: str, columns: str, rows: Sequence[Sequence[Any]]) -> None:
        """Append rows (a backend may do it faster than with INSERT)."""
        marks = ", ".join("?" * len(columns.split(",")))
        self._execute_many(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)

    def _create_tables(self) -> None:
        with self._transaction():
            for statement in _SCHEMA.format(blob=self._blob).split(";"):
                if statement.strip():
                    self._query(statement)
            for table in APPEND_ONLY_TABLES:
                for statement in self._append_only:
                    self._query(statement.format(table=table))

    # -- the consumer's side -------------------------------------------------------

    def positions(self, cluster: str = "") -> dict[Position, int]:
        """The next offset to read of every partition of ``cluster`` the store has read.

        Offsets are per cluster (as the consumer names it: its bootstrap servers), so
        two embedded brokers writing to one store never take each other's positions;
        a cluster the store does not know is read from its start."""
        rows = self._query(
            "SELECT topic, kafka_partition, next_offset FROM audit_offsets WHERE cluster = ?",
            (cluster,),
        )
        return {(topic, partition): offset for topic, partition, offset in rows}

    def streams(self, request_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, StreamState]:
        found: dict[uuid.UUID, StreamState] = {}
        ids = [str(r) for r in request_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._query(
                "SELECT request_id, request_digest, attempt, next_seq, head FROM audit_streams"
                f" WHERE request_id IN ({marks})",
                chunk,
            )
            for request_id, digest, attempt, next_seq, head in rows:
                rid = uuid.UUID(request_id)
                found[rid] = StreamState(rid, _as_bytes(digest), attempt, next_seq, _as_bytes(head))
        return found

    def verdict_chains(self, request_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, VerdictChain]:
        found: dict[uuid.UUID, VerdictChain] = {}
        ids = [str(r) for r in request_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._query(
                f"SELECT request_id, count, head FROM audit_verdict_chains"
                f" WHERE request_id IN ({marks})",
                chunk,
            )
            for request_id, count, head in rows:
                rid = uuid.UUID(request_id)
                found[rid] = VerdictChain(rid, count, _as_bytes(head))
        return found

    def verdict_digests(self, request_ids: Collection[uuid.UUID]) -> set[tuple[uuid.UUID, bytes]]:
        """(request id, digest) of every verdict held of these requests."""
        found: set[tuple[uuid.UUID, bytes]] = set()
        ids = [str(r) for r in request_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._query(
                f"SELECT request_id, digest FROM audit_verdicts WHERE request_id IN ({marks})",
                chunk,
            )
            found.update((uuid.UUID(r), _as_bytes(d)) for r, d in rows)
        return found

    def write(self, batch: Batch) -> None:
        """The batch's records, stream states and positions, all or nothing."""
        with self._transaction():
            if batch.requests:
                self._insert_many(
                    "audit_requests",
                    "request_id, submitted_ms, value, digest, kafka_partition, kafka_offset",
                    [
                        (str(r.request_id), submitted_ms(r.request_id), r.value, r.digest,
                         r.partition, r.offset)
                        for r in batch.requests
                    ],
                )  # fmt: skip
            if batch.events:
                ids = {rid: str(rid) for rid in {e.request_id for e in batch.events}}
                self._insert_many(
                    "audit_events",
                    _EVENT_COLUMNS,
                    [
                        (ids[e.request_id], e.seq, e.attempt, e.type, e.value, e.hash,
                         e.partition, e.offset)
                        for e in batch.events
                    ],
                )  # fmt: skip
            if batch.streams:
                self._execute_many(
                    "INSERT INTO audit_streams (request_id, submitted_ms, request_digest, attempt,"
                    " next_seq, head, dirty) VALUES (?, ?, ?, ?, ?, ?, 1)"
                    " ON CONFLICT (request_id) DO UPDATE SET"
                    " request_digest = excluded.request_digest, attempt = excluded.attempt,"
                    " next_seq = excluded.next_seq, head = excluded.head, dirty = 1",
                    [
                        (str(s.request_id), submitted_ms(s.request_id), s.request_digest,
                         s.attempt, s.next_seq, s.head)
                        for s in batch.streams.values()
                    ],
                )  # fmt: skip
            if batch.verdicts:
                self._insert_many(
                    "audit_verdicts",
                    _VERDICT_COLUMNS,
                    [
                        (str(v.request_id), v.n, v.value, v.hash, v.digest, v.partition, v.offset)
                        for v in batch.verdicts
                    ],
                )
            if batch.verdict_chains:
                self._execute_many(
                    "INSERT INTO audit_verdict_chains (request_id, count, head, dirty)"
                    " VALUES (?, ?, ?, 1) ON CONFLICT (request_id) DO UPDATE SET"
                    " count = excluded.count, head = excluded.head, dirty = 1",
                    [(str(c.request_id), c.count, c.head) for c in batch.verdict_chains.values()],
                )
            self._execute_many(
                "INSERT INTO audit_offsets (cluster, topic, kafka_partition, next_offset)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (cluster, topic, kafka_partition) DO UPDATE"
                " SET next_offset = excluded.next_offset",
                [
                    (batch.cluster, topic, part, offset)
                    for (topic, part), offset in batch.positions.items()
                ],
            )

    def dirty_leaves(self) -> list[Leaf]:
        """The requests written to since the last checkpoint."""
        rows = self._query(
            "SELECT request_id, request_digest, next_seq, head FROM audit_streams WHERE dirty = 1"
        )
        return [Leaf(uuid.UUID(r), _as_bytes(d), n, _as_bytes(h)) for r, d, n, h in rows]

    def dirty_verdict_leaves(self) -> list[VerdictLeaf]:
        """The requests whose verdicts changed since the last checkpoint."""
        rows = self._query(
            "SELECT request_id, count, head FROM audit_verdict_chains WHERE dirty = 1"
        )
        return [VerdictLeaf(uuid.UUID(r), n, _as_bytes(h)) for r, n, h in rows]

    def totals(self) -> tuple[int, int]:
        """(event records, requests) held."""
        [(records, requests)] = self._query(
            "SELECT COALESCE(SUM(next_seq), 0), COUNT(*) FROM audit_streams"
        )
        return int(records), int(requests)

    def add_checkpoint(
        self,
        checkpoint: Checkpoint,
        leaves: Sequence[Leaf],
        verdict_leaves: Sequence[VerdictLeaf] = (),
    ) -> None:
        """Store a checkpoint with the leaves it commits to, and mark them clean."""
        body = checkpoint.body
        with self._transaction():
            self._query(
                f"INSERT INTO audit_checkpoints ({_CHECKPOINT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (body.number, body.previous, body.delta, body.records, body.requests,
                 body.created_ms, checkpoint.hash, checkpoint.signature, checkpoint.public_key),
            )  # fmt: skip
            self._execute_many(
                "INSERT INTO audit_checkpoint_leaves (number, request_id, request_digest, count,"
                " head) VALUES (?, ?, ?, ?, ?)",
                [
                    (body.number, str(x.request_id), x.request_digest, x.count, x.head)
                    for x in leaves
                ],
            )
            self._execute_many(
                "UPDATE audit_streams SET dirty = 0 WHERE request_id = ? AND next_seq = ?"
                " AND request_digest = ?",
                [(str(x.request_id), x.count, x.request_digest) for x in leaves],
            )
            if verdict_leaves:
                self._execute_many(
                    "INSERT INTO audit_checkpoint_verdict_leaves (number, request_id, count, head)"
                    " VALUES (?, ?, ?, ?)",
                    [(body.number, str(x.request_id), x.count, x.head) for x in verdict_leaves],
                )
                self._execute_many(
                    "UPDATE audit_verdict_chains SET dirty = 0 WHERE request_id = ? AND count = ?",
                    [(str(x.request_id), x.count) for x in verdict_leaves],
                )

    # -- the tools' side -----------------------------------------------------------

    def last_checkpoint(self) -> Checkpoint | None:
        rows = self._query(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY number DESC LIMIT 1"
        )
        return _checkpoint(rows[0]) if rows else None

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._query(f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY number")
        return [_checkpoint(row) for row in rows]

    def checkpoint_leaves(self, number: int) -> list[Leaf]:
        rows = self._query(
            "SELECT request_id, request_digest, count, head FROM audit_checkpoint_leaves"
            " WHERE number = ?",
            (number,),
        )
        return [Leaf(uuid.UUID(r), _as_bytes(d), n, _as_bytes(h)) for r, d, n, h in rows]

    def checkpoint_verdict_leaves(self, number: int) -> list[VerdictLeaf]:
        rows = self._query(
            "SELECT request_id, count, head FROM audit_checkpoint_verdict_leaves WHERE number = ?",
            (number,),
        )
        return [VerdictLeaf(uuid.UUID(r), n, _as_bytes(h)) for r, n, h in rows]

    def checkpoints_naming(self, request_id: uuid.UUID) -> list[int]:
        """The numbers of the checkpoints that commit to this request (its records or
        its verdicts)."""
        rows = self._query(
            "SELECT number FROM audit_checkpoint_leaves WHERE request_id = ?"
            " UNION SELECT number FROM audit_checkpoint_verdict_leaves WHERE request_id = ?",
            (str(request_id), str(request_id)),
        )
        return sorted(number for (number,) in rows)

    def request_ids(self, *, since_ms: int = 0, until_ms: int | None = None) -> list[uuid.UUID]:
        """Every request the store holds anything of, in submission order."""
        until = until_ms if until_ms is not None else 2**62
        rows = self._query(
            "SELECT request_id FROM audit_requests WHERE submitted_ms >= ? AND submitted_ms < ?"
            " UNION SELECT DISTINCT request_id FROM audit_events"
            " UNION SELECT request_id FROM audit_verdict_chains"
            " UNION SELECT request_id FROM audit_streams WHERE submitted_ms >= ?"
            " AND submitted_ms < ?",
            (since_ms, until, since_ms, until),
        )
        ids = [uuid.UUID(r) for (r,) in rows]
        return sorted(i for i in ids if since_ms <= submitted_ms(i) < until)

    def request(self, request_id: uuid.UUID) -> RequestRecord | None:
        rows = self._query(
            "SELECT value, digest, kafka_partition, kafka_offset FROM audit_requests"
            " WHERE request_id = ?",
            (str(request_id),),
        )
        if not rows:
            return None
        value, digest, partition, offset = rows[0]
        return RequestRecord(request_id, _as_bytes(value), _as_bytes(digest), partition, offset)

    def events(self, request_id: uuid.UUID) -> list[EventRecord]:
        """The request's records in seq order (as stored: verify checks them)."""
        rows = self._query(
            f"SELECT {_EVENT_COLUMNS} FROM audit_events WHERE request_id = ? ORDER BY seq",
            (str(request_id),),
        )
        return [
            EventRecord(uuid.UUID(r), seq, attempt, kind, _as_bytes(value), _as_bytes(h), part, off)
            for r, seq, attempt, kind, value, h, part, off in rows
        ]

    def verdicts(self, request_id: uuid.UUID) -> list[VerdictRecord]:
        """The request's verdicts in log order (as stored: verify checks them)."""
        rows = self._query(
            f"SELECT {_VERDICT_COLUMNS} FROM audit_verdicts WHERE request_id = ? ORDER BY n",
            (str(request_id),),
        )
        return [
            VerdictRecord(uuid.UUID(r), n, _as_bytes(v), _as_bytes(h), _as_bytes(d), part, off)
            for r, n, v, h, d, part, off in rows
        ]

    def all_verdict_chains(self) -> dict[uuid.UUID, VerdictChain]:
        rows = self._query("SELECT request_id, count, head FROM audit_verdict_chains")
        return {uuid.UUID(r): VerdictChain(uuid.UUID(r), n, _as_bytes(h)) for r, n, h in rows}

    def stream_states(self) -> dict[uuid.UUID, StreamState]:
        rows = self._query(
            "SELECT request_id, request_digest, attempt, next_seq, head FROM audit_streams"
        )
        return {
            uuid.UUID(r): StreamState(uuid.UUID(r), _as_bytes(d), a, n, _as_bytes(h))
            for r, d, a, n, h in rows
        }


def _as_bytes(value: bytes | memoryview | str) -> bytes:
    """A stored hash or message as bytes. Written as bytes; a TEXT value can only be
    one written by someone else (SQLite keeps what it is given), so it is read as
    its UTF-8 bytes, which then fail their hash check: a finding, not a crash."""
    return value.encode() if isinstance(value, str) else bytes(value)


def _checkpoint(row: tuple[Any, ...]) -> Checkpoint:
    number, previous, delta, records, requests, created_ms, hash_, signature, public_key = row
    body = CheckpointBody(
        number, _as_bytes(previous), _as_bytes(delta), records, requests, created_ms
    )
    return Checkpoint(body, _as_bytes(hash_), _as_bytes(signature), _as_bytes(public_key))


class _Connection(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Connection)


class ConnectedStore(AuditStore, Generic[_C]):
    """A store over one DB-API connection: what SQLite and PostgreSQL share."""

    _db: _C | None = None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def _conn(self) -> _C:
        if self._db is None:
            raise StoreError("the audit store is not open: call open() first")
        return self._db

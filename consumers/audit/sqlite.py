"""The audit store in a SQLite file (the embedded default)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .store import ConnectedStore, StoreError


class SqliteStore(ConnectedStore["sqlite3.Connection"]):
    """WAL with ``synchronous=NORMAL``: a power cut may lose the last few committed
    batches, but their offsets go with them, so they are read from Kafka again."""

    _append_only = tuple(
        f"CREATE TRIGGER IF NOT EXISTS {{table}}_no_{action} BEFORE {action.upper()} ON {{table}}"
        " BEGIN SELECT RAISE(ABORT, 'the audit store is append-only'); END"
        for action in ("update", "delete")
    )

    def __init__(self, *, path: Path, create: bool = True) -> None:
        self.path = path.expanduser()
        self._create = create

    @property
    def description(self) -> str:
        return f"sqlite:{self.path}"

    def open(self) -> None:
        if not self._create and not self.path.exists():
            raise StoreError(
                f"no audit store at {self.path}: give --store or TOKENBUS_AUDIT_STORE "
                "(a SQLite path or a postgresql:// URL)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode; transactions are explicit. Used from one thread at a
            # time (the consumer's to_thread calls are awaited one by one).
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the audit store {self.path}: {exc}") from exc
        self._create_tables()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

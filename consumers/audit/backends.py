"""Which store a URL names: PostgreSQL for ``postgresql://``, else a SQLite file.

Apart from `store` so that the base class knows none of its backends."""

from __future__ import annotations

from pathlib import Path

from .postgres import PostgresStore
from .sqlite import SqliteStore
from .store import AuditStore


def open_store(url: str, *, create: bool = True) -> AuditStore:
    """The store at ``url`` (not yet opened): PostgreSQL for ``postgresql://``, else SQLite.

    ``create=False`` (the tools): a SQLite file that does not exist is an error, not
    a new empty store."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url=url)
    return SqliteStore(path=sqlite_path(url), create=create)


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite://")) if url.startswith("sqlite://") else Path(url)

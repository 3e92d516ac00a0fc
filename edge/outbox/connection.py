"""Opening the outbox file, its write transactions, and telling a full disk from other errors."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlite_utils

#: SQLite's own ceiling for max_page_count: setting it "lifts" a simulated full disk.
NO_PAGE_LIMIT = 4294967294


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` is SQLite saying the disk (or the page limit) is full: SQLITE_FULL."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL if code is not None else "disk is full" in str(exc)


@contextmanager
def write_tx(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction that takes the write lock at its start (BEGIN IMMEDIATE).

    The command store writes to the same file on a connection of its own: a deferred
    transaction that reads and then writes fails at once with "database is locked" when that
    connection committed in between, whereas BEGIN IMMEDIATE waits (the busy timeout) for it.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    try:
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise


def connect(path: str | Path, *, readonly: bool = False) -> sqlite_utils.Database:
    """A connection to the outbox file that any thread may use (callers serialise it)."""
    if readonly:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    return sqlite_utils.Database(conn, execute_plugins=False)


def open_readonly(path: str | Path) -> sqlite_utils.Database:
    """Open an existing outbox for reading only (it must exist: nothing is created)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no outbox at {path}")
    return connect(path, readonly=True)

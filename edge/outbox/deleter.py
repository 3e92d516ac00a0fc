"""Deleting what the cloud confirmed, on a connection of its own.

Confirmed rows are deleted on a connection of their own, outside the outbox's lock: the
commit's fsync (most of a drain's time on the gateway) then blocks neither the uplink's next
read nor ingest (SQLite's WAL lets one write while the other reads; two writers take turns on
SQLite's own lock).
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox import dead_letters
from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.connection import connect, write_tx
from tern.edge.outbox.schema import OUTBOX, STATUS_EVENTS


def _delete_chunked(db: sqlite_utils.Database, table: str, ids: list[int]) -> int:
    """Delete the rows of ``table`` with these ids (inside the caller's transaction); how many went."""
    before = db.conn.total_changes
    # Chunked: SQLite limits host parameters per statement.
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        db.execute(f"DELETE FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    return db.conn.total_changes - before


class Deleter:
    """Deletes confirmed readings, status events and events, one delete at a time."""

    def __init__(self, path: str | Path) -> None:
        self._db = connect(path)
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()  # one delete at a time on that connection

    def delete(self, ids: list[int], status_ids: list[int], drop_bseqs: list[int], letter_bseqs: list[int],
               hold_bseqs: list[int]) -> tuple[dict[str, int], int]:
        """Delete these readings and status events and the drop and hold events the batches
        ``drop_bseqs`` and ``hold_bseqs`` carried, and mark forwarded the dead letters the batches
        ``letter_bseqs`` carried, in one transaction; returns the readings deleted per device and
        the status events deleted."""
        gone: dict[str, int] = {}
        with self._lock:
            db = self._db
            with write_tx(db):
                # Chunked: SQLite limits host parameters per statement. RETURNING names each
                # row's device for the per-device counts, in the same pass as the delete.
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    for (device,) in db.execute(
                        f"DELETE FROM {OUTBOX} WHERE id IN ({','.join('?' * len(chunk))}) RETURNING device", chunk
                    ).fetchall():
                        gone[device] = gone.get(device, 0) + 1
                status_deleted = _delete_chunked(db, STATUS_EVENTS, status_ids)
                for bseq in drop_bseqs:
                    db.execute(f"DELETE FROM {rtn.DROP_EVENTS} WHERE bseq = ?", [bseq])
                for bseq in hold_bseqs:
                    db.execute(f"DELETE FROM {shares.HOLD_EVENTS} WHERE bseq = ?", [bseq])
                # Kept (evidence on the Pi), marked: never handed to a batch again.
                stamp = now_ms()
                for bseq in letter_bseqs:
                    dead_letters.mark_forwarded(db, bseq, stamp)
        return gone, status_deleted

    def close(self) -> None:
        """Close the connection once a delete under way has finished."""
        with self._lock:  # a delete under way finishes first
            self._db.close()

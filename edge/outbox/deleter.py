"""Deleting what the cloud confirmed, on a connection of its own.

Confirmed rows are deleted on a connection of their own, outside the outbox's lock: the
commit's fsync (most of a drain's time on the gateway) then blocks neither the uplink's next
read nor ingest (SQLite's WAL lets one write while the other reads; two writers take turns on
SQLite's own lock).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Mapping

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox import dead_letters
from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.connection import connect, write_tx
from tern.edge.outbox.schema import OUTBOX, STATUS_EVENTS


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    """``ids`` in slices of 500: SQLite limits host parameters per statement."""
    for start in range(0, len(ids), 500):
        yield ids[start : start + 500]


def _delete_chunked(db: sqlite_utils.Database, table: str, ids: list[int]) -> int:
    """Delete the rows of ``table`` with these ids (inside the caller's transaction); how many went."""
    before = db.conn.total_changes
    for chunk in _chunks(ids):
        db.execute(f"DELETE FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    return db.conn.total_changes - before


class Deleter:
    """Deletes confirmed readings, status events and events, one delete at a time."""

    def __init__(self, path: str | Path) -> None:
        self._db = connect(path)
        self._db.execute("PRAGMA synchronous=FULL")
        # Debian's SQLite (Raspberry Pi OS's too) is built with secure_delete on: every deleted
        # row zeroed even where that costs writes of its own. FAST zeroes them only within the
        # pages a delete writes anyway: a drain's deletes cost less CPU and write less to the card.
        self._db.execute("PRAGMA secure_delete=FAST")
        self._lock = threading.Lock()  # one delete at a time on that connection

    def delete(self, ids: list[int], status_ids: list[int], drop_bseqs: list[int], letter_bseqs: list[int],
               hold_bseqs: list[int], per_device: Mapping[str, int] | None = None,
               ) -> tuple[dict[str, int] | None, int, int]:
        """Delete these readings and status events and the drop and hold events the batches
        ``drop_bseqs`` and ``hold_bseqs`` carried, and mark forwarded the dead letters the batches
        ``letter_bseqs`` carried, in one transaction; returns the readings deleted per device
        (None if ``per_device``, the caller's count of ``ids`` per device, turned out not to be
        it), the readings deleted and the status events deleted."""
        with self._lock:
            db = self._db
            with write_tx(db):
                if per_device is None:
                    gone: dict[str, int] | None = {}
                    # RETURNING names each row's device for the per-device counts, in the same
                    # pass as the delete.
                    for chunk in _chunks(ids):
                        for (device,) in db.execute(
                            f"DELETE FROM {OUTBOX} WHERE id IN ({','.join('?' * len(chunk))}) RETURNING device", chunk
                        ).fetchall():
                            gone[device] = gone.get(device, 0) + 1
                    deleted = sum(gone.values())
                else:
                    # The caller knows each row's device: RETURNING them cost a third of the delete.
                    deleted = _delete_chunked(db, OUTBOX, ids)
                    gone = dict(per_device) if deleted == sum(per_device.values()) else None
                status_deleted = _delete_chunked(db, STATUS_EVENTS, status_ids)
                for bseq in drop_bseqs:
                    db.execute(f"DELETE FROM {rtn.DROP_EVENTS} WHERE bseq = ?", [bseq])
                for bseq in hold_bseqs:
                    db.execute(f"DELETE FROM {shares.HOLD_EVENTS} WHERE bseq = ?", [bseq])
                # Kept (evidence on the Pi), marked: never handed to a batch again.
                stamp = now_ms()
                for bseq in letter_bseqs:
                    dead_letters.mark_forwarded(db, bseq, stamp)
        return gone, deleted, status_deleted

    def close(self) -> None:
        """Close the connection once a delete under way has finished."""
        with self._lock:  # a delete under way finishes first
            self._db.close()

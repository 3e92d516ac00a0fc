"""Batch sequence numbers, and the rows a batch claims by its number.

Drop events, hold events and dead letters travel in a batch by being marked with its ``bseq``
(``claim_*`` in :class:`~tern.edge.outbox.Outbox`); its confirm deletes or marks them.
"""

from __future__ import annotations

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox.connection import write_tx
from tern.edge.outbox.schema import DEAD_LETTERS, META


def release_claims(db: sqlite_utils.Database) -> None:
    """Hand the rows claimed by batches of an earlier run back to the next batch (at open)."""
    with write_tx(db):
        # Nothing is in flight at open: drop events handed to a batch of an earlier run
        # that was never confirmed go to the next batch.
        db.execute(f"UPDATE {rtn.DROP_EVENTS} SET bseq = NULL WHERE bseq IS NOT NULL")
        # Hold events likewise (holds/1).
        db.execute(f"UPDATE {shares.HOLD_EVENTS} SET bseq = NULL WHERE bseq IS NOT NULL")
        # Dead letters too: those of a batch never confirmed are sent again (a new bseq).
        db.execute(f"UPDATE {DEAD_LETTERS} SET bseq = NULL WHERE bseq IS NOT NULL AND forwarded_ms IS NULL")


def reserve(db: sqlite_utils.Database, count: int) -> range:
    """Allocate the next ``count`` batch sequence numbers in one durable transaction.

    Numbers reserved and not used before a restart are skipped, never reused.
    """
    with write_tx(db):
        db.execute(
            f"INSERT INTO {META} (key, value) VALUES ('bseq', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = value + ?",
            [count, count],
        )
        last = db.execute(f"SELECT value FROM {META} WHERE key = 'bseq'").fetchone()[0]
        return range(last - count + 1, last + 1)

"""What an outbox holds, counted: the one read path shared by :meth:`Outbox.summary` and
``tern-gateway outbox`` (which opens the file read-only, even while a gateway runs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import seqtrack
from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.schema import DEAD_LETTERS, META, OUTBOX, STATUS_EVENTS


@dataclass(frozen=True)
class OutboxSummary:
    """Counts for monitoring and ``tern-gateway outbox``."""

    pending: int
    dead_letters: int
    oldest_pending_ms: int | None
    last_bseq: int
    #: One entry per device: site, device, pending, first_seq, last_seq, oldest_ms.
    devices: list[dict] = field(default_factory=list)
    #: Status events waiting for the cloud.
    status_pending: int = 0
    #: Re-sent readings suppressed, open sequence gaps and the readings missing in them.
    duplicates_total: int = 0
    gaps_open: int = 0
    missing_readings: int = 0
    #: Readings dropped by the retention policy, ever, per reason.
    dropped: dict = field(default_factory=dict)
    #: Dead letters still waiting for the cloud's confirm (the rest of ``dead_letters`` reached it).
    dead_letters_unsent: int = 0

    def oldest_pending_age_s(self, now: int | None = None) -> float | None:
        """Age in seconds of the oldest pending reading (by gateway receive time)."""
        if self.oldest_pending_ms is None:
            return None
        return max(0.0, ((now if now is not None else now_ms()) - self.oldest_pending_ms) / 1000)


def summarize(db: sqlite_utils.Database) -> OutboxSummary:
    """Count pending readings per device and dead letters in an outbox database."""
    if not db[OUTBOX].exists():
        return OutboxSummary(pending=0, dead_letters=0, oldest_pending_ms=None, last_bseq=0)
    devices = [
        dict(row)
        for row in db.query(
            f"SELECT site, device, COUNT(*) AS pending, MIN(seq) AS first_seq, MAX(seq) AS last_seq,"
            f" MIN(received_ms) AS oldest_ms FROM {OUTBOX} GROUP BY site, device ORDER BY site, device"
        )
    ]
    pending = sum(d["pending"] for d in devices)
    oldest = db.execute(f"SELECT received_ms FROM {OUTBOX} ORDER BY id LIMIT 1").fetchone()
    dead = db.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS}").fetchone()[0] if db[DEAD_LETTERS].exists() else 0
    # An outbox of a gateway that predates forwarding them: none has reached the cloud yet.
    unsent = (db.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS} WHERE forwarded_ms IS NULL").fetchone()[0]
              if "forwarded_ms" in db[DEAD_LETTERS].columns_dict else dead)
    bseq = db.execute(f"SELECT value FROM {META} WHERE key = 'bseq'").fetchone() if db[META].exists() else None
    # An outbox written by a gateway that predates status forwarding has no such table.
    statuses = db.execute(f"SELECT COUNT(*) FROM {STATUS_EVENTS}").fetchone()[0] if db[STATUS_EVENTS].exists() else 0
    return OutboxSummary(
        pending=pending,
        dead_letters=dead,
        oldest_pending_ms=oldest[0] if oldest else None,
        last_bseq=bseq[0] if bseq else 0,
        devices=devices,
        status_pending=statuses,
        **seqtrack.totals(db),
        dropped=rtn.totals(db),
        dead_letters_unsent=unsent,
    )

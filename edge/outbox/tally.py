"""The counts the outbox keeps in memory, so that the hot paths (room, waits, shares) never
count rows: read from the file at open, then kept up to date by every commit."""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox import dead_letters, readings, statuses


@dataclass(slots=True)
class Tally:
    """In-memory counts of one :class:`~tern.edge.outbox.Outbox`, guarded by its lock."""

    #: Readings committed and not yet confirmed by the cloud.
    pending: int
    #: Status events committed and not yet confirmed by the cloud.
    status_pending: int
    #: Readings waiting per device: what the shares are computed from (edge/shares.py).
    device_rows: dict[str, int]
    #: Drop events, hold events and dead letters waiting for a batch.
    drops_unclaimed: int
    holds_unclaimed: int
    letters_unclaimed: int
    # Highest reading id take() ever handed out: rows at or below it may be in a batch in
    # flight, and retention never drops those (the cloud may already hold them).
    taken_upto: int = 0
    #: Bumped whenever retention drops readings: rows read without protection may be gone.
    drop_generation: int = 0
    forgot_at_ms: int = 0  # last seqtrack.forget_old_boots
    #: The id the next reading gets: above every id this process has seen, never lowered by a
    #: delete (readings.insert says why).
    next_id: int = 1

    @classmethod
    def load(cls, db: sqlite_utils.Database) -> "Tally":
        """The counts of the outbox file as it is now."""
        return cls(
            pending=readings.count(db),
            status_pending=statuses.count(db),
            device_rows=readings.per_device(db),
            drops_unclaimed=rtn.unclaimed_events(db),
            holds_unclaimed=shares.unclaimed_events(db),
            letters_unclaimed=dead_letters.count_unclaimed(db),
            next_id=readings.max_id(db) + 1,
        )

    def waiting(self) -> bool:
        """Anything for the uplink to send: readings, statuses or events waiting for a batch."""
        return (self.pending + self.status_pending + self.drops_unclaimed
                + self.letters_unclaimed + self.holds_unclaimed > 0)

    def recount_readings(self, db: sqlite_utils.Database) -> None:
        """Read the pending readings, in all and per device, from ``db`` again."""
        self.pending = readings.count(db)
        self.device_rows = readings.per_device(db)

    def deleted(self, gone: dict[str, int], status_deleted: int) -> None:
        """Take off what a delete removed: ``gone`` readings per device, and status events."""
        self.pending -= sum(gone.values())
        self.status_pending -= status_deleted
        for device, n in gone.items():
            left = self.device_rows.get(device, 0) - n
            if left > 0:
                self.device_rows[device] = left
            else:
                self.device_rows.pop(device, None)

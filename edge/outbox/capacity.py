"""How much more the outbox may take: the room under its bounds, and the snapshot ingest
decides each device's share from (:mod:`tern.edge.shares`)."""

from __future__ import annotations

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox import readings, statuses
from tern.edge.outbox.schema import OUTBOX
from tern.edge.outbox.tally import Tally
from tern.edge.retention import RetentionPolicy


def droppable(db: sqlite_utils.Database, tally: Tally) -> int:
    """Pending readings retention may drop: those no batch in flight can hold."""
    if not tally.taken_upto:
        return tally.pending
    return tally.pending - readings.count_upto(db, tally.taken_upto)


def room(db: sqlite_utils.Database, policy: RetentionPolicy, tally: Tally) -> int:
    """How many more rows (readings or status events) may be committed now: what fits under
    the row and byte bounds, plus, with ``drop_oldest``, the readings that may be dropped."""
    can_drop = droppable(db, tally) if policy.drops_oldest else 0
    rows = policy.max_rows - tally.pending - tally.status_pending + can_drop
    if policy.max_bytes is not None:
        used = rtn.used_bytes(db)
        row_bytes = rtn.row_bytes_estimate(db, OUTBOX)
        by_bytes = rtn.rows_for_bytes(policy.max_bytes - used, row_bytes)
        if policy.drops_oldest:
            # Dropping frees roughly a row's bytes per row, give or take a page.
            by_bytes += can_drop
        rows = min(rows, by_bytes)
    return max(0, rows)


def admission(db: sqlite_utils.Database, policy: RetentionPolicy, tally: Tally, floor: int | None,
              cap: int | None) -> shares.Admission:
    """A snapshot for deciding, device by device, what ingest may commit now; ``floor``
    defaults to a hundredth of ``max_rows``."""
    used = tally.pending + tally.status_pending
    capacity = policy.max_rows
    if policy.max_bytes is not None:
        # The byte bound as rows: what is used plus what the free bytes hold.
        free = rtn.rows_for_bytes(policy.max_bytes - rtn.used_bytes(db), rtn.row_bytes_estimate(db, OUTBOX))
        capacity = min(capacity, used + free)
    return shares.Admission(
        counts=dict(tally.device_rows),
        used=used,
        capacity=capacity,
        floor=shares.default_floor(policy.max_rows) if floor is None else floor,
        cap=cap,
        online=statuses.online_devices(db),
        drops_oldest=policy.drops_oldest,
        droppable=droppable(db, tally) if policy.drops_oldest else 0,
    )

"""Ingest's writes: one commit of what a group of messages brought, and the periodic sweep.

Both run under the outbox's lock and update its :class:`~tern.edge.outbox.tally.Tally` only
once their transaction has committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import sqlite_utils

from tern.core.codec import Reading, StatusEvent
from tern.edge import retention as rtn
from tern.edge import seqtrack
from tern.edge import shares
from tern.edge.outbox import dead_letters, readings, statuses
from tern.edge.outbox.connection import write_tx
from tern.edge.outbox.dead_letters import DeadLetter
from tern.edge.outbox.enforce import enforce
from tern.edge.outbox.tally import Tally
from tern.edge.retention import RetentionPolicy


@dataclass(frozen=True, slots=True)
class AddResult:
    """What one :meth:`Outbox.add` committed."""

    inserted: int
    duplicates: int
    dead_letters: int
    statuses: int = 0
    #: Statuses equal to the device's latest one (a re-delivered retained message): not stored.
    status_duplicates: int = 0
    #: Sequence gaps this commit opened (see :mod:`tern.edge.seqtrack`).
    gaps: int = 0
    #: Readings that arrived late into an open gap (stored, not duplicates).
    gap_filled: int = 0
    #: Readings the retention policy dropped in this commit, per reason.
    dropped: dict[str, int] = field(default_factory=dict)
    #: Hold events this commit recorded or changed (``holds/1``).
    hold_events: int = 0


def add(
    db: sqlite_utils.Database,
    tally: Tally,
    policy: RetentionPolicy,
    device_cap: int | None,
    new_readings: Sequence[Reading],
    letters: Sequence[DeadLetter],
    stamp: int,
    new_statuses: Sequence[StatusEvent],
    holds: Sequence[shares.Hold] = (),
    released: Sequence[tuple[str, str, str]] = (),
    held: shares.HeldCounts | None = None,
) -> AddResult:
    """Commit readings, statuses, dead letters and holds in one transaction (see :meth:`Outbox.add`)."""
    counts = dict(tally.device_rows)  # this transaction's view; kept only if it commits
    with write_tx(db):
        hold_events = shares.save_holds(db, holds, released, held, stamp)
        # Duplicates of readings already committed (pending or long forwarded) go here,
        # in the same transaction as the rows, so a rollback undoes both.
        screened = seqtrack.screen(db, new_readings, stamp)
        inserted = readings.insert(db, screened.fresh, stamp, tally.next_id)
        status_inserted = statuses.insert_changed(db, new_statuses, stamp)
        letter_count = dead_letters.insert(db, letters, stamp)
        if inserted == len(screened.fresh):
            for r in screened.fresh:
                counts[r.device] = counts.get(r.device, 0) + 1
        else:  # the identity index caught what seqtrack let through: count from the table
            counts = readings.per_device(db)
        dropped = enforce(db, policy, device_cap, tally, tally.pending + inserted,
                          tally.status_pending + status_inserted, stamp, counts)
    tally.device_rows = counts
    # Ids given to ignored rows (or to a rolled-back group, above) are simply never used.
    tally.next_id += len(screened.fresh)
    tally.pending += inserted - sum(dropped.values())
    tally.status_pending += status_inserted
    _note_drops(db, tally, dropped)
    tally.letters_unclaimed += letter_count
    if hold_events:
        tally.holds_unclaimed = shares.unclaimed_events(db)
    return AddResult(
        inserted=inserted,
        duplicates=len(new_readings) - inserted,
        dead_letters=letter_count,
        statuses=status_inserted,
        status_duplicates=len(new_statuses) - status_inserted,
        gaps=screened.gaps_opened,
        gap_filled=screened.gap_filled,
        dropped=dropped,
        hold_events=hold_events,
    )


def sweep(db: sqlite_utils.Database, tally: Tally, policy: RetentionPolicy, device_cap: int | None, stamp: int,
          forget: bool) -> dict[str, int]:
    """Apply the retention policy with nothing new (and forget boots long gone if ``forget``),
    in one transaction; returns the readings dropped per reason."""
    counts = dict(tally.device_rows)
    with write_tx(db):
        dropped = enforce(db, policy, device_cap, tally, tally.pending, tally.status_pending, stamp, counts)
        if forget:
            seqtrack.forget_old_boots(db, stamp)
            tally.forgot_at_ms = stamp
    tally.device_rows = counts
    tally.pending -= sum(dropped.values())
    _note_drops(db, tally, dropped)
    return dropped


def _note_drops(db: sqlite_utils.Database, tally: Tally, dropped: dict[str, int]) -> None:
    if dropped:
        tally.drops_unclaimed = rtn.unclaimed_events(db)

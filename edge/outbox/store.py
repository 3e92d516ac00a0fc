"""The :class:`Outbox`: the one object the ingest and uplink threads share.

It holds the connection, the lock that serialises the two threads on it (SQLite allows one
writer at a time anyway) and the in-memory :class:`~tern.edge.outbox.tally.Tally`; the work
itself is done by the modules beside this one, one table or one job each.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Sequence

from tern.core.codec import (
    MAX_DEADLETTERS_PER_BATCH, MAX_HOLDS_PER_BATCH, DropEvent, GatewayDeadLetter, HoldEvent, Reading, StatusEvent,
)
from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox import batches, capacity, commit, dead_letters, readings, schema, statuses
from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.commit import AddResult
from tern.edge.outbox.connection import NO_PAGE_LIMIT, connect, write_tx
from tern.edge.outbox.dead_letters import DeadLetter
from tern.edge.outbox.deleter import Deleter
from tern.edge.outbox.junk import RetainedJunk
from tern.edge.outbox.readings import OutboxRow
from tern.edge.outbox.reads import OutboxReads
from tern.edge.outbox.statuses import StatusRow
from tern.edge.outbox.tally import Tally
from tern.edge.retention import RetentionPolicy


class Outbox(OutboxReads):
    """The durable, bounded, ordered store between ingest and uplink. Thread-safe."""

    def __init__(self, path: str | Path, max_rows: int = 5_000_000, retention: RetentionPolicy | None = None,
                 device_cap: int | None = None) -> None:
        self.path = Path(path)
        #: Readings one device may hold at most (``device_share_cap``): with ``drop_oldest`` its
        #: oldest go beyond it; with ``block`` ingest holds it back (edge/shares.py).
        self.device_cap = device_cap
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention = retention if retention is not None else RetentionPolicy(max_rows=max_rows)
        self.max_rows = self.retention.max_rows
        db = connect(self.path)
        db.enable_wal()
        # FULL: the commit is on disk before we PUBACK; NORMAL in WAL mode may lose the
        # last transactions on power loss, which would break the custody rule.
        db.execute("PRAGMA synchronous=FULL")
        schema.create(db)
        batches.release_claims(db)
        super().__init__(db, threading.Lock(), Tally.load(db))
        # Signalled on every add/delete, so ingest (waiting for room) and uplink (waiting
        # for rows) wake at once instead of polling.
        self._changed = threading.Condition(self._lock)
        self._junk = RetainedJunk(self.db, self._lock)
        self._deleter = Deleter(self.path)
        self._closed = False
        #: Called (no lock held) after a commit that stored readings or status events: the
        #: uplink looks at once rather than at its next poll (up to half a second later, which
        #: was the p99 latency of a live site).
        self.on_commit: Callable[[], None] | None = None

    # --- writes ------------------------------------------------------------------------

    def room(self) -> int:
        """How many more rows (readings or status events) may be committed now: what fits under
        the row and byte bounds, plus, with ``drop_oldest``, the readings that may be dropped."""
        with self._lock:
            return capacity.room(self.db, self.retention, self._tally)

    def admission(self, floor: int | None = None, cap: int | None = None) -> shares.Admission:
        """A snapshot for deciding, device by device, what ingest may commit now (see
        :mod:`tern.edge.shares`); ``floor`` defaults to a hundredth of ``max_rows``."""
        with self._lock:
            return capacity.admission(self.db, self.retention, self._tally, floor, cap)

    def add(
        self,
        readings: Sequence[Reading],
        dead_letters: Sequence[DeadLetter] = (),
        received_ms: int | None = None,
        statuses: Sequence[StatusEvent] = (),
        holds: Sequence[shares.Hold] = (),
        released: Sequence[tuple[str, str, str]] = (),
        held: shares.HeldCounts | None = None,
    ) -> AddResult:
        """Commit readings and statuses (stamped ``received_ms``) and dead letters in one durable transaction.

        A reading at or below the highest seq committed for its (device, boot), pending or
        long forwarded, is ignored and counted as a duplicate; a jump in seq records the
        missing range (:mod:`tern.edge.seqtrack`). A status equal (boot and state) to the latest one committed for its
        device is ignored too: that is a retained message re-delivered on a (re)subscribe,
        or a QoS 1 re-delivery. Comparing with the *latest* rather than with every pending
        one keeps a real flap (online, offline, online again after a reconnect with the same
        boot) whole. The caller checks :meth:`room` first; ``add`` itself never refuses or
        drops, so a caller that ignores the bound overshoots it rather than losing data.
        ``holds`` and ``released`` (:mod:`tern.edge.shares`) are stored in the same transaction,
        and so are the hold events reporting them and ``held`` (readings held back, per
        (site, device, boot, reason): [count, lowest seq]) to the cloud.
        """
        with self._changed:
            # Stamped under the lock: a batch encoded after this stamp took its status events
            # after this commit, or in the instant before it (the uplink's race, see its tests).
            stamp = now_ms() if received_ms is None else received_ms
            result = commit.add(self.db, self._tally, self.retention, self.device_cap, readings, dead_letters, stamp,
                                statuses, holds, released, held)
            if result.inserted or result.statuses or result.dead_letters or result.hold_events:
                self._changed.notify_all()
        if (result.statuses or result.inserted or result.dead_letters) and self.on_commit is not None:
            self.on_commit()
        return result

    def sweep(self, received_ms: int | None = None) -> dict[str, int]:
        """Apply the age bound now (ingest calls this every few seconds, so readings expire
        while no new ones arrive) and, once an hour, forget the sequence tracking of boots
        long gone; returns the readings dropped per reason."""
        stamp = now_ms() if received_ms is None else received_ms
        forget = stamp - self._tally.forgot_at_ms >= 3_600_000
        if self.retention.max_age_s is None and not forget:
            return {}
        with self._changed:
            if self._closed:
                return {}
            dropped = commit.sweep(self.db, self._tally, self.retention, self.device_cap, stamp, forget)
            if dropped:
                self._changed.notify_all()
        return dropped

    @property
    def drop_generation(self) -> int:
        """Changes whenever retention drops readings (see :meth:`protect`)."""
        with self._lock:
            return self._tally.drop_generation

    def protect(self, upto_id: int, generation: int) -> bool:
        """Protect every reading up to ``upto_id`` from retention (a batch holding them is about
        to leave), unless retention dropped readings since ``generation``: then False, and the
        caller reads its unprotected rows again (some may be gone)."""
        with self._lock:
            if generation != self._tally.drop_generation:
                return False
            self._tally.taken_upto = max(self._tally.taken_upto, upto_id)
            return True

    def take(self, limit: int, after_id: int = 0, protect: bool = True) -> list[OutboxRow]:
        """The oldest ``limit`` pending readings with an id above ``after_id``, in arrival order
        (they stay until deleted). ``protect`` keeps them from retention at once; a reader that
        stages rows ahead protects them with :meth:`protect` when they leave."""
        with self._lock:
            rows = readings.take(self.db, limit, after_id)
            if rows and protect:
                self._tally.taken_upto = max(self._tally.taken_upto, rows[-1].id)
            return rows

    def take_staged(self, limit: int, after_id: int) -> list[readings.Staged]:
        """Like :meth:`take` without protecting them, as :data:`~tern.edge.outbox.readings.Staged`
        rows (id, device, received_ms, envelope item): what the uplink stages."""
        with self._lock:
            return readings.take_staged(self.db, limit, after_id)

    def take_statuses(self, limit: int, busy: Collection[str] = ()) -> list[StatusRow]:
        """The oldest ``limit`` pending status events in arrival order (they stay until deleted),
        leaving out every event of the devices in ``busy``.

        The uplink passes the devices that have a status in a batch in flight: a device's events
        are then never in two batches in flight at once, and what is taken of a device is always
        the oldest of its pending events, so its order holds whichever batch reaches Kafka first,
        while the other devices' events need not wait for that batch.
        """
        with self._lock:
            return statuses.take(self.db, limit, busy)

    def claim_drops(self, bseq: int) -> list[DropEvent]:
        """The drop events batch ``bseq`` carries: the oldest not yet in a batch are handed to it
        (durably), and asking again for the same ``bseq`` (a re-send) returns the same ones.
        :meth:`delete` with ``drop_bseq`` removes them once the batch is confirmed."""
        with self._lock:
            with write_tx(self.db):
                events = rtn.claim_events(self.db, bseq)
            self._tally.drops_unclaimed = rtn.unclaimed_events(self.db)
            return events

    def claim_holds(self, bseq: int, limit: int = MAX_HOLDS_PER_BATCH) -> list[HoldEvent]:
        """The hold events batch ``bseq`` carries (``holds/1``): the oldest not yet in a batch are
        handed to it (durably), and asking again for the same ``bseq`` (a re-send) returns the same
        ones. :meth:`delete` with ``hold_bseq`` removes them once the batch is confirmed."""
        with self._lock:
            with write_tx(self.db):
                events = shares.claim_events(self.db, bseq, limit)
            self._tally.holds_unclaimed = shares.unclaimed_events(self.db)
            return events

    def claim_dead_letters(self, bseq: int, limit: int = MAX_DEADLETTERS_PER_BATCH) -> list[GatewayDeadLetter]:
        """The dead letters batch ``bseq`` carries (the ``deadletters/1`` extension), cut to the
        extension's limits: the oldest unsent not yet in a batch are handed to it (durably), and
        asking again for the same ``bseq`` (a re-send) returns the same ones. :meth:`delete` with
        ``deadletter_bseq`` marks them forwarded once the batch is confirmed."""
        with self._lock:
            with write_tx(self.db):
                rows = dead_letters.claim(self.db, bseq, limit)
            self._tally.letters_unclaimed = dead_letters.count_unclaimed(self.db)
        return dead_letters.as_sent(rows)

    def delete(self, ids: Iterable[int], status_ids: Iterable[int] = (),
               drop_bseq: int | Iterable[int] | None = None,
               deadletter_bseq: int | Iterable[int] | None = None,
               hold_bseq: int | Iterable[int] | None = None,
               per_device: Mapping[str, int] | None = None) -> int:
        """Delete exactly these readings and status events, the drop events the batch(es)
        ``drop_bseq`` carried and the hold events the batch(es) ``hold_bseq`` carried, and mark forwarded the dead letters the batch(es) ``deadletter_bseq``
        carried (after the cloud confirmed them), in one transaction; returns how many readings went.

        ``per_device``: how many of ``ids`` each device has, when the caller knows (the uplink
        does): the delete then need not return each row's device (a third of its cost). Should
        fewer rows go than it says, the per-device counts are read again from the table."""
        ids, status_ids = list(ids), list(status_ids)
        drop_bseqs, letter_bseqs, hold_bseqs = _bseqs(drop_bseq), _bseqs(deadletter_bseq), _bseqs(hold_bseq)
        if not ids and not status_ids and not drop_bseqs and not letter_bseqs and not hold_bseqs:
            return 0
        # On the deleter's own connection, outside the lock (see tern.edge.outbox.deleter).
        gone, deleted, status_deleted = self._deleter.delete(ids, status_ids, drop_bseqs, letter_bseqs, hold_bseqs,
                                                             per_device)
        with self._changed:
            if gone is None:
                # Not the rows per_device counted (never expected: rows in flight are protected
                # from retention): the readings' counts are read from the table again.
                self._tally.recount_readings(self.db)
                gone = {}
            # Relative updates, made after the commit: an add() in between counted its own rows.
            # (Its rare recount from the table, when the identity index caught a duplicate that
            # seqtrack let through, may see this delete and then have it taken off again: the
            # per-device counts that shares use run low by that much until the device drains.)
            self._tally.deleted(gone, status_deleted)
            self._changed.notify_all()
        return deleted

    def next_bseq(self) -> int:
        """Allocate the next batch sequence number, durably (it only ever increases)."""
        return self.reserve_bseqs(1)[0]

    def reserve_bseqs(self, count: int) -> range:
        """Allocate the next ``count`` batch sequence numbers in one durable transaction.

        Numbers reserved and not used before a restart are skipped, never reused.
        """
        with self._lock:
            return batches.reserve(self.db, count)

    # --- waits -------------------------------------------------------------------------

    def wait_for_room(self, timeout: float) -> bool:
        """Block until at least one row fits, or ``timeout`` passes; True if there is room."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._closed or capacity.room(self.db, self.retention, self._tally) > 0, timeout)

    def wait_for_rows(self, timeout: float) -> bool:
        """Block until readings or status events are pending, or ``timeout`` passes; True if any are."""
        with self._changed:
            waiting = self._tally.waiting
            return self._changed.wait_for(lambda: self._closed or waiting(), timeout) and waiting()

    # --- retained junk (tern.edge.outbox.junk) ------------------------------------------

    def known_junk(self, topic: str, digest: str) -> bool:
        """True if this exact retained (topic, payload digest) is already a dead letter here;
        counts the repeat."""
        return self._junk.known(topic, digest)

    def remember_junk(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record (topic, payload digest) pairs just dead-lettered (after :meth:`add` committed
        them: a crash in between costs one extra dead letter, never a missing one)."""
        self._junk.remember(entries)

    # --- the file ----------------------------------------------------------------------

    def limit_pages(self, pages: int | None) -> int:
        """Cap the database at ``pages`` pages (None lifts the cap); returns the cap now in force.

        This is how the tests fill the disk, honestly: with ``PRAGMA max_page_count`` SQLite
        fails every write that needs a page beyond the cap with SQLITE_FULL, the very error
        (through the very code path) a file system without free space gives. Pages freed by
        deleting confirmed rows are reused under the cap, and lifting it is space coming back.
        The cap lives in this connection only: a restart forgets it.
        """
        with self._lock:
            wanted = NO_PAGE_LIMIT if pages is None else pages
            return self.db.execute(f"PRAGMA max_page_count = {int(wanted)}").fetchone()[0]

    def page_count(self) -> int:
        """Pages in the database file now (for :meth:`limit_pages`)."""
        with self._lock:
            return self.db.execute("PRAGMA page_count").fetchone()[0]

    def close(self) -> None:
        """Close the database (wakes any waiter)."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
            self._deleter.close()  # a delete under way finishes first
            try:
                # Fold the WAL into the database file and empty it: a clean stop leaves one
                # self-contained file (to copy, to inspect) even if a statement of another
                # thread keeps the connection from closing at once.
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:  # a reader elsewhere holds it: SQLite recovers the WAL on open
                pass
            self.db.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bseqs(bseq: int | Iterable[int] | None) -> list[int]:
    """One batch number, several, or none, as a list."""
    return [] if bseq is None else [bseq] if isinstance(bseq, int) else list(bseq)

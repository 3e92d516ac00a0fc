"""The gateway's durable outbox: SQLite (WAL, synchronous=FULL) via sqlite-utils.

Its tables are listed (and created, and migrated) in :mod:`tern.edge.outbox.schema`.

The outbox is bounded by its :class:`~tern.edge.retention.RetentionPolicy`: ``max_rows``
pending rows (readings and status events together: a status event is a row on the SD card
like any other), optionally bytes on disk and age. With the default ``block`` policy it never
drops anything to make room: :meth:`Outbox.room` tells ingest how many more it may accept,
and ingest stops acking when that is zero. With ``drop_oldest`` the oldest readings make room
and every drop is counted and reported to the cloud (``drop_counts``, ``drop_events``). Status
events are never dropped. One :class:`Outbox` is shared by the ingest and uplink threads; a lock
serialises them on one connection (SQLite allows one writer at a time anyway).

:func:`summarize` is the one read path shared by :meth:`Outbox.summary` and
``tern-gateway outbox`` (which opens the file read-only, even while a gateway runs).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Sequence

from tern.core.codec import (
    MAX_DEADLETTERS_PER_BATCH, MAX_HOLDS_PER_BATCH, DropEvent, GatewayDeadLetter, HoldEvent, Reading, StatusEvent,
)
from tern.edge import retention as rtn
from tern.edge import seqtrack
from tern.edge import shares
from tern.edge.outbox import batches, dead_letters, readings, schema, statuses
from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.connection import NO_PAGE_LIMIT as _NO_PAGE_LIMIT
from tern.edge.outbox.connection import connect as _connect
from tern.edge.outbox.connection import is_disk_full, open_readonly  # noqa: F401 (exported)
from tern.edge.outbox.connection import write_tx as _write_tx
from tern.edge.outbox.dead_letters import DEAD_LETTER_PAYLOAD_MAX, DeadLetter  # noqa: F401 (exported)
from tern.edge.outbox.deleter import Deleter
from tern.edge.outbox.junk import RetainedJunk
from tern.edge.outbox.readings import OutboxRow
from tern.edge.outbox.schema import (  # noqa: F401 (exported)
    DEAD_LETTERS, META, NODE_STATUS, OUTBOX, RETAINED_JUNK, STATUS_EVENTS,
)
from tern.edge.outbox.statuses import StatusRow
from tern.edge.outbox.summary import OutboxSummary, summarize
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


class Outbox:
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
        # Highest reading id take() ever handed out: rows at or below it may be in a batch in
        # flight, and retention never drops those (the cloud may already hold them).
        self._taken_upto = 0
        #: Bumped whenever retention drops readings: rows read without protection may be gone.
        self._drop_generation = 0
        self._forgot_at_ms = 0  # last seqtrack.forget_old_boots
        self._lock = threading.Lock()
        # Signalled on every add/delete, so ingest (waiting for room) and uplink (waiting
        # for rows) wake at once instead of polling.
        self._changed = threading.Condition(self._lock)
        self.db = _connect(self.path)
        self.db.enable_wal()
        # FULL: the commit is on disk before we PUBACK; NORMAL in WAL mode may lose the
        # last transactions on power loss, which would break the custody rule.
        self.db.execute("PRAGMA synchronous=FULL")
        schema.create(self.db)
        self._pending = readings.count(self.db)
        #: Readings waiting per device: what the shares are computed from (edge/shares.py).
        self._device_rows: dict[str, int] = readings.per_device(self.db)
        self._status_pending = statuses.count(self.db)
        batches.release_claims(self.db)
        self._drops_unclaimed = rtn.unclaimed_events(self.db)
        self._holds_unclaimed = shares.unclaimed_events(self.db)
        self._letters_unclaimed = dead_letters.count_unclaimed(self.db)
        self._junk = RetainedJunk(self.db, self._lock)
        # Confirmed rows are deleted on a connection of their own (tern.edge.outbox.deleter).
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
            return self._room_locked()

    def _room_locked(self) -> int:
        policy = self.retention
        droppable = self._droppable_locked() if policy.drops_oldest else 0
        room = policy.max_rows - self._pending - self._status_pending + droppable
        if policy.max_bytes is not None:
            used = rtn.used_bytes(self.db)
            row_bytes = rtn.row_bytes_estimate(self.db, OUTBOX)
            by_bytes = rtn.rows_for_bytes(policy.max_bytes - used, row_bytes)
            if policy.drops_oldest:
                # Dropping frees roughly a row's bytes per row, give or take a page.
                by_bytes += droppable
            room = min(room, by_bytes)
        return max(0, room)

    def admission(self, floor: int | None = None, cap: int | None = None) -> shares.Admission:
        """A snapshot for deciding, device by device, what ingest may commit now (see
        :mod:`tern.edge.shares`); ``floor`` defaults to a hundredth of ``max_rows``."""
        policy = self.retention
        with self._lock:
            used = self._pending + self._status_pending
            capacity = policy.max_rows
            if policy.max_bytes is not None:
                # The byte bound as rows: what is used plus what the free bytes hold.
                free = rtn.rows_for_bytes(policy.max_bytes - rtn.used_bytes(self.db), rtn.row_bytes_estimate(self.db, OUTBOX))
                capacity = min(capacity, used + free)
            online = statuses.online_devices(self.db)
            return shares.Admission(
                counts=dict(self._device_rows),
                used=used,
                capacity=capacity,
                floor=shares.default_floor(policy.max_rows) if floor is None else floor,
                cap=cap,
                online=online,
                drops_oldest=policy.drops_oldest,
                droppable=self._droppable_locked() if policy.drops_oldest else 0,
            )

    def device_rows(self) -> dict[str, int]:
        """Readings waiting per device."""
        with self._lock:
            return {d: n for d, n in self._device_rows.items() if n > 0}

    def holds(self) -> list[shares.Hold]:
        """The holds stored (ingest loads them at start: a restart keeps every node's hole)."""
        with self._lock:
            return shares.load_holds(self.db)

    def _droppable_locked(self) -> int:
        """Pending readings retention may drop: those no batch in flight can hold."""
        if not self._taken_upto:
            return self._pending
        protected = readings.count_upto(self.db, self._taken_upto)
        return self._pending - protected

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
            result = self._add_locked(readings, dead_letters, stamp, statuses, holds, released, held)
        if (result.statuses or result.inserted or result.dead_letters) and self.on_commit is not None:
            self.on_commit()
        return result

    def _add_locked(
        self,
        new_readings: Sequence[Reading],
        letters: Sequence[DeadLetter],
        stamp: int,
        new_statuses: Sequence[StatusEvent],
        holds: Sequence[shares.Hold] = (),
        released: Sequence[tuple[str, str, str]] = (),
        held: shares.HeldCounts | None = None,
    ) -> AddResult:
        counts = dict(self._device_rows)  # this transaction's view; kept only if it commits
        with _write_tx(self.db):
            hold_events = shares.save_holds(self.db, holds, released, held, stamp)
            # Duplicates of readings already committed (pending or long forwarded) go here,
            # in the same transaction as the rows, so a rollback undoes both.
            screened = seqtrack.screen(self.db, new_readings, stamp)
            inserted = readings.insert(self.db, screened.fresh, stamp)
            status_inserted = statuses.insert_changed(self.db, new_statuses, stamp)
            letter_count = dead_letters.insert(self.db, letters, stamp)
            if inserted == len(screened.fresh):
                for r in screened.fresh:
                    counts[r.device] = counts.get(r.device, 0) + 1
            else:  # the identity index caught what seqtrack let through: count from the table
                counts = readings.per_device(self.db)
            dropped = self._enforce_locked(self._pending + inserted, self._status_pending + status_inserted, stamp, counts)
        self._device_rows = counts
        self._pending += inserted - sum(dropped.values())
        self._status_pending += status_inserted
        self._note_drops(dropped)
        self._letters_unclaimed += letter_count
        if hold_events:
            self._holds_unclaimed = shares.unclaimed_events(self.db)
        if inserted or status_inserted or letter_count or hold_events:
            self._changed.notify_all()
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

    def _enforce_locked(self, pending: int, status_pending: int, stamp: int, counts: dict[str, int]) -> dict[str, int]:
        """Drop readings as the retention policy says, inside the caller's transaction; returns
        how many went per reason. ``pending`` counts the transaction's own inserts, and so do
        ``counts`` (readings per device), which the drops are taken off."""
        policy = self.retention
        dropped: dict[str, int] = {}

        def drop(reason: str, count: int, cutoff_ms: int | None = None, device: str | None = None) -> int:
            gone: dict[str, int] = {}
            n = rtn.drop_oldest(self.db, OUTBOX, count, self._taken_upto, reason, stamp, cutoff_ms, device, gone)
            for d, k in gone.items():
                counts[d] = counts.get(d, 0) - k
            if n:
                dropped[reason] = dropped.get(reason, 0) + n
                self._drop_generation += 1
            return n

        def trim(reason: str, over: int) -> int:
            """Drop ``over`` readings, always of the device holding the most, and only of devices
            over an even share of the bound (their oldest that no batch in flight holds): a
            runaway loses its own readings, never the others'. Only when every droppable row
            of those devices is in a batch in flight do the others give way, most-holding first:
            the bound is the SD card's, and it holds."""
            waiting = {d: n for d, n in counts.items() if n > 0}
            # What the bound leaves, evenly divided: the device holding the most is always above.
            even = max(0, sum(waiting.values()) - over) // max(1, len(waiting))
            gone = 0
            for floor in (even, 0):
                candidates = {d: n - floor for d, n in counts.items() if n > floor}
                for _ in range(10_000):  # each step drops at least one row; bounded anyway
                    step = shares.trim_step(candidates, over - gone)
                    if step is None:
                        break
                    device, n = step
                    k = drop(reason, min(n, candidates[device]), device=device)
                    if k == 0:  # all of it is in a batch in flight: the next device in line
                        candidates.pop(device)
                        continue
                    candidates[device] -= k
                    if candidates[device] <= 0:
                        candidates.pop(device)
                    gone += k
                if gone >= over:
                    break
            return gone

        self._enforce_steps(policy, pending, status_pending, stamp, dropped, drop, trim, counts)
        return dropped

    def _enforce_steps(self, policy: RetentionPolicy, pending: int, status_pending: int, stamp: int,
                       dropped: dict[str, int], drop: Callable[..., int], trim: Callable[[str, int], int],
                       counts: dict[str, int]) -> None:

        if policy.max_age_s is not None:
            cutoff = stamp - int(policy.max_age_s * 1000)
            while drop(rtn.MAX_AGE, rtn.DROP_STEP_MAX, cutoff) == rtn.DROP_STEP_MAX:
                pass
        if not policy.drops_oldest:
            return
        over = pending - sum(dropped.values()) + status_pending - policy.max_rows
        if over > 0:
            trim(rtn.MAX_ROWS, over)
        if self.device_cap is not None:
            for device, n in sorted(counts.items()):
                if n > self.device_cap:
                    drop(rtn.MAX_ROWS, n - self.device_cap, device=device)
        if policy.max_bytes is not None:
            for _ in range(100):  # each step frees at least a page's worth; bounded anyway
                excess = rtn.used_bytes(self.db) - policy.max_bytes
                if excess <= 0:
                    break
                rows = rtn.rows_for_bytes(excess, rtn.row_bytes_estimate(self.db, OUTBOX))
                if not trim(rtn.MAX_BYTES, min(rtn.DROP_STEP_MAX, max(1, rows))):
                    break

    def _note_drops(self, dropped: dict[str, int]) -> None:
        if dropped:
            self._drops_unclaimed = rtn.unclaimed_events(self.db)

    def sweep(self, received_ms: int | None = None) -> dict[str, int]:
        """Apply the age bound now (ingest calls this every few seconds, so readings expire
        while no new ones arrive) and, once an hour, forget the sequence tracking of boots
        long gone; returns the readings dropped per reason."""
        stamp = now_ms() if received_ms is None else received_ms
        forget = stamp - self._forgot_at_ms >= 3_600_000
        if self.retention.max_age_s is None and not forget:
            return {}
        with self._changed:
            if self._closed:
                return {}
            counts = dict(self._device_rows)
            with _write_tx(self.db):
                dropped = self._enforce_locked(self._pending, self._status_pending, stamp, counts)
                if forget:
                    seqtrack.forget_old_boots(self.db, stamp)
                    self._forgot_at_ms = stamp
            self._device_rows = counts
            self._pending -= sum(dropped.values())
            self._note_drops(dropped)
            if dropped:
                self._changed.notify_all()
        return dropped

    @property
    def drop_generation(self) -> int:
        """Changes whenever retention drops readings (see :meth:`protect`)."""
        with self._lock:
            return self._drop_generation

    def protect(self, upto_id: int, generation: int) -> bool:
        """Protect every reading up to ``upto_id`` from retention (a batch holding them is about
        to leave), unless retention dropped readings since ``generation``: then False, and the
        caller reads its unprotected rows again (some may be gone)."""
        with self._lock:
            if generation != self._drop_generation:
                return False
            self._taken_upto = max(self._taken_upto, upto_id)
            return True

    def take(self, limit: int, after_id: int = 0, protect: bool = True) -> list[OutboxRow]:
        """The oldest ``limit`` pending readings with an id above ``after_id``, in arrival order
        (they stay until deleted). ``protect`` keeps them from retention at once; a reader that
        stages rows ahead protects them with :meth:`protect` when they leave."""
        with self._lock:
            rows = readings.take(self.db, limit, after_id)
            if rows and protect:
                self._taken_upto = max(self._taken_upto, rows[-1].id)
            return rows

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
            with _write_tx(self.db):
                events = rtn.claim_events(self.db, bseq)
            self._drops_unclaimed = rtn.unclaimed_events(self.db)
            return events

    def claim_holds(self, bseq: int, limit: int = MAX_HOLDS_PER_BATCH) -> list[HoldEvent]:
        """The hold events batch ``bseq`` carries (``holds/1``): the oldest not yet in a batch are
        handed to it (durably), and asking again for the same ``bseq`` (a re-send) returns the same
        ones. :meth:`delete` with ``hold_bseq`` removes them once the batch is confirmed."""
        with self._lock:
            with _write_tx(self.db):
                events = shares.claim_events(self.db, bseq, limit)
            self._holds_unclaimed = shares.unclaimed_events(self.db)
            return events

    def holds_unclaimed(self) -> int:
        """Hold events waiting for a batch (a reason for the uplink to send one even without readings)."""
        with self._lock:
            return self._holds_unclaimed

    def hold_events(self) -> list[dict]:
        """Every hold event not yet confirmed by the cloud, oldest first (for inspection and tests):
        site, device, boot, reason, first_seq, count, since_ms, at_ms, lifted, bseq."""
        with self._lock:
            return [dict(r) for r in self.db.query(f"SELECT * FROM {shares.HOLD_EVENTS} ORDER BY id")]

    def claim_dead_letters(self, bseq: int, limit: int = MAX_DEADLETTERS_PER_BATCH) -> list[GatewayDeadLetter]:
        """The dead letters batch ``bseq`` carries (the ``deadletters/1`` extension), cut to the
        extension's limits: the oldest unsent not yet in a batch are handed to it (durably), and
        asking again for the same ``bseq`` (a re-send) returns the same ones. :meth:`delete` with
        ``deadletter_bseq`` marks them forwarded once the batch is confirmed."""
        with self._lock:
            with _write_tx(self.db):
                rows = dead_letters.claim(self.db, bseq, limit)
            self._letters_unclaimed = dead_letters.count_unclaimed(self.db)
        return dead_letters.as_sent(rows)

    def dead_letters_unclaimed(self) -> int:
        """Dead letters waiting for a batch (a reason for the uplink to send one even without readings)."""
        with self._lock:
            return self._letters_unclaimed

    def dead_letters_unsent(self) -> int:
        """Dead letters the cloud has not confirmed yet (in a batch in flight or waiting for one)."""
        with self._lock:
            return dead_letters.count_unsent(self.db)

    def drops_unclaimed(self) -> int:
        """Drop events waiting for a batch (a reason for the uplink to send one even without readings)."""
        with self._lock:
            return self._drops_unclaimed

    def delete(self, ids: Iterable[int], status_ids: Iterable[int] = (),
               drop_bseq: int | Iterable[int] | None = None,
               deadletter_bseq: int | Iterable[int] | None = None,
               hold_bseq: int | Iterable[int] | None = None) -> int:
        """Delete exactly these readings and status events, the drop events the batch(es)
        ``drop_bseq`` carried and the hold events the batch(es) ``hold_bseq`` carried, and mark forwarded the dead letters the batch(es) ``deadletter_bseq``
        carried (after the cloud confirmed them), in one transaction; returns how many readings went."""
        ids, status_ids = list(ids), list(status_ids)
        drop_bseqs = [] if drop_bseq is None else [drop_bseq] if isinstance(drop_bseq, int) else list(drop_bseq)
        letter_bseqs = ([] if deadletter_bseq is None else [deadletter_bseq] if isinstance(deadletter_bseq, int)
                        else list(deadletter_bseq))
        hold_bseqs = [] if hold_bseq is None else [hold_bseq] if isinstance(hold_bseq, int) else list(hold_bseq)
        if not ids and not status_ids and not drop_bseqs and not letter_bseqs and not hold_bseqs:
            return 0
        # On the deleter's own connection, outside the lock (see tern.edge.outbox.deleter).
        gone, status_deleted = self._deleter.delete(ids, status_ids, drop_bseqs, letter_bseqs, hold_bseqs)
        deleted = sum(gone.values())
        with self._changed:
            # Relative updates, made after the commit: an add() in between counted its own rows.
            # (Its rare recount from the table, when the identity index caught a duplicate that
            # seqtrack let through, may see this delete and then have it taken off again: the
            # per-device counts that shares use run low by that much until the device drains.)
            self._pending -= deleted
            self._status_pending -= status_deleted
            for device, n in gone.items():
                left = self._device_rows.get(device, 0) - n
                if left > 0:
                    self._device_rows[device] = left
                else:
                    self._device_rows.pop(device, None)
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
            return self._changed.wait_for(lambda: self._closed or self._room_locked() > 0, timeout)

    def wait_for_rows(self, timeout: float) -> bool:
        """Block until readings or status events are pending, or ``timeout`` passes; True if any are."""
        with self._changed:
            waiting = lambda: (self._pending + self._status_pending + self._drops_unclaimed  # noqa: E731
                               + self._letters_unclaimed + self._holds_unclaimed > 0)
            return self._changed.wait_for(lambda: self._closed or waiting(), timeout) and waiting()

    # --- reads -------------------------------------------------------------------------

    def pending(self) -> int:
        """Readings committed and not yet confirmed by the cloud."""
        with self._lock:
            return self._pending

    def status_pending(self) -> int:
        """Status events committed and not yet confirmed by the cloud."""
        with self._lock:
            return self._status_pending

    def node_states(self) -> dict[str, int]:
        """How many devices' latest status is online, and how many offline."""
        with self._lock:
            return statuses.node_states(self.db)

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letters``."""
        with self._lock:
            return dead_letters.count(self.db)

    def known_junk(self, topic: str, digest: str) -> bool:
        """True if this exact retained (topic, payload digest) is already a dead letter here;
        counts the repeat."""
        return self._junk.known(topic, digest)

    def remember_junk(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record (topic, payload digest) pairs just dead-lettered (after :meth:`add` committed
        them: a crash in between costs one extra dead letter, never a missing one)."""
        self._junk.remember(entries)

    def oldest_pending_ms(self) -> int | None:
        """Gateway receive time of the oldest pending reading, or None if the outbox is empty."""
        with self._lock:
            return readings.oldest_received_ms(self.db)

    def limit_pages(self, pages: int | None) -> int:
        """Cap the database at ``pages`` pages (None lifts the cap); returns the cap now in force.

        This is how the tests fill the disk, honestly: with ``PRAGMA max_page_count`` SQLite
        fails every write that needs a page beyond the cap with SQLITE_FULL, the very error
        (through the very code path) a file system without free space gives. Pages freed by
        deleting confirmed rows are reused under the cap, and lifting it is space coming back.
        The cap lives in this connection only: a restart forgets it.
        """
        with self._lock:
            wanted = _NO_PAGE_LIMIT if pages is None else pages
            return self.db.execute(f"PRAGMA max_page_count = {int(wanted)}").fetchone()[0]

    def page_count(self) -> int:
        """Pages in the database file now (for :meth:`limit_pages`)."""
        with self._lock:
            return self.db.execute("PRAGMA page_count").fetchone()[0]

    def dedup_totals(self) -> dict[str, int]:
        """``duplicates_total`` (re-sent readings suppressed, ever), ``gaps_open`` and ``missing_readings``."""
        with self._lock:
            return seqtrack.totals(self.db)

    def device_seq_counts(self) -> list[dict]:
        """Per device: site, duplicates, gaps, missing, boot (latest) and high_seq."""
        with self._lock:
            return seqtrack.device_counts(self.db)

    def gaps(self, device: str | None = None, limit: int = 1000) -> list[dict]:
        """Open sequence gaps, oldest first: site, device, boot, first_seq, last_seq, kind, recorded_ms."""
        with self._lock:
            return seqtrack.gap_list(self.db, device, limit)

    def drop_counts(self) -> list[dict]:
        """Readings dropped by the retention policy, ever, per device and reason:
        site, device, reason, count, last_ms."""
        with self._lock:
            return rtn.counts(self.db)

    def drop_totals(self) -> dict[str, int]:
        """Readings dropped by the retention policy, ever, per reason (max_rows, max_bytes, max_age)."""
        with self._lock:
            return rtn.totals(self.db)

    def used_bytes(self) -> int:
        """Bytes of live pages in the outbox file (what ``max_bytes`` bounds)."""
        with self._lock:
            return rtn.used_bytes(self.db)

    def summary(self) -> OutboxSummary:
        """The same summary ``tern-gateway outbox`` prints."""
        with self._lock:
            return summarize(self.db)

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

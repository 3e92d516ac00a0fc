"""The outbox's questions for monitoring, health, ``tern-gateway`` and tests: answered from
the in-memory tally or by one query, under the outbox's lock; none of them writes."""

from __future__ import annotations

import threading

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import seqtrack
from tern.edge import shares
from tern.edge.outbox import dead_letters, readings, statuses
from tern.edge.outbox.summary import OutboxSummary, summarize
from tern.edge.outbox.tally import Tally


class OutboxReads:
    """The read side of :class:`~tern.edge.outbox.Outbox` (as sqlite-utils' ``Queryable`` is of
    its ``Table``): ``db``, the ``lock`` that serialises it, and the outbox's ``tally``."""

    def __init__(self, db: sqlite_utils.Database, lock: threading.Lock, tally: Tally) -> None:
        self.db = db
        self._lock = lock
        self._tally = tally

    def pending(self) -> int:
        """Readings committed and not yet confirmed by the cloud."""
        with self._lock:
            return self._tally.pending

    def status_pending(self) -> int:
        """Status events committed and not yet confirmed by the cloud."""
        with self._lock:
            return self._tally.status_pending

    def holds_unclaimed(self) -> int:
        """Hold events waiting for a batch (a reason for the uplink to send one even without readings)."""
        with self._lock:
            return self._tally.holds_unclaimed

    def dead_letters_unclaimed(self) -> int:
        """Dead letters waiting for a batch (a reason for the uplink to send one even without readings)."""
        with self._lock:
            return self._tally.letters_unclaimed

    def drops_unclaimed(self) -> int:
        """Drop events waiting for a batch (a reason for the uplink to send one even without readings)."""
        with self._lock:
            return self._tally.drops_unclaimed

    def device_rows(self) -> dict[str, int]:
        """Readings waiting per device."""
        with self._lock:
            return {d: n for d, n in self._tally.device_rows.items() if n > 0}

    def holds(self) -> list[shares.Hold]:
        """The holds stored (ingest loads them at start: a restart keeps every node's hole)."""
        with self._lock:
            return shares.load_holds(self.db)

    def hold_events(self) -> list[dict]:
        """Every hold event not yet confirmed by the cloud, oldest first (for inspection and tests):
        site, device, boot, reason, first_seq, count, since_ms, at_ms, lifted, bseq."""
        with self._lock:
            return [dict(r) for r in self.db.query(f"SELECT * FROM {shares.HOLD_EVENTS} ORDER BY id")]

    def dead_letters_unsent(self) -> int:
        """Dead letters the cloud has not confirmed yet (in a batch in flight or waiting for one)."""
        with self._lock:
            return dead_letters.count_unsent(self.db)

    def node_states(self) -> dict[str, int]:
        """How many devices' latest status is online, and how many offline."""
        with self._lock:
            return statuses.node_states(self.db)

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letters``."""
        with self._lock:
            return dead_letters.count(self.db)

    def oldest_pending_ms(self) -> int | None:
        """Gateway receive time of the oldest pending reading, or None if the outbox is empty."""
        with self._lock:
            return readings.oldest_received_ms(self.db)

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

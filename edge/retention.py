"""Retention: how big and how old the outbox may grow, and what happens to telemetry at the bound.

Three bounds, each optional except the row count (which has a generous default):

- ``max_rows``: readings plus status events pending.
- ``max_bytes``: bytes of live pages in the SQLite file, ``(page_count - freelist_count) *
  page_size``. SQLite reuses freed pages but never shrinks the file by itself, so the file on
  disk stays at its high-water mark: at most about ``max_bytes`` plus the WAL.
- ``max_age_s``: a reading older than this (by gateway receive time) is dropped, whatever the
  policy: setting an age bound is asking for expiry, there is nothing to block on.

The policy for telemetry at the row and byte bounds:

- ``block`` (default): ingest stops acknowledging; the Pi broker's session and the nodes' rings
  hold the rest. Nothing is ever dropped by the row or byte bound.
- ``drop_oldest``: the oldest pending readings make room for new ones, those of the device
  holding the most first (:mod:`tern.edge.shares`): one runaway node loses its own readings,
  never the others'.

Node status events are never dropped (a node that died must be reported, however full the
outbox is), nor dead letters (evidence, capped at 64 KiB each). A reading in a batch in flight
is never dropped either: the cloud may already have it, and a reading must not arrive *and*
be reported dropped.

Every drop is counted per device and reason (``drop_counts``, kept) and becomes a drop event
(``drop_events``) that the uplink carries to the cloud in the batch envelope (the ``drops/1``
extension, docs/contracts.md) and deletes on the confirm. Events of one (device, boot,
reason) not yet handed to a batch are merged while their seqs run on, so their number stays
small however long the outbox overflows, and each event is one exact run of dropped seqs.

Everything here runs inside the caller's transaction, on the caller's connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from tern.core.codec import DROP_REASONS, MAX_DROPS_PER_BATCH, DropEvent

DROP_COUNTS = "drop_counts"
DROP_EVENTS = "drop_events"

BLOCK = "block"
DROP_OLDEST = "drop_oldest"
TELEMETRY_POLICIES = (BLOCK, DROP_OLDEST)

MAX_ROWS = "max_rows"
MAX_BYTES = "max_bytes"
MAX_AGE = "max_age"
assert (MAX_ROWS, MAX_BYTES, MAX_AGE) == DROP_REASONS

#: Rows looked at per step when dropping for the byte bound or for age: bounded work per
#: transaction, so a huge expiry never holds the outbox lock for long.
DROP_STEP_MAX = 5000


class RetentionError(ValueError):
    """A retention setting out of range; the message names it."""


@dataclass(frozen=True)
class RetentionPolicy:
    """The outbox's bounds and what to do with telemetry at them (see the module docstring)."""

    max_rows: int = 5_000_000
    max_bytes: int | None = None
    max_age_s: float | None = None
    telemetry: str = BLOCK

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise RetentionError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.max_bytes is not None and self.max_bytes < 64 * 1024:
            raise RetentionError(f"max_bytes must be at least 65536 (an empty outbox takes ~50 KB), got {self.max_bytes}")
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise RetentionError(f"max_age_s must be positive, got {self.max_age_s}")
        if self.telemetry not in TELEMETRY_POLICIES:
            raise RetentionError(f"telemetry policy must be one of {TELEMETRY_POLICIES}, got {self.telemetry!r}")

    @property
    def drops_oldest(self) -> bool:
        """True when telemetry is dropped oldest-first at the row and byte bounds."""
        return self.telemetry == DROP_OLDEST

    @classmethod
    def from_config(cls, config: Any) -> "RetentionPolicy":
        """The policy a :class:`~tern.edge.config.GatewayConfig` describes (keys ``max_rows``,
        ``max_bytes``, ``max_age_s``, ``telemetry_policy``)."""
        return cls(
            max_rows=config.max_rows,
            max_bytes=getattr(config, "max_bytes", None),
            max_age_s=getattr(config, "max_age_s", None),
            telemetry=getattr(config, "telemetry_policy", BLOCK),
        )


def create_tables(db: sqlite_utils.Database) -> None:
    """Create the drop tables if missing (inside the caller's transaction)."""
    db[DROP_COUNTS].create(
        {"site": str, "device": str, "reason": str, "count": int, "last_ms": int},
        pk=("device", "reason"),
        not_null={"site", "count", "last_ms"},
        if_not_exists=True,
    )
    db[DROP_EVENTS].create(
        {
            "id": int,
            "site": str,
            "device": str,
            "boot": str,
            "reason": str,
            "first_seq": int,
            "last_seq": int,
            "count": int,
            "dropped_ms": int,
            # The batch carrying it; NULL until the uplink hands it to one.
            "bseq": int,
        },
        pk="id",
        not_null={"site", "device", "boot", "reason", "first_seq", "last_seq", "count", "dropped_ms"},
        if_not_exists=True,
    )


def used_bytes(db: sqlite_utils.Database) -> int:
    """Bytes of live pages in the database, the transaction's own changes included."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * page_size


def row_bytes_estimate(db: sqlite_utils.Database, table: str) -> int:
    """Rough bytes one pending reading takes (row plus its identity-index entry), from the oldest
    rows; used to turn a byte budget into rows."""
    avg = db.execute(
        f'SELECT AVG(2 * (LENGTH(device) + LENGTH(boot)) + LENGTH(site) + LENGTH("values"))'
        f" FROM (SELECT device, boot, site, \"values\" FROM {table} ORDER BY id LIMIT 100)"
    ).fetchone()[0]
    # ~50 bytes of record headers, integers, rowids and cell pointers per row and index entry.
    return int(avg or 150) + 50


def drop_oldest(
    db: sqlite_utils.Database,
    table: str,
    count: int,
    after_id: int,
    reason: str,
    stamp: int,
    cutoff_ms: int | None = None,
    device: str | None = None,
    per_device_out: dict[str, int] | None = None,
) -> int:
    """Delete the ``count`` oldest readings with an id above ``after_id`` (and, with
    ``cutoff_ms``, received before it; with ``device``, of that device only), count them and
    record drop events; returns how many went, and adds them per device to ``per_device_out``."""
    where, args = f"id > ?", [after_id]
    if cutoff_ms is not None:
        where += " AND received_ms < ?"
        args.append(cutoff_ms)
    if device is not None:
        where += " AND device = ?"
        args.append(device)
    rows = db.execute(
        f"SELECT id, site, device, boot, seq FROM {table} WHERE {where} ORDER BY id LIMIT ?", [*args, count]
    ).fetchall()
    if not rows:
        return 0
    ids = [r[0] for r in rows]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        db.execute(f"DELETE FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    groups: dict[tuple[str, str, str], list[int]] = {}
    for _id, site, device, boot, seq in rows:
        groups.setdefault((site, device, boot), []).append(seq)
    per_device: dict[tuple[str, str], int] = {}
    for (site, device, boot), seqs in groups.items():
        for first, last in _runs(seqs):
            _record_event(db, site, device, boot, reason, first, last, stamp)
        per_device[(site, device)] = per_device.get((site, device), 0) + len(seqs)
        if per_device_out is not None:
            per_device_out[device] = per_device_out.get(device, 0) + len(seqs)
    for (site, device), n in per_device.items():
        db.execute(
            f"INSERT INTO {DROP_COUNTS} (site, device, reason, count, last_ms) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(device, reason) DO UPDATE SET count = count + excluded.count,"
            " last_ms = excluded.last_ms, site = excluded.site",
            [site, device, reason, n, stamp],
        )
    return len(rows)


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """``seqs`` as maximal runs of consecutive numbers: [1, 2, 3, 7, 9, 10] -> (1, 3), (7, 7), (9, 10)."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _record_event(
    db: sqlite_utils.Database, site: str, device: str, boot: str, reason: str, first: int, last: int, stamp: int
) -> None:
    # An event is one run of consecutive seqs, all dropped: exact, whatever was forwarded,
    # dropped earlier or never arrived around it. A run that continues an event no batch has
    # taken yet (a batch in flight carries exactly what its event said when it was taken)
    # extends it, which keeps one event per device during a long overflow.
    open_event = db.execute(
        f"SELECT id FROM {DROP_EVENTS} WHERE bseq IS NULL AND device = ? AND boot = ? AND reason = ?"
        " AND last_seq = ? ORDER BY id DESC LIMIT 1",
        [device, boot, reason, first - 1],
    ).fetchone()
    if open_event:
        db.execute(
            f"UPDATE {DROP_EVENTS} SET last_seq = ?, count = count + ?, dropped_ms = ?, site = ? WHERE id = ?",
            [last, last - first + 1, stamp, site, open_event[0]],
        )
    else:
        db.execute(
            f"INSERT INTO {DROP_EVENTS} (site, device, boot, reason, first_seq, last_seq, count, dropped_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [site, device, boot, reason, first, last, last - first + 1, stamp],
        )


def claim_events(db: sqlite_utils.Database, bseq: int, limit: int = MAX_DROPS_PER_BATCH) -> list[DropEvent]:
    """Hand the oldest unclaimed drop events to batch ``bseq`` and return every event it carries
    (calling it again for the same ``bseq`` returns the same ones, plus any still unclaimed)."""
    db.execute(
        f"UPDATE {DROP_EVENTS} SET bseq = ? WHERE id IN"
        f" (SELECT id FROM {DROP_EVENTS} WHERE bseq IS NULL ORDER BY id LIMIT"
        f"  MAX(0, ? - (SELECT COUNT(*) FROM {DROP_EVENTS} WHERE bseq = ?)))",
        [bseq, limit, bseq],
    )
    cursor = db.execute(
        f"SELECT site, device, boot, reason, first_seq, last_seq, count, dropped_ms FROM {DROP_EVENTS}"
        " WHERE bseq = ? ORDER BY id",
        [bseq],
    )
    return [DropEvent(*row) for row in cursor.fetchall()]


def unclaimed_events(db: sqlite_utils.Database) -> int:
    """Drop events not yet handed to a batch."""
    return db.execute(f"SELECT COUNT(*) FROM {DROP_EVENTS} WHERE bseq IS NULL").fetchone()[0]


def counts(db: sqlite_utils.Database) -> list[dict]:
    """Drops per device and reason, ever: site, device, reason, count, last_ms."""
    if not db[DROP_COUNTS].exists():
        return []
    keys = ("site", "device", "reason", "count", "last_ms")
    cursor = db.execute(
        f"SELECT site, device, reason, count, last_ms FROM {DROP_COUNTS} ORDER BY site, device, reason"
    )
    return [dict(zip(keys, row)) for row in cursor.fetchall()]


def totals(db: sqlite_utils.Database) -> dict[str, int]:
    """Drops per reason over every device (every reason present, 0 if none)."""
    out = {reason: 0 for reason in DROP_REASONS}
    if db[DROP_COUNTS].exists():
        for reason, n in db.execute(f"SELECT reason, SUM(count) FROM {DROP_COUNTS} GROUP BY reason").fetchall():
            out[reason] = n
    return out


def rows_for_bytes(byte_budget: int, row_bytes: int) -> int:
    """How many rows of ``row_bytes`` fit ``byte_budget`` (0 if none)."""
    return max(0, math.floor(byte_budget / max(1, row_bytes)))

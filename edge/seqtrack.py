"""Duplicates and gaps: per (device, boot), the highest sequence number the outbox committed.

A node numbers its readings 1, 2, 3, ... per boot and re-sends whatever the gateway did not
acknowledge (a lost ack, a reconnect). The outbox's UNIQUE index only catches a re-send while
the first copy is still pending; once that copy was forwarded and deleted, the re-send would
be stored and forwarded again. So the outbox also keeps, durably and in the same transaction
as the readings, the highest seq committed per (device, boot):

- a reading at or below it is a **duplicate**: acknowledged, counted, not stored;
- a reading more than one above it opens a **gap**: the missing range is recorded;
- a reading inside a recorded gap (it arrived late, out of order) is *not* a duplicate: it is
  stored and the gap shrinks. Only the gap table can tell a late reading from a re-sent one.

Tables (created by :func:`create_tables`):

- ``seq_high``: ``(device, boot)`` -> site, highest seq, duplicates counted, first and last
  time seen.
- ``seq_gaps``: one row per missing range ``[first_seq, last_seq]`` still open, with when it
  was recorded and ``kind``: ``jump`` (seq skipped ahead) or ``start`` (the first reading this
  gateway saw of a boot was above 1: the earlier ones never reached it).

Everything here runs inside the caller's transaction on the caller's connection: a rolled
back commit (a full disk) rolls the tracking back with the readings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import sqlite_utils

from tern.core.codec import Reading

SEQ_HIGH = "seq_high"
SEQ_GAPS = "seq_gaps"

#: The first seq of a boot (docs/contracts.md). A first reading above it opens a ``start`` gap.
FIRST_SEQ = 1


@dataclass(slots=True)
class Screened:
    """What :func:`screen` decided for one group of readings."""

    #: Readings to store, in the order given.
    fresh: list[Reading] = field(default_factory=list)
    #: Readings at or below their boot's highest committed seq (and in no open gap).
    duplicates: int = 0
    #: Missing ranges opened by this group (and still open at its end).
    gaps_opened: int = 0
    #: Readings that arrived late into an open gap.
    gap_filled: int = 0


def create_tables(db: sqlite_utils.Database) -> None:
    """Create the tracking tables if missing (inside the caller's transaction)."""
    db[SEQ_HIGH].create(
        {
            "device": str,
            "boot": str,
            "site": str,
            "high": int,
            "duplicates": int,
            "first_ms": int,
            "updated_ms": int,
        },
        pk=("device", "boot"),
        not_null={"site", "high", "duplicates", "first_ms", "updated_ms"},
        if_not_exists=True,
    )
    db[SEQ_GAPS].create(
        {
            "id": int,
            "site": str,
            "device": str,
            "boot": str,
            "first_seq": int,
            "last_seq": int,
            "kind": str,
            "recorded_ms": int,
        },
        pk="id",
        not_null={"site", "device", "boot", "first_seq", "last_seq", "kind", "recorded_ms"},
        if_not_exists=True,
    )
    db[SEQ_GAPS].create_index(["device", "boot", "first_seq"], index_name="seq_gaps_key", if_not_exists=True)


def screen(db: sqlite_utils.Database, readings: Sequence[Reading], stamp: int) -> Screened:
    """Sort ``readings`` into fresh ones and duplicates and record gaps; call inside a transaction.

    Updates ``seq_high`` and ``seq_gaps`` for the fresh ones, so the caller must store exactly
    ``result.fresh`` in the same transaction.
    """
    out = Screened()
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, r in enumerate(readings):
        by_key.setdefault((r.device, r.boot), []).append(index)
    keep = [False] * len(readings)
    highs = _load_highs(db, list(by_key))
    marks: list[tuple[str, str, str, int, int, int, int]] = []  # seq_high rows to upsert, in key order
    for (device, boot), indexes in by_key.items():
        high = highs.get((device, boot))
        duplicates = 0
        new_gaps: list[list[int]] = []  # opened by this group: [first, last, kind]
        old_gaps: list[tuple[int, int, int, str]] | None = None  # loaded only when a seq <= high shows up
        changed_old: dict[int, list[tuple[int, int]]] = {}  # gap id -> what remains of it
        for index in indexes:
            seq = readings[index].seq
            if high is None:
                if seq > FIRST_SEQ:
                    new_gaps.append([FIRST_SEQ, seq - 1, "start"])
                high = seq
                keep[index] = True
                continue
            if seq > high:
                if seq > high + 1:
                    new_gaps.append([high + 1, seq - 1, "jump"])
                high = seq
                keep[index] = True
                continue
            # At or below the high mark: late into a gap, or a re-send.
            if _fill(new_gaps, seq):
                keep[index] = True
                out.gap_filled += 1
                continue
            if old_gaps is None:
                old_gaps = [
                    tuple(g)
                    for g in db.execute(
                        f"SELECT id, first_seq, last_seq, kind FROM {SEQ_GAPS} WHERE device = ? AND boot = ?"
                        " AND first_seq <= ? ORDER BY first_seq",
                        [device, boot, high],
                    ).fetchall()
                ]
            if _fill_old(old_gaps, changed_old, seq):
                keep[index] = True
                out.gap_filled += 1
                continue
            duplicates += 1
        marks.append((device, boot, readings[indexes[0]].site, high, duplicates, stamp, stamp))
        kinds = {g[0]: g[3] for g in old_gaps or ()}
        for gap_id, pieces in changed_old.items():
            # A late reading splits the range: the pieces keep its kind, under new ids.
            db.execute(f"DELETE FROM {SEQ_GAPS} WHERE id = ?", [gap_id])
            kind = kinds[gap_id]
            for first, last in pieces:
                _insert_gap(db, readings[indexes[0]].site, device, boot, first, last, kind, stamp)
        for first, last, kind in new_gaps:
            if first <= last:
                _insert_gap(db, readings[indexes[0]].site, device, boot, first, last, kind, stamp)
                out.gaps_opened += 1
        out.duplicates += duplicates
    _write_highs(db, marks)
    out.fresh = [r for r, k in zip(readings, keep) if k]
    return out


def _fill(gaps: list[list], seq: int) -> bool:
    """Take ``seq`` out of one of this group's new gaps (splitting it); True if it was in one."""
    for i, (first, last, kind) in enumerate(gaps):
        if first <= seq <= last:
            gaps[i : i + 1] = [g for g in ([first, seq - 1, kind], [seq + 1, last, kind]) if g[0] <= g[1]]
            return True
    return False


def _fill_old(gaps: list[tuple[int, int, int, str]], changed: dict[int, list[tuple[int, int]]], seq: int) -> bool:
    """Take ``seq`` out of a stored gap; the pieces left are collected in ``changed``."""
    for gap_id, first, last, _kind in gaps:
        pieces = changed.get(gap_id, [(first, last)])
        for j, (lo, hi) in enumerate(pieces):
            if lo <= seq <= hi:
                rest = [(a, b) for a, b in ((lo, seq - 1), (seq + 1, hi)) if a <= b]
                changed[gap_id] = pieces[:j] + rest + pieces[j + 1 :]
                return True
    return False


#: Keys read per SELECT: two bound variables each, well under SQLite's limit on them.
KEYS_PER_SELECT = 400


def _load_highs(db: sqlite_utils.Database, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The high mark of each ``(device, boot)`` in ``keys`` that has one, read in one SELECT
    per :data:`KEYS_PER_SELECT` keys rather than one per key: a group carries many keys."""
    highs: dict[tuple[str, str], int] = {}
    for start in range(0, len(keys), KEYS_PER_SELECT):
        chunk = keys[start : start + KEYS_PER_SELECT]
        rows = ", ".join(["(?, ?)"] * len(chunk))
        # A join, not "(device, boot) IN (VALUES ...)": SQLite plans that IN as a scan of the
        # whole table; the join looks each key up in the primary key's index.
        cursor = db.execute(
            f"SELECT h.device, h.boot, h.high FROM (VALUES {rows}) AS k"
            f" CROSS JOIN {SEQ_HIGH} h ON h.device = k.column1 AND h.boot = k.column2",
            [part for key in chunk for part in key],
        )
        for device, boot, high in cursor.fetchall():
            highs[(device, boot)] = high
    return highs


def _write_highs(db: sqlite_utils.Database, marks: Sequence[tuple[str, str, str, int, int, int, int]]) -> None:
    """Store each key's new high mark: a new key is inserted (``first_ms`` is its stamp, its
    rowid follows ``marks``' order as one INSERT per key would), a known one gets ``high``,
    ``site`` and ``updated_ms`` replaced and its duplicates added. One statement for the group."""
    db.conn.executemany(
        f"INSERT INTO {SEQ_HIGH} (device, boot, site, high, duplicates, first_ms, updated_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (device, boot) DO UPDATE SET high = excluded.high,"
        " duplicates = duplicates + excluded.duplicates, updated_ms = excluded.updated_ms, site = excluded.site",
        marks,
    )


def _insert_gap(
    db: sqlite_utils.Database, site: str, device: str, boot: str, first: int, last: int, kind: str, stamp: int
) -> None:
    db.execute(
        f"INSERT INTO {SEQ_GAPS} (site, device, boot, first_seq, last_seq, kind, recorded_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [site, device, boot, first, last, kind, stamp],
    )


#: A boot that is not its device's latest and has not been seen for this long is forgotten
#: (its high mark, duplicate count and gaps), so the tables stay bounded on a gateway that
#: runs for years. A node cannot re-send a reading of an older boot after a month: its ring
#: is in RAM and a reboot starts a new boot.
FORGET_AFTER_MS = 30 * 86400 * 1000


def forget_old_boots(db: sqlite_utils.Database, now_ms: int, after_ms: int = FORGET_AFTER_MS) -> int:
    """Delete the tracking of boots unseen since ``now_ms - after_ms`` that are not their
    device's latest; inside the caller's transaction. Returns how many boots went."""
    cutoff = now_ms - after_ms
    old = db.execute(
        f"SELECT device, boot FROM {SEQ_HIGH} h WHERE updated_ms < ? AND updated_ms <"
        f" (SELECT MAX(updated_ms) FROM {SEQ_HIGH} l WHERE l.device = h.device)",
        [cutoff],
    ).fetchall()
    for device, boot in old:
        db.execute(f"DELETE FROM {SEQ_HIGH} WHERE device = ? AND boot = ?", [device, boot])
        db.execute(f"DELETE FROM {SEQ_GAPS} WHERE device = ? AND boot = ?", [device, boot])
    return len(old)


def device_counts(db: sqlite_utils.Database) -> list[dict]:
    """Per device: site, duplicates, open gaps, missing readings, last boot seen and its high seq."""
    if not db[SEQ_HIGH].exists():
        return []
    rows = db.execute(
        f"SELECT h.site, h.device, SUM(h.duplicates),"
        f" (SELECT boot FROM {SEQ_HIGH} l WHERE l.device = h.device ORDER BY l.updated_ms DESC, l.rowid DESC LIMIT 1),"
        f" (SELECT high FROM {SEQ_HIGH} l WHERE l.device = h.device ORDER BY l.updated_ms DESC, l.rowid DESC LIMIT 1)"
        f" FROM {SEQ_HIGH} h GROUP BY h.device ORDER BY h.site, h.device"
    ).fetchall()
    gaps = {
        device: (count, missing)
        for device, count, missing in db.execute(
            f"SELECT device, COUNT(*), SUM(last_seq - first_seq + 1) FROM {SEQ_GAPS} GROUP BY device"
        ).fetchall()
    }
    return [
        {
            "site": site,
            "device": device,
            "duplicates": dups,
            "gaps": gaps.get(device, (0, 0))[0],
            "missing": gaps.get(device, (0, 0))[1],
            "boot": boot,
            "high_seq": high,
        }
        for site, device, dups, boot, high in rows
    ]


def totals(db: sqlite_utils.Database) -> dict[str, int]:
    """Duplicates, open gaps and missing readings over every device."""
    if not db[SEQ_HIGH].exists():
        return {"duplicates_total": 0, "gaps_open": 0, "missing_readings": 0}
    dups = db.execute(f"SELECT COALESCE(SUM(duplicates), 0) FROM {SEQ_HIGH}").fetchone()[0]
    gaps, missing = db.execute(
        f"SELECT COUNT(*), COALESCE(SUM(last_seq - first_seq + 1), 0) FROM {SEQ_GAPS}"
    ).fetchone()
    return {"duplicates_total": dups, "gaps_open": gaps, "missing_readings": missing}


def gap_list(db: sqlite_utils.Database, device: str | None = None, limit: int = 1000) -> list[dict]:
    """Open gaps, oldest first (optionally one device's)."""
    if not db[SEQ_GAPS].exists():
        return []
    where, args = ("WHERE device = ?", [device]) if device is not None else ("", [])
    cursor = db.execute(
        f"SELECT site, device, boot, first_seq, last_seq, kind, recorded_ms FROM {SEQ_GAPS} {where}"
        " ORDER BY id LIMIT ?",
        [*args, limit],
    )
    keys = ("site", "device", "boot", "first_seq", "last_seq", "kind", "recorded_ms")
    return [dict(zip(keys, row)) for row in cursor.fetchall()]

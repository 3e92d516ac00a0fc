"""Stage 2, outbox: ``Outbox.add`` in groups vs raw ``sqlite3`` executemany, same pragmas."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Sequence

from tern.core.codec import Reading
from tern.harness.bench.common import (
    OUTBOX_GROUP,
    BenchError,
    Measurement,
    rate,
    sample_readings,
)
from tern.harness.bench.lab import Lab

RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, site TEXT NOT NULL, device TEXT NOT NULL, boot TEXT NOT NULL,
    seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, "values" TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_identity ON outbox (device, boot, seq);
"""
RAW_INSERT = 'INSERT OR IGNORE INTO outbox (site, device, boot, seq, ts_ms, received_ms, "values") VALUES (?, ?, ?, ?, ?, ?, ?)'


def groups(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` cut into consecutive slices of ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def outbox_add_seconds(path: Path, readings: list[Reading]) -> float:
    """Seconds to commit ``readings`` through Outbox.add in groups of OUTBOX_GROUP."""
    from tern.edge.outbox import Outbox

    with Outbox(path) as outbox:
        start = time.perf_counter()
        for group in groups(readings, OUTBOX_GROUP):
            outbox.add(group)
        seconds = time.perf_counter() - start
        if outbox.pending() != len(readings):
            raise BenchError(f"outbox: {outbox.pending()} rows pending after adding {len(readings)}")
    return seconds


def raw_sqlite_seconds(path: Path, readings: list[Reading]) -> float:
    """Seconds to commit the same readings with sqlite3 executemany, same schema and pragmas.

    Like Outbox.add, the timing includes turning each group of Reading objects into rows.
    """
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(RAW_SCHEMA)
        start = time.perf_counter()
        for group in groups(readings, OUTBOX_GROUP):
            # Timed like Outbox.add: from Reading objects (values as compact JSON) to a commit.
            stamp = time.time_ns() // 1_000_000
            rows = [(r.site, r.device, r.boot, r.seq, r.ts_ms, stamp, json.dumps(dict(r.values), separators=(",", ":")))
                    for r in group]
            with conn:
                conn.executemany(RAW_INSERT, rows)
        seconds = time.perf_counter() - start
        if conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] != len(readings):
            raise BenchError("outbox baseline: row count differs from rows inserted")
    finally:
        conn.close()
    return seconds


def bench_outbox(lab: Lab) -> list[Measurement]:
    """Readings/s committed via Outbox.add vs raw sqlite3 (WAL, synchronous=FULL), groups of 100."""
    readings = sample_readings(lab.sizes.outbox_rows)
    tern_times, base_times = [], []
    for _ in range(lab.sizes.outbox_repeats):
        base_times.append(raw_sqlite_seconds(lab.folder("sqlite") / "raw.db", readings))
        tern_times.append(outbox_add_seconds(lab.folder("outbox") / "outbox.db", readings))
    count = len(readings)
    return [Measurement(
        name="outbox.add", benchmark="outbox", unit="readings/s",
        figure=rate(count, min(tern_times)), baseline=rate(count, min(base_times)),
        what=f"Outbox.add, {OUTBOX_GROUP} readings per commit",
        baseline_what="sqlite3 executemany of the same rows, same schema, WAL + synchronous=FULL",
        count=count, details={"repeats": lab.sizes.outbox_repeats, "group": OUTBOX_GROUP},
    )]

"""A big outbox, built fast: millions of pending readings for the growth stage.

Ten million readings through ``Outbox.add`` would take minutes; so the file is built in bulk
instead, **on the outbox's own schema**: :class:`tern.edge.outbox.Outbox` creates an empty
outbox (every table and index, WAL mode), then the rows go in with one ``executemany`` in a
single transaction (journal off, the identity index dropped meanwhile and rebuilt from its own
SQL at the end), and the sequence tracking gets each device's highest seq, as ``Outbox.add``
would have left it. The result is what a gateway that queued that many readings holds.

Built files are kept under ``<cache>/bench/preload/``, named by row count and a digest of the
schema (and of this builder's row format), so a schema change builds anew and a rerun of the
bench reuses the file; other schemas' files, and the least recently used beyond
:data:`CACHE_BUDGET`, are deleted when one is built. Each user gets a copy (:func:`copy_outbox`): a run drains and fills it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from tern.harness.bench.common import BOOT, SITE, BenchError
from tern.toolchain import cache_dir

#: Devices the preloaded readings come from (none of them is one of the fleets' devices, so
#: the readings a stage publishes are never duplicates of these).
DEVICES = 200
#: Bumped when the rows written here change (their devices, values, timestamps).
FORMAT = 1
RECEIVED_MS = 1_795_456_737_500
ROWS_PER_CALL = 100_000


def device_name(k: int) -> str:
    """The ``k``-th device of the preloaded backlog."""
    return f"bench-old-{k:04d}"


def schema_digest() -> str:
    """A digest of the outbox's schema as :class:`Outbox` creates it (and of :data:`FORMAT`)."""
    import tempfile

    from tern.edge.outbox import Outbox

    with tempfile.TemporaryDirectory(prefix="tern-schema-") as folder:
        path = Path(folder) / "outbox.db"
        Outbox(path).close()
        conn = sqlite3.connect(path)
        try:
            sql = "\n".join(row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"))
        finally:
            conn.close()
    return hashlib.sha256(f"{FORMAT}\n{sql}".encode()).hexdigest()[:12]


def _rows(count: int) -> Iterator[tuple]:
    """(site, device, boot, seq, ts_ms, received_ms, values) of the backlog, round robin over the devices."""
    for i in range(count):
        values = f'{{"adc_mv":{1200 + i % 400},"temp_c":{21.5 + (i % 50) / 16},"rh":40.25,"sensor_err":0}}'
        yield SITE, device_name(i % DEVICES), BOOT, i // DEVICES + 1, 1_795_456_737_123 + i, RECEIVED_MS, values


def build_outbox(path: Path, count: int) -> None:
    """Write an outbox of ``count`` pending readings at ``path`` (which must not exist)."""
    from tern.edge.outbox import OUTBOX, Outbox
    from tern.edge.seqtrack import SEQ_HIGH

    Outbox(path).close()  # the schema, exactly as the gateway creates it
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Bulk: no journal, no fsync, no index maintenance per row (it is rebuilt once, below).
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-65536")
        index_sql = [row[0] for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", [OUTBOX])]
        conn.execute("BEGIN")
        for sql in index_sql:
            name = sql.split("INDEX", 1)[1].split("ON", 1)[0].replace("IF NOT EXISTS", "").strip().strip('"[]`')
            conn.execute(f'DROP INDEX "{name}"')
        conn.executemany(
            f'INSERT INTO {OUTBOX} (site, device, boot, seq, ts_ms, received_ms, "values") VALUES (?, ?, ?, ?, ?, ?, ?)',
            _rows(count),
        )
        for sql in index_sql:
            conn.execute(sql)
        conn.execute(
            f"INSERT INTO {SEQ_HIGH} (device, boot, site, high, duplicates, first_ms, updated_ms)"
            f" SELECT device, boot, site, MAX(seq), 0, ?, ? FROM {OUTBOX} GROUP BY device, boot",
            [RECEIVED_MS, RECEIVED_MS],
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")  # as the gateway keeps it
    finally:
        conn.close()


#: Bytes of built outboxes kept at most; the least recently used go first (a full run uses ~3.5 GB).
CACHE_BUDGET = 6 * 2**30


def _evict(folder: Path, digest: str, keep: Path) -> None:
    """Delete built outboxes of other schemas, then the least recently used beyond the budget."""
    files = sorted(folder.glob("outbox-*.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in files:
        if path != keep and (not path.stem.endswith(digest) or total + path.stat().st_size > CACHE_BUDGET):
            path.unlink(missing_ok=True)
            continue
        total += path.stat().st_size


def preloaded_outbox(count: int) -> tuple[Path, float]:
    """The cached outbox of ``count`` readings (built on first use); and seconds spent building it now."""
    folder = cache_dir() / "bench" / "preload"
    digest = schema_digest()
    path = folder / f"outbox-{count}-{digest}.db"
    if path.exists():
        path.touch()  # recently used: the last to be evicted
        return path, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    start = time.perf_counter()
    build_outbox(partial, count)
    conn = sqlite3.connect(partial)
    try:
        held = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        conn.close()
    if held != count:
        raise BenchError(f"preload: built an outbox of {held} readings, not {count}")
    with partial.open("rb+") as f:
        os.fsync(f.fileno())  # built with synchronous=OFF: on disk before any round is timed
    partial.rename(path)
    _evict(folder, digest, path)
    return path, time.perf_counter() - start


def copy_outbox(template: Path, folder: Path) -> Path:
    """A copy of ``template`` in ``folder`` (an outbox run drains and fills its own)."""
    target = folder / "outbox.db"
    shutil.copyfile(template, target)
    # On disk before anything is timed: gigabytes of dirty pages written back during a round
    # would slow its fsyncs, and measure the copy rather than the gateway.
    with target.open("rb+") as f:
        os.fsync(f.fileno())
    return target

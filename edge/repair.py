"""A damaged outbox: tell it apart from a healthy one, and salvage what can still be read.

:func:`inspect` is what ``tern-gateway run`` asks before it opens the outbox (a file that is
not SQLite, or one that fails ``PRAGMA quick_check``, must stop the service with one clear
line, not crash-loop it), and what ``tern-gateway check`` reports.

:func:`repair` (``tern-gateway check --repair``) copies every row it can still read into a
fresh outbox and keeps the damaged file aside, renamed with a UTC timestamp. Rows are read
by rowid range: a range that hits a damaged page fails as a whole, so it is halved until the
unreadable rowids are isolated one by one, and everything around them is kept. Every table
the fresh outbox has is copied, column by column where both files have the column, with the
original ids, so arrival order, batch numbers and node states carry over.

What cannot be salvaged: rows on a page that was overwritten (they are gone from the file),
and everything when the file's first page (its header and schema) is unreadable.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tern.edge.command_store import CommandStore
from tern.edge.outbox import Outbox

log = logging.getLogger(__name__)

#: Rowids read per query when nothing is damaged (bounds the memory a range takes).
WINDOW = 5000


@dataclass
class TableSalvage:
    """What :func:`repair` copied from one table."""

    copied: int = 0
    #: Rowids whose read failed (an upper bound of the rows lost: not every id held a row).
    unreadable_ids: int = 0
    #: Why the table could not be read at all, if it could not.
    error: str | None = None


@dataclass
class RepairReport:
    """The outcome of :func:`repair`."""

    path: Path
    aside: Path
    problem: str
    tables: dict[str, TableSalvage] = field(default_factory=dict)
    #: Why nothing at all could be read, if so.
    error: str | None = None

    @property
    def copied(self) -> int:
        """Rows copied, all tables together."""
        return sum(t.copied for t in self.tables.values())

    def summary(self) -> str:
        """One line for the operator."""
        parts = [f"{name} {t.copied}" + (f" ({t.unreadable_ids} ids unreadable)" if t.unreadable_ids else "")
                 for name, t in self.tables.items() if t.copied or t.unreadable_ids]
        got = ", ".join(parts) if parts else "nothing readable"
        why = f"; {self.error}" if self.error else ""
        return f"salvaged {got} into a fresh {self.path}; the damaged file is kept as {self.aside}{why}"


def inspect(path: str | os.PathLike[str]) -> str | None:
    """None if the outbox at ``path`` is healthy (or does not exist yet), else what is wrong."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        return "not a regular file"
    try:
        conn = sqlite3.connect(str(path), timeout=10)
    except sqlite3.Error as exc:
        return f"cannot open it: {exc}"
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)  # e.g. "file is not a database"
    finally:
        conn.close()
    problems = [r[0] for r in rows if r[0] != "ok"]
    if not problems:
        return None
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"quick_check failed: {problems[0]}{more}"


def repair(path: str | os.PathLike[str], now: float | None = None) -> RepairReport:
    """Salvage every readable row of the outbox at ``path`` into a fresh one at the same path.

    The damaged file (and its ``-wal``/``-shm``) is renamed ``<name>.damaged-<UTC time>``.
    Nothing is renamed until the fresh outbox is complete, so an interrupted repair leaves
    the damaged file where it was and can simply be run again. The gateway must not be
    running (its service stopped) while this runs.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    fresh = path.with_name(f"{path.name}.repairing")
    report = RepairReport(path=path, aside=aside, problem=inspect(path) or "no problem found")
    for leftover in _with_sidecars(fresh):
        leftover.unlink(missing_ok=True)
    Outbox(fresh).close()  # the current schema, empty
    CommandStore(fresh).close()  # and the command tables that share the file

    dst = sqlite3.connect(str(fresh))
    try:
        src = sqlite3.connect(str(path))
        try:
            # Checks each cell's size against its page: turns more damage into an error
            # instead of a wrong row.
            src.execute("PRAGMA cell_size_check=ON")
            src_tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            src_tables = set()
            report.error = f"its schema is unreadable ({exc})"
        for table in [r[0] for r in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]:
            if table in src_tables:
                report.tables[table] = _copy_table(src, dst, table)
        src.close()
        dst.commit()
        check = dst.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":  # pragma: no cover - a fresh file written by us
            raise sqlite3.DatabaseError(f"the fresh outbox failed quick_check: {check}")
    finally:
        dst.close()

    for src_file, dst_file in zip(_with_sidecars(path), _with_sidecars(aside)):
        if src_file.exists():
            src_file.rename(dst_file)
    fresh.rename(path)
    for sidecar in _with_sidecars(fresh)[1:]:
        sidecar.unlink(missing_ok=True)
    log.warning("outbox %s repaired: %s", path, report.summary())
    return report


def _with_sidecars(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _copy_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> TableSalvage:
    out = TableSalvage()
    try:
        dst_cols = [r[1] for r in dst.execute(f'PRAGMA table_info("{table}")')]
        src_cols = {r[1] for r in src.execute(f'PRAGMA table_info("{table}")')}
    except sqlite3.DatabaseError as exc:
        out.error = str(exc)
        return out
    cols = [c for c in dst_cols if c in src_cols]
    bounds = _rowid_bounds(src, table)
    if bounds is None:
        out.error = "no readable rowid bounds"
        return out
    low, high = bounds
    col_list = ", ".join(f'"{c}"' for c in cols)
    insert = f'INSERT OR IGNORE INTO "{table}" (rowid, {col_list}) VALUES ({", ".join("?" * (len(cols) + 1))})'
    select = f'SELECT rowid, {col_list} FROM "{table}" WHERE rowid BETWEEN ? AND ?'
    select_one = f'SELECT rowid, {col_list} FROM "{table}" WHERE rowid = ?'
    for rows in _readable(src, select, select_one, low, high, out):
        before = dst.total_changes
        for row in rows:
            try:
                dst.execute(insert, row)
            except sqlite3.IntegrityError:  # a damaged value (NULL where none may be): not a row
                out.unreadable_ids += 1
        out.copied += dst.total_changes - before
    return out


def _rowid_bounds(src: sqlite3.Connection, table: str) -> tuple[int, int] | None:
    """(min, max) rowid of ``table``: each end from the table's own b-tree (one descent), else
    from any of its indexes (they hold the rowids too); None if neither can be read."""
    ends = []
    for order in ("ASC", "DESC"):
        try:
            row = src.execute(f'SELECT rowid FROM "{table}" NOT INDEXED ORDER BY rowid {order} LIMIT 1').fetchone()
        except sqlite3.DatabaseError:
            row = _rowid_from_indexes(src, table, "min" if order == "ASC" else "max")
            if row is None:
                return None
        if row is None or row[0] is None:
            return (0, -1)  # empty
        ends.append(row[0])
    return ends[0], ends[1]


def _rowid_from_indexes(src: sqlite3.Connection, table: str, func: str) -> tuple[int] | None:
    try:
        indexes = [r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", [table])]
    except sqlite3.DatabaseError:
        return None
    for index in indexes:
        try:
            row = src.execute(f'SELECT {func}(rowid) FROM "{table}" INDEXED BY "{index}"').fetchone()
        except sqlite3.DatabaseError:
            continue
        if row[0] is not None:
            return row
    return None


def _readable(
    src: sqlite3.Connection, select: str, select_one: str, low: int, high: int, out: TableSalvage
) -> Iterator[list[tuple]]:
    """Rows of rowid ranges in [low, high]; a failing range is halved until single rowids.

    A single rowid is read with ``=``, not ``BETWEEN``: a range scan steps past its last row
    to find the end, and that step fails when the next page is the damaged one.
    """
    # A stack of ranges, lowest first on top; windows bound what one fetch holds.
    stack = [(a, min(a + WINDOW - 1, high)) for a in range(low, high + 1, WINDOW)]
    stack.reverse()
    while stack:
        a, b = stack.pop()
        try:
            rows = src.execute(select_one, [a]).fetchall() if a == b else src.execute(select, [a, b]).fetchall()
        except sqlite3.DatabaseError:
            if a == b:
                out.unreadable_ids += 1
            else:
                mid = (a + b) // 2
                stack.extend([(mid + 1, b), (a, mid)])
            continue
        if rows:
            yield rows

"""The ``outbox`` table: pending readings, in arrival order, kept as the JSON text written."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import orjson
import sqlite_utils

from tern.core.codec import Reading, new_reading, reading_item_json
from tern.edge.outbox.schema import OUTBOX


class OutboxRow(NamedTuple):
    """A pending reading with its outbox id (arrival order), as stored: its values stay the
    JSON text the outbox wrote, so a backlog goes into envelopes without parsing them
    (:meth:`item`); :attr:`reading` decodes them."""

    id: int
    site: str
    device: str
    boot: str
    seq: int
    ts_ms: int
    received_ms: int
    values_json: str

    @property
    def reading(self) -> Reading:
        """The reading itself (its values parsed)."""
        return new_reading(self.device, self.boot, self.seq, self.ts_ms, orjson.loads(self.values_json), self.site,
                           self.received_ms)

    def item(self) -> str:
        """Its batch envelope item (:func:`tern.core.codec.reading_item_json`)."""
        return reading_item_json(self.site, self.device, self.boot, self.seq, self.ts_ms, self.received_ms,
                                 self.values_json)


def insert(db: sqlite_utils.Database, readings: Sequence[Reading], stamp: int, first_id: int) -> int:
    """Insert these readings received at ``stamp`` (inside the caller's transaction) with the
    ids ``first_id``, ``first_id + 1``...; how many went in.

    The ids come from the caller's counter, which only grows: SQLite would give a new row the
    highest id in the table plus one, so after the uplink's deleter removed the newest rows a
    new reading could get an id at or below what the uplink had already read past, and be
    skipped or sent out of order. With ids that are never reused the uplink reads while
    deletes run (it used to wait for each delete's fsync: most of the live latency).
    """
    if not readings:
        return 0
    before = db.conn.total_changes
    # OR IGNORE: the UNIQUE identity index turns a redelivery into a no-op (seqtrack
    # already screened them out; this is the second line of defence). One prepared
    # statement and tuples: sqlite-utils' insert_all built a dict and checked every
    # value's type per row, a tenth of the gateway's CPU under a live load.
    db.conn.executemany(
        f'INSERT OR IGNORE INTO {OUTBOX} (id, site, device, boot, seq, ts_ms, received_ms, "values")'
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            # finite values: the codec checked them
            # (decoded values are a dict already: copied only if some other mapping)
            (first_id + i, r.site, r.device, r.boot, r.seq, r.ts_ms, stamp,
             orjson.dumps(v if type(v := r.values) is dict else dict(v)).decode())
            for i, r in enumerate(readings)
        ],
    )
    return db.conn.total_changes - before


def take(db: sqlite_utils.Database, limit: int, after_id: int) -> list[OutboxRow]:
    """The oldest ``limit`` readings with an id above ``after_id``, in arrival order."""
    cursor = db.execute(
        f'SELECT id, site, device, boot, seq, ts_ms, received_ms, "values" FROM {OUTBOX}'
        " WHERE id > ? ORDER BY id LIMIT ?",
        [after_id, limit],
    )
    # As stored, values unparsed: reading the rows back into Reading objects was a
    # quarter of the gateway's time in a backlog drain.
    return list(map(OutboxRow._make, cursor.fetchall()))


#: A reading as the uplink stages it: ``(id, device, received_ms, item)``, ``item`` being its
#: batch envelope item (:func:`tern.core.codec.reading_item_json`). A plain tuple, not a
#: NamedTuple: a tuple of plain str and int values leaves the garbage collector's watch after
#: its first pass, whereas each NamedTuple of a backlog staged and in flight stayed tracked and
#: was traversed again and again (in a drain that cost more than reading the row).
Staged = tuple[int, str, int, str]
#: Positions in a :data:`Staged` row.
ID, DEVICE, RECEIVED_MS, ITEM = range(4)

# The envelope item built by SQLite, in C, from the stored columns: the text
# reading_item_json writes (tests hold the two equal), without a Python call per row.
# json_quote escapes whatever text it is given, so any stored id or boot gives valid JSON;
# %s (not %d) prints a stored integer as its digits and would never turn anything else into 0.
_STAGE_SQL = (
    "SELECT id, device, received_ms, printf('{\"site\":%s,\"dev\":%s,\"boot\":%s,\"seq\":%s,\"ts\":%s,"
    "\"rx\":%s,\"r\":%s}', json_quote(site), json_quote(device), json_quote(boot), seq, ts_ms, received_ms,"
    f' "values") FROM {OUTBOX} WHERE id > ? ORDER BY id LIMIT ?'
)


def take_staged(db: sqlite_utils.Database, limit: int, after_id: int) -> list[Staged]:
    """Like :func:`take`, as :data:`Staged` rows: what the uplink needs of each, its envelope
    item built by SQLite rather than by a Python call per row."""
    return db.conn.execute(_STAGE_SQL, [after_id, limit]).fetchall()

def max_id(db: sqlite_utils.Database) -> int:
    """The highest reading id in the table (0 if it is empty)."""
    return db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {OUTBOX}").fetchone()[0]


def count(db: sqlite_utils.Database) -> int:
    """Readings in the table."""
    return db.execute(f"SELECT COUNT(*) FROM {OUTBOX}").fetchone()[0]


def count_upto(db: sqlite_utils.Database, upto_id: int) -> int:
    """Readings with an id at or below ``upto_id``."""
    return db.execute(f"SELECT COUNT(*) FROM {OUTBOX} WHERE id <= ?", [upto_id]).fetchone()[0]


def per_device(db: sqlite_utils.Database) -> dict[str, int]:
    """Readings in the table per device."""
    return dict(db.execute(f"SELECT device, COUNT(*) FROM {OUTBOX} GROUP BY device").fetchall())


def oldest_received_ms(db: sqlite_utils.Database) -> int | None:
    """Gateway receive time of the oldest reading, or None if there is none."""
    row = db.execute(f"SELECT received_ms FROM {OUTBOX} ORDER BY id LIMIT 1").fetchone()
    return row[0] if row else None

"""The gateway's durable outbox: SQLite (WAL, synchronous=FULL) via sqlite-utils.

Tables:

- ``outbox``: one row per reading, ``id`` is arrival order; ``UNIQUE(device, boot, seq)``
  makes a redelivered reading a no-op while the original is still pending.
- ``status_events``: one row per node status (birth or last will) to forward, ``id`` is
  arrival order.
- ``node_status``: the latest status per (site, device), kept after forwarding: it is what
  de-duplicates re-delivered retained statuses and what node liveness is counted from.
- ``dead_letters``: payloads that broke the contract, kept with the reason, never dropped.
- ``meta``: key/value integers; ``bseq`` is the last batch sequence number handed out.

The outbox is bounded by ``max_rows`` pending rows: readings and status events together (a
status event is a row on the SD card like any other, and one bound keeps one back-pressure
path). It never drops anything to make room: :meth:`Outbox.room` tells ingest how many more
it may accept, and ingest stops acking when that is zero. One :class:`Outbox` is shared by the ingest and uplink threads; a lock
serialises them on one connection (SQLite allows one writer at a time anyway).

:func:`summarize` is the one read path shared by :meth:`Outbox.summary` and
``tern-gateway outbox`` (which opens the file read-only, even while a gateway runs).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import sqlite_utils

from tern.core.codec import Reading, StatusEvent

OUTBOX = "outbox"
STATUS_EVENTS = "status_events"
NODE_STATUS = "node_status"
DEAD_LETTERS = "dead_letters"
META = "meta"

#: Dead letters keep at most this much of a payload (and its full size): an oversized
#: payload is evidence of a fault, not data, and must not be able to fill the SD card.
DEAD_LETTER_PAYLOAD_MAX = 64 * 1024


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every timestamp on the wire."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be accepted as a reading, and why."""

    topic: str
    payload: bytes
    error: str
    received_ms: int = 0


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A pending reading with its outbox id (arrival order)."""

    id: int
    reading: Reading


@dataclass(frozen=True, slots=True)
class StatusRow:
    """A pending status event with its id (arrival order)."""

    id: int
    event: StatusEvent


@dataclass(frozen=True, slots=True)
class AddResult:
    """What one :meth:`Outbox.add` committed."""

    inserted: int
    duplicates: int
    dead_letters: int
    statuses: int = 0
    #: Statuses equal to the device's latest one (a re-delivered retained message): not stored.
    status_duplicates: int = 0


@dataclass(frozen=True)
class OutboxSummary:
    """Counts for monitoring and ``tern-gateway outbox``."""

    pending: int
    dead_letters: int
    oldest_pending_ms: int | None
    last_bseq: int
    #: One entry per device: site, device, pending, first_seq, last_seq, oldest_ms.
    devices: list[dict] = field(default_factory=list)
    #: Status events waiting for the cloud.
    status_pending: int = 0

    def oldest_pending_age_s(self, now: int | None = None) -> float | None:
        """Age in seconds of the oldest pending reading (by gateway receive time)."""
        if self.oldest_pending_ms is None:
            return None
        return max(0.0, ((now if now is not None else now_ms()) - self.oldest_pending_ms) / 1000)


def _connect(path: str | Path, *, readonly: bool = False) -> sqlite_utils.Database:
    if readonly:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    return sqlite_utils.Database(conn, execute_plugins=False)


def open_readonly(path: str | Path) -> sqlite_utils.Database:
    """Open an existing outbox for reading only (it must exist: nothing is created)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no outbox at {path}")
    return _connect(path, readonly=True)


def summarize(db: sqlite_utils.Database) -> OutboxSummary:
    """Count pending readings per device and dead letters in an outbox database."""
    if not db[OUTBOX].exists():
        return OutboxSummary(pending=0, dead_letters=0, oldest_pending_ms=None, last_bseq=0)
    devices = [
        dict(row)
        for row in db.query(
            f"SELECT site, device, COUNT(*) AS pending, MIN(seq) AS first_seq, MAX(seq) AS last_seq,"
            f" MIN(received_ms) AS oldest_ms FROM {OUTBOX} GROUP BY site, device ORDER BY site, device"
        )
    ]
    pending = sum(d["pending"] for d in devices)
    oldest = db.execute(f"SELECT received_ms FROM {OUTBOX} ORDER BY id LIMIT 1").fetchone()
    dead = db.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS}").fetchone()[0] if db[DEAD_LETTERS].exists() else 0
    bseq = db.execute(f"SELECT value FROM {META} WHERE key = 'bseq'").fetchone() if db[META].exists() else None
    # An outbox written by a gateway that predates status forwarding has no such table.
    statuses = db.execute(f"SELECT COUNT(*) FROM {STATUS_EVENTS}").fetchone()[0] if db[STATUS_EVENTS].exists() else 0
    return OutboxSummary(
        pending=pending,
        dead_letters=dead,
        oldest_pending_ms=oldest[0] if oldest else None,
        last_bseq=bseq[0] if bseq else 0,
        devices=devices,
        status_pending=statuses,
    )


class Outbox:
    """The durable, bounded, ordered store between ingest and uplink. Thread-safe."""

    def __init__(self, path: str | Path, max_rows: int = 5_000_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        # Signalled on every add/delete, so ingest (waiting for room) and uplink (waiting
        # for rows) wake at once instead of polling.
        self._changed = threading.Condition(self._lock)
        self.db = _connect(self.path)
        self.db.enable_wal()
        # FULL: the commit is on disk before we PUBACK; NORMAL in WAL mode may lose the
        # last transactions on power loss, which would break the custody rule.
        self.db.execute("PRAGMA synchronous=FULL")
        self._create_schema()
        self._pending = self.db.execute(f"SELECT COUNT(*) FROM {OUTBOX}").fetchone()[0]
        self._status_pending = self.db.execute(f"SELECT COUNT(*) FROM {STATUS_EVENTS}").fetchone()[0]
        self._closed = False

    def _create_schema(self) -> None:
        with self.db.atomic():
            self.db[OUTBOX].create(
                {
                    "id": int,
                    "site": str,
                    "device": str,
                    "boot": str,
                    "seq": int,
                    "ts_ms": int,
                    "received_ms": int,
                    "values": str,
                },
                pk="id",
                not_null={"site", "device", "boot", "seq", "ts_ms", "received_ms", "values"},
                if_not_exists=True,
            )
            self.db[OUTBOX].create_index(
                ["device", "boot", "seq"], index_name="outbox_identity", unique=True, if_not_exists=True
            )
            self.db[STATUS_EVENTS].create(
                {
                    "id": int,
                    "site": str,
                    "device": str,
                    "boot": str,
                    "state": str,
                    "fw": str,
                    "reset": str,
                    "received_ms": int,
                },
                pk="id",
                not_null={"site", "device", "boot", "state", "fw", "reset", "received_ms"},
                if_not_exists=True,
            )
            # Readings a node dropped, per boot (JSON {boot: n}, "" for none); added later,
            # so an older outbox gets the column here.
            if "dropped" not in self.db[STATUS_EVENTS].columns_dict:
                self.db[STATUS_EVENTS].add_column("dropped", str, not_null_default="")
            self.db[NODE_STATUS].create(
                {"site": str, "device": str, "boot": str, "state": str, "received_ms": int},
                pk=("site", "device"),
                not_null={"boot", "state", "received_ms"},
                if_not_exists=True,
            )
            # The latest status's drop report, so a re-delivered retained birth is not told twice.
            if "dropped" not in self.db[NODE_STATUS].columns_dict:
                self.db[NODE_STATUS].add_column("dropped", str, not_null_default="")
            self.db[DEAD_LETTERS].create(
                {"id": int, "received_ms": int, "topic": str, "payload": bytes, "size": int, "error": str},
                pk="id",
                if_not_exists=True,
            )
            self.db[META].create({"key": str, "value": int}, pk="key", if_not_exists=True)

    # --- writes ------------------------------------------------------------------------

    def room(self) -> int:
        """How many more rows (readings or status events) fit before the outbox is full."""
        with self._lock:
            return max(0, self.max_rows - self._pending - self._status_pending)

    def add(
        self,
        readings: Sequence[Reading],
        dead_letters: Sequence[DeadLetter] = (),
        received_ms: int | None = None,
        statuses: Sequence[StatusEvent] = (),
    ) -> AddResult:
        """Commit readings and statuses (stamped ``received_ms``) and dead letters in one durable transaction.

        Readings already pending (same device, boot, seq) are ignored and counted as
        duplicates. A status equal (boot and state) to the latest one committed for its
        device is ignored too: that is a retained message re-delivered on a (re)subscribe,
        or a QoS 1 re-delivery. Comparing with the *latest* rather than with every pending
        one keeps a real flap (online, offline, online again after a reconnect with the same
        boot) whole. The caller checks :meth:`room` first; ``add`` itself never refuses or
        drops, so a caller that ignores the bound overshoots it rather than losing data.
        """
        stamp = now_ms() if received_ms is None else received_ms
        rows = [
            {
                "site": r.site,
                "device": r.device,
                "boot": r.boot,
                "seq": r.seq,
                "ts_ms": r.ts_ms,
                "received_ms": stamp,
                "values": json.dumps(dict(r.values), separators=(",", ":"), ensure_ascii=False),
            }
            for r in readings
        ]
        letters = [
            {
                "received_ms": d.received_ms or stamp,
                "topic": d.topic,
                "payload": bytes(d.payload[:DEAD_LETTER_PAYLOAD_MAX]),
                "size": len(d.payload),
                "error": d.error,
            }
            for d in dead_letters
        ]
        with self._changed:
            before = self.db.conn.total_changes
            with self.db.atomic():
                if rows:
                    # OR IGNORE: the UNIQUE identity index turns a redelivery into a no-op.
                    self.db[OUTBOX].insert_all(rows, ignore=True)
                inserted = self.db.conn.total_changes - before
                status_inserted = self._add_statuses(statuses, stamp)
                if letters:
                    self.db[DEAD_LETTERS].insert_all(letters)
            self._pending += inserted
            self._status_pending += status_inserted
            if inserted or status_inserted:
                self._changed.notify_all()
        return AddResult(
            inserted=inserted,
            duplicates=len(rows) - inserted,
            dead_letters=len(letters),
            statuses=status_inserted,
            status_duplicates=len(statuses) - status_inserted,
        )

    def _add_statuses(self, statuses: Sequence[StatusEvent], stamp: int) -> int:
        """Insert the statuses that change their device's latest one; inside add()'s transaction.

        One at a time, in order: a group may hold several statuses of one device.
        """
        inserted = 0
        for event in statuses:
            dropped = json.dumps(dict(event.dropped)) if event.dropped else ""
            latest = self.db.execute(
                f"SELECT boot, state, dropped FROM {NODE_STATUS} WHERE site = ? AND device = ?", [event.site, event.device]
            ).fetchone()
            # (a status with a new drop report is news even for the same boot and state)
            if latest == (event.boot, event.state, dropped):
                continue
            received = stamp  # like readings: when this gateway committed it
            self.db.execute(
                f"INSERT INTO {STATUS_EVENTS} (site, device, boot, state, fw, reset, received_ms, dropped)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [event.site, event.device, event.boot, event.state, event.fw, event.reset, received, dropped],
            )
            self.db.execute(
                f"INSERT INTO {NODE_STATUS} (site, device, boot, state, received_ms, dropped) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(site, device) DO UPDATE SET boot = excluded.boot, state = excluded.state,"
                " received_ms = excluded.received_ms, dropped = excluded.dropped",
                [event.site, event.device, event.boot, event.state, received, dropped],
            )
            inserted += 1
        return inserted

    def take(self, limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` pending readings in arrival order (they stay until deleted)."""
        with self._lock:
            cursor = self.db.execute(
                f'SELECT id, site, device, boot, seq, ts_ms, received_ms, "values" FROM {OUTBOX} ORDER BY id LIMIT ?',
                [limit],
            )
            return [
                OutboxRow(
                    id=row[0],
                    reading=Reading(
                        site=row[1],
                        device=row[2],
                        boot=row[3],
                        seq=row[4],
                        ts_ms=row[5],
                        received_ms=row[6],
                        values=json.loads(row[7]),
                    ),
                )
                for row in cursor.fetchall()
            ]

    def take_statuses(self, limit: int) -> list[StatusRow]:
        """The oldest ``limit`` pending status events in arrival order (they stay until deleted)."""
        with self._lock:
            cursor = self.db.execute(
                f"SELECT id, site, device, state, boot, fw, reset, received_ms, dropped FROM {STATUS_EVENTS}"
                " ORDER BY id LIMIT ?",
                [limit],
            )
            return [
                StatusRow(
                    id=row[0],
                    event=StatusEvent(
                        site=row[1], device=row[2], state=row[3], boot=row[4], fw=row[5], reset=row[6], received_ms=row[7],
                        dropped=tuple(json.loads(row[8]).items()) if row[8] else (),
                    ),
                )
                for row in cursor.fetchall()
            ]

    def delete(self, ids: Iterable[int], status_ids: Iterable[int] = ()) -> int:
        """Delete exactly these readings and status events (after the cloud confirmed them), in
        one transaction; returns how many readings went."""
        ids, status_ids = list(ids), list(status_ids)
        if not ids and not status_ids:
            return 0
        with self._changed:
            with self.db.atomic():
                deleted = self._delete_chunked(OUTBOX, ids)
                status_deleted = self._delete_chunked(STATUS_EVENTS, status_ids)
            self._pending -= deleted
            self._status_pending -= status_deleted
            self._changed.notify_all()
        return deleted

    def _delete_chunked(self, table: str, ids: list[int]) -> int:
        before = self.db.conn.total_changes
        # Chunked: SQLite limits host parameters per statement.
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            self.db.execute(f"DELETE FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        return self.db.conn.total_changes - before

    def next_bseq(self) -> int:
        """Allocate the next batch sequence number, durably (it only ever increases)."""
        with self._lock:
            with self.db.atomic():
                self.db.execute(
                    f"INSERT INTO {META} (key, value) VALUES ('bseq', 1)"
                    " ON CONFLICT(key) DO UPDATE SET value = value + 1"
                )
                return self.db.execute(f"SELECT value FROM {META} WHERE key = 'bseq'").fetchone()[0]

    # --- waits -------------------------------------------------------------------------

    def wait_for_room(self, timeout: float) -> bool:
        """Block until at least one row fits, or ``timeout`` passes; True if there is room."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._closed or self._pending + self._status_pending < self.max_rows, timeout
            )

    def wait_for_rows(self, timeout: float) -> bool:
        """Block until readings or status events are pending, or ``timeout`` passes; True if any are."""
        with self._changed:
            waiting = lambda: self._pending + self._status_pending > 0  # noqa: E731
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
            counts = dict(self.db.execute(f"SELECT state, COUNT(*) FROM {NODE_STATUS} GROUP BY state").fetchall())
        return {"nodes_online": counts.get("online", 0), "nodes_offline": counts.get("offline", 0)}

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letters``."""
        with self._lock:
            return self.db.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS}").fetchone()[0]

    def oldest_pending_ms(self) -> int | None:
        """Gateway receive time of the oldest pending reading, or None if the outbox is empty."""
        with self._lock:
            row = self.db.execute(f"SELECT received_ms FROM {OUTBOX} ORDER BY id LIMIT 1").fetchone()
            return row[0] if row else None

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
            self.db.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

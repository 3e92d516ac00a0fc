"""Node statuses: ``status_events`` (births and last wills to forward, in arrival order) and
``node_status`` (the latest per device, what re-deliveries are screened against)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Collection, Sequence

import sqlite_utils

from tern.core.codec import OtaReport, StatusEvent
from tern.edge.outbox.schema import NODE_STATUS, STATUS_EVENTS


@dataclass(frozen=True, slots=True)
class StatusRow:
    """A pending status event with its id (arrival order)."""

    id: int
    event: StatusEvent


def insert_changed(db: sqlite_utils.Database, statuses: Sequence[StatusEvent], stamp: int) -> int:
    """Insert the statuses that change their device's latest one; inside add()'s transaction.

    One at a time, in order: a group may hold several statuses of one device.
    """
    inserted = 0
    for event in statuses:
        dropped = json.dumps(dict(event.dropped)) if event.dropped else ""
        down = json.dumps(list(event.down)) if event.down else ""
        ota = json.dumps(event.ota.to_dict()) if event.ota is not None else ""
        latest = db.execute(
            f"SELECT boot, state, dropped, down, ota FROM {NODE_STATUS} WHERE site = ? AND device = ?",
            [event.site, event.device],
        ).fetchone()
        # (a status with a new drop report, or another set of sensors down, is news even
        # for the same boot and state)
        if latest == (event.boot, event.state, dropped, down, ota):
            continue
        received = stamp  # like readings: when this gateway committed it
        db.execute(
            f"INSERT INTO {STATUS_EVENTS} (site, device, boot, state, fw, reset, received_ms, dropped, down, ota)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [event.site, event.device, event.boot, event.state, event.fw, event.reset, received, dropped, down, ota],
        )
        db.execute(
            f"INSERT INTO {NODE_STATUS} (site, device, boot, state, received_ms, dropped, down, ota)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(site, device) DO UPDATE SET boot = excluded.boot, state = excluded.state,"
            " received_ms = excluded.received_ms, dropped = excluded.dropped, down = excluded.down,"
            " ota = excluded.ota",
            [event.site, event.device, event.boot, event.state, received, dropped, down, ota],
        )
        inserted += 1
    return inserted


def take(db: sqlite_utils.Database, limit: int, busy: Collection[str]) -> list[StatusRow]:
    """The oldest ``limit`` pending status events in arrival order, leaving out every event of
    the devices in ``busy``."""
    cursor = db.execute(
        f"SELECT id, site, device, state, boot, fw, reset, received_ms, dropped, down, ota FROM {STATUS_EVENTS}"
        " ORDER BY id"
    )
    # Filtered here rather than in SQL: the busy set may outgrow SQLite's host parameter
    # limit. The scan stops at ``limit`` rows taken (status rows are few: births, wills).
    picked = itertools.islice((row for row in cursor if row[2] not in busy), limit)
    rows = [
        StatusRow(
            id=row[0],
            event=StatusEvent(
                site=row[1], device=row[2], state=row[3], boot=row[4], fw=row[5], reset=row[6], received_ms=row[7],
                dropped=tuple(json.loads(row[8]).items()) if row[8] else (),
                down=tuple(json.loads(row[9])) if row[9] else (),
                ota=OtaReport(**json.loads(row[10])) if row[10] else None,
            ),
        )
        for row in picked
    ]
    cursor.close()  # a scan left unfinished would hold its read snapshot open
    return rows


def count(db: sqlite_utils.Database) -> int:
    """Status events waiting to be forwarded."""
    return db.execute(f"SELECT COUNT(*) FROM {STATUS_EVENTS}").fetchone()[0]


def node_states(db: sqlite_utils.Database) -> dict[str, int]:
    """How many devices' latest status is online, and how many offline."""
    counts = dict(db.execute(f"SELECT state, COUNT(*) FROM {NODE_STATUS} GROUP BY state").fetchall())
    return {"nodes_online": counts.get("online", 0), "nodes_offline": counts.get("offline", 0)}


def online_devices(db: sqlite_utils.Database) -> frozenset[str]:
    """The devices whose latest status is online."""
    return frozenset(r[0] for r in db.execute(f"SELECT device FROM {NODE_STATUS} WHERE state = 'online'").fetchall())

"""A sensor that stops answering is named in the node's status ("down"), not only in its readings.

Gateway side on a real SQLite outbox (storage, de-duplication, the migration of an outbox
written before the column existed, hostile statuses as dead letters); then end to end on the
real firmware (MicroPython unix port) with a simulated PMS5003 on a pty → Pi mosquitto →
gateway → cloud mosquitto → bridge → Kafka (Tansu).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tern.core import codec, topics
from tern.core.codec import StatusEvent
from tern.edge.ingest import decode
from tern.edge.outbox import DeadLetter, Outbox

SITE = "site-dn"


def birth(down: tuple[str, ...] = (), boot: str = "b001", state: str = "online", device: str = "dev-a") -> StatusEvent:
    fw = "0.1.0" if state == "online" else ""
    return StatusEvent(SITE, device, state, boot, fw=fw, reset="PWRON_RESET" if fw else "", down=down)


# --- the outbox --------------------------------------------------------------------------------


def test_outbox_stores_the_sensors_down_and_a_new_set_is_news(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        assert box.add([], statuses=[birth()], received_ms=10).statuses == 1
        # Same boot, same state, a sensor went down: a real change, stored.
        result = box.add([], statuses=[birth(("pms5003",)), birth(("pms5003",))], received_ms=20)
        assert (result.statuses, result.status_duplicates) == (1, 1)  # the second is a re-delivery
        assert box.add([], statuses=[birth(("pms5003", "sht3x"))], received_ms=30).statuses == 1
        assert box.add([], statuses=[birth()], received_ms=40).statuses == 1  # back: news again
        rows = box.take_statuses(10)
        assert [r.event.down for r in rows] == [(), ("pms5003",), ("pms5003", "sht3x"), ()]
        assert rows[1].event == StatusEvent(SITE, "dev-a", "online", "b001", "0.1.0", "PWRON_RESET", 20, (), ("pms5003",))
        box.delete([], [r.id for r in rows])
    with Outbox(path) as box:  # after a restart the latest set still de-duplicates
        assert box.add([], statuses=[birth()]).status_duplicates == 1
        assert box.add([], statuses=[birth(("sht3x",))]).statuses == 1
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT down FROM node_status").fetchall() == [('["sht3x"]',)]
        assert raw.execute("SELECT down FROM status_events").fetchall() == [('["sht3x"]',)]
    finally:
        raw.close()


def _make_old(path: Path, *, without_dropped: bool) -> None:
    """An outbox as an older gateway left it: the same tables without the newer columns,
    with one status waiting to be forwarded and the device's latest status."""
    with Outbox(path) as box:
        box.add([], statuses=[birth(boot="b00a")], received_ms=77)
    db = sqlite3.connect(path)
    try:
        for table in ("status_events", "node_status"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN down")
            if without_dropped:
                db.execute(f"ALTER TABLE {table} DROP COLUMN dropped")
        db.commit()
        columns = {row[1] for row in db.execute("PRAGMA table_info(status_events)")}
        assert "down" not in columns and ("dropped" in columns) != without_dropped
    finally:
        db.close()


@pytest.mark.parametrize("without_dropped", [False, True], ids=["before-down", "before-dropped"])
def test_an_outbox_of_the_old_schema_gets_the_column_and_keeps_its_rows(tmp_path: Path, without_dropped: bool) -> None:
    path = tmp_path / "old.db"
    _make_old(path, without_dropped=without_dropped)
    with Outbox(path) as box:
        # The waiting status survives the migration and reads as "no sensor down".
        rows = box.take_statuses(10)
        assert [r.event for r in rows] == [StatusEvent(SITE, "dev-a", "online", "b00a", "0.1.0", "PWRON_RESET", 77)]
        # The retained birth re-delivered after the upgrade is still the latest one: ignored.
        assert box.add([], statuses=[birth(boot="b00a")]).status_duplicates == 1
        assert box.add([], statuses=[birth(("pms5003",), boot="b00a")], received_ms=90).statuses == 1
        assert [r.event.down for r in box.take_statuses(10)] == [(), ("pms5003",)]
    db = sqlite3.connect(path)
    try:
        for table in ("status_events", "node_status"):
            assert {"down", "dropped"} <= {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    finally:
        db.close()
    with Outbox(path) as box:  # opening again is a no-op for the schema
        assert box.status_pending() == 2


# --- ingest: hostile statuses are dead letters ----------------------------------------------------


def test_ingest_decodes_down_and_dead_letters_hostile_lists() -> None:
    topic = topics.status_topic(SITE, "dev-a")
    ok = {"v": 1, "dev": "dev-a", "state": "online", "boot": "0badc0de", "fw": "0.1.0", "down": ["pms5003"]}
    event = decode(topic, json.dumps(ok).encode(), 5)
    assert isinstance(event, StatusEvent) and event.down == ("pms5003",) and event.site == SITE
    for bad in ([f"s{i}" for i in range(17)], ["x" * 33], "pms5003", [1], [None], ["a b"], {"pms5003": True}):
        letter = decode(topic, json.dumps({**ok, "down": bad}).encode(), 5)
        assert isinstance(letter, DeadLetter) and "'down'" in letter.error, (bad, letter)

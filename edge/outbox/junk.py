"""Retained junk: dead-lettered once, not on every subscribe.

The broker re-delivers every retained message on each subscribe (each reconnect, each
new gateway run), so a junk retained status would become a new dead letter every time.
We remember which (topic, payload) has already been dead-lettered, keyed by topic: the
broker keeps one retained message per topic, so this table is as small as the number
of topics holding junk. Clearing the junk instead (an empty retained publish) is not
ours to do: the gateway's ACL only lets it write node ack topics, and the junk is the
evidence the site engineer needs to find the faulty node.
"""

from __future__ import annotations

import threading
from typing import Iterable

import sqlite_utils

from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.connection import write_tx
from tern.edge.outbox.schema import RETAINED_JUNK


class RetainedJunk:
    """The ``retained_junk`` table, created when first used; ``lock`` serialises the connection."""

    def __init__(self, db: sqlite_utils.Database, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock
        self._ready = False

    def _table(self) -> None:
        if not self._ready:
            self._db[RETAINED_JUNK].create(
                {"topic": str, "digest": str, "first_ms": int, "repeats": int}, pk="topic", if_not_exists=True
            )
            self._ready = True

    def known(self, topic: str, digest: str) -> bool:
        """True if this exact retained (topic, payload digest) is already a dead letter here;
        counts the repeat."""
        with self._lock:
            self._table()
            with write_tx(self._db):
                cur = self._db.execute(
                    f"UPDATE {RETAINED_JUNK} SET repeats = repeats + 1 WHERE topic = ? AND digest = ?", [topic, digest]
                )
            return cur.rowcount > 0

    def remember(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record (topic, payload digest) pairs just dead-lettered."""
        rows = [{"topic": t, "digest": d, "first_ms": now_ms(), "repeats": 0} for t, d in entries]
        if not rows:
            return
        with self._lock:
            self._table()
            with write_tx(self._db):
                self._db[RETAINED_JUNK].upsert_all(rows, pk="topic")

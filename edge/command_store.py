"""The gateway's command store: commands for its nodes and their outcomes, in the outbox file.

Two tables of their own in the outbox's SQLite file, on a connection of their own (WAL mode,
``synchronous=FULL``, like the outbox's):

- ``commands``: one row per command id the gateway ever took (until :meth:`CommandStore.prune`
  forgets finished ones), with when it was delivered and when and how it finished. The id is
  the primary key: a command the bridge publishes again is recognised and not stored twice.
- ``command_outcomes``: what became of each command (``delivered``, ``done``, ``rejected``,
  ``expired``), waiting for the uplink. Like the outbox's drop events, an outcome is handed to
  one batch (its ``bseq``, durably) and deleted only when the cloud confirms that batch; after
  a restart those handed to an unconfirmed batch go to the next one.

A command is committed here *before* the gateway PUBACKs it on the cloud broker, and an
outcome in the same transaction as the state change it reports: a crash never leaves a
command taken but unknown, nor finished without its outcome.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tern.core import commands
from tern.core.commands import Command, Outcome

COMMANDS = "commands"
OUTCOMES = "command_outcomes"
#: The outbox's table of each device's latest status (site, state): where a node lives and
#: whether it is online.
NODE_STATUS = "node_status"

#: Finished commands are remembered (to recognise a re-publish) for this long.
REMEMBER_MS = 24 * 3600 * 1000
#: Unfinished commands looked at per delivery round at most.
SCAN_LIMIT = 1000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {COMMANDS} (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    finished_ms INTEGER,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS commands_unfinished ON {COMMANDS} (finished_ms, received_ms);
CREATE TABLE IF NOT EXISTS {OUTCOMES} (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    device TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    reply TEXT,
    ms INTEGER NOT NULL,
    bseq INTEGER
);
"""


@dataclass(frozen=True, slots=True)
class StoredCommand:
    """An unfinished command as stored: the command and when it was delivered (None: not yet)."""

    command: Command
    received_ms: int
    delivered_ms: int | None


@dataclass(frozen=True, slots=True)
class NodeState:
    """A device's latest status as the outbox knows it."""

    site: str
    state: str
    #: When the gateway committed that status: a newer one means the node (re)connected.
    status_ms: int


def create_tables(db: sqlite3.Connection) -> None:
    """Create the command tables if missing (idempotent; inside the caller's transaction)."""
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def pending_commands(db: Any) -> dict[str, int]:
    """Unfinished commands per device, from an outbox database (any sqlite3 or sqlite-utils
    connection, read-only is enough); {} when the outbox has no command table."""
    try:
        rows = db.execute(
            f"SELECT device, COUNT(*) FROM {COMMANDS} WHERE finished_ms IS NULL GROUP BY device ORDER BY device"
        ).fetchall()
    except sqlite3.Error:
        return {}
    return {device: n for device, n in rows}


class CommandStore:
    """Commands and outcomes in the outbox file. Thread-safe (one lock, one connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a command is on disk before its PUBACK, an outcome before the reply's.
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                create_tables(self._db)
                # Nothing is in flight at open: outcomes handed to an unconfirmed batch of an
                # earlier run go to the next batch.
                self._db.execute(f"UPDATE {OUTCOMES} SET bseq = NULL WHERE bseq IS NOT NULL")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._unclaimed = self._db.execute(f"SELECT COUNT(*) FROM {OUTCOMES}").fetchone()[0]
        self._closed = False

    # --- transactions ----------------------------------------------------------------------

    def _write(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in one durable transaction under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(*args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return result

    def _insert_outcome(self, outcome: Outcome) -> None:
        self._db.execute(
            f"INSERT INTO {OUTCOMES} (id, device, outcome, detail, reply, ms) VALUES (?, ?, ?, ?, ?, ?)",
            [outcome.id, outcome.device, outcome.outcome, outcome.detail[:200],
             json.dumps(dict(outcome.reply), separators=(",", ":")) if outcome.reply is not None else None,
             outcome.ms],
        )
        self._unclaimed += 1

    # --- intake ----------------------------------------------------------------------------

    def accept(self, command: Command, now: int) -> bool:
        """Store ``command``; False (nothing stored) if its id is already known.

        A command already expired on arrival is stored finished, with its ``expired`` outcome.
        """
        def go() -> bool:
            known = self._db.execute(f"SELECT 1 FROM {COMMANDS} WHERE id = ?", [command.id]).fetchone()
            if known:
                return False
            expired = command.expired(now)
            self._db.execute(
                f"INSERT INTO {COMMANDS} (id, device, name, args, expires_ms, received_ms, finished_ms, outcome)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [command.id, command.device, command.name, json.dumps(dict(command.args), separators=(",", ":")),
                 command.expires_ms, now, now if expired else None, commands.EXPIRED if expired else None],
            )
            if expired:
                self._insert_outcome(Outcome(command.id, command.device, commands.EXPIRED,
                                             detail="expired before it reached the gateway", ms=now))
            return True

        return self._write(go)

    def reject(self, command_id: str, device: str, detail: str, now: int) -> None:
        """Record a ``rejected`` outcome for a command that could not be taken at all."""
        self._write(self._insert_outcome, Outcome(command_id, device, commands.REJECTED, detail=detail, ms=now))

    # --- delivery --------------------------------------------------------------------------

    def unfinished(self, limit: int = SCAN_LIMIT) -> list[StoredCommand]:
        """Unfinished commands, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, device, name, args, expires_ms, received_ms, delivered_ms FROM {COMMANDS}"
                " WHERE finished_ms IS NULL ORDER BY received_ms, id LIMIT ?",
                [limit],
            ).fetchall()
        return [
            StoredCommand(Command(r[0], r[1], r[2], json.loads(r[3]), r[4]), r[5], r[6])
            for r in rows
        ]

    def node(self, device: str) -> NodeState | None:
        """``device``'s latest status (the outbox's node_status), None if never seen."""
        with self._lock:
            try:
                row = self._db.execute(
                    f"SELECT site, state, received_ms FROM {NODE_STATUS} WHERE device = ?"
                    " ORDER BY received_ms DESC LIMIT 1",
                    [device],
                ).fetchone()
            except sqlite3.OperationalError:  # the outbox has not created it yet
                return None
        return NodeState(*row) if row else None

    def mark_delivered(self, command: Command, now: int) -> bool:
        """Record the ``delivered`` outcome, once; True if it was recorded now."""
        def go() -> bool:
            cur = self._db.execute(
                f"UPDATE {COMMANDS} SET delivered_ms = ? WHERE id = ? AND delivered_ms IS NULL", [now, command.id]
            )
            if cur.rowcount == 0:
                return False
            self._insert_outcome(Outcome(command.id, command.device, commands.DELIVERED, ms=now))
            return True

        return self._write(go)

    def finish(self, command_id: str, device: str, outcome: str, now: int, *, detail: str = "",
               reply: Mapping[str, Any] | None = None) -> bool:
        """End an unfinished command of ``device`` with ``outcome`` (recording ``delivered``
        first if a reply came before the broker's PUBACK was seen); False if there is no such
        unfinished command (unknown, another device's, or already finished)."""
        def go() -> bool:
            row = self._db.execute(
                f"SELECT delivered_ms FROM {COMMANDS} WHERE id = ? AND device = ? AND finished_ms IS NULL",
                [command_id, device],
            ).fetchone()
            if row is None:
                return False
            if row[0] is None and outcome != commands.EXPIRED:
                self._insert_outcome(Outcome(command_id, device, commands.DELIVERED, ms=now))
            self._db.execute(
                f"UPDATE {COMMANDS} SET finished_ms = ?, outcome = ?, delivered_ms = COALESCE(delivered_ms, ?)"
                " WHERE id = ?",
                [now, outcome, None if outcome == commands.EXPIRED else now, command_id],
            )
            self._insert_outcome(Outcome(command_id, device, outcome, detail=detail, reply=reply, ms=now))
            return True

        return self._write(go)

    def prune(self, now: int) -> int:
        """Forget finished commands older than :data:`REMEMBER_MS`; how many went."""
        def go() -> int:
            return self._db.execute(
                f"DELETE FROM {COMMANDS} WHERE finished_ms IS NOT NULL AND finished_ms < ?", [now - REMEMBER_MS]
            ).rowcount

        return self._write(go)

    # --- outcomes upstream (the uplink) ----------------------------------------------------

    def outcomes_unclaimed(self) -> int:
        """Outcomes waiting for a batch (cached: no query)."""
        with self._lock:
            return self._unclaimed

    def claim_outcomes(self, bseq: int, limit: int) -> list[Outcome]:
        """The outcomes batch ``bseq`` carries: the oldest not yet in a batch, handed to it
        durably; asking again for the same ``bseq`` returns the same ones."""
        def go() -> list[Outcome]:
            self._db.execute(
                f"UPDATE {OUTCOMES} SET bseq = ? WHERE seq IN"
                f" (SELECT seq FROM {OUTCOMES} WHERE bseq IS NULL ORDER BY seq LIMIT ?)",
                [bseq, limit],
            )
            rows = self._db.execute(
                f"SELECT id, device, outcome, detail, reply, ms FROM {OUTCOMES} WHERE bseq = ? ORDER BY seq", [bseq]
            ).fetchall()
            self._unclaimed = self._db.execute(f"SELECT COUNT(*) FROM {OUTCOMES} WHERE bseq IS NULL").fetchone()[0]
            return [Outcome(r[0], r[1], r[2], detail=r[3], reply=json.loads(r[4]) if r[4] else None, ms=r[5])
                    for r in rows]

        return self._write(go)

    def delete_outcomes(self, bseq: int) -> int:
        """Delete the outcomes batch ``bseq`` carried (the cloud confirmed it)."""
        return self._write(lambda: self._db.execute(f"DELETE FROM {OUTCOMES} WHERE bseq = ?", [bseq]).rowcount)

    # --- reads -----------------------------------------------------------------------------

    def pending_by_device(self) -> dict[str, int]:
        """Unfinished commands per device."""
        with self._lock:
            return pending_commands(self._db)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

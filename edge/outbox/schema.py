"""The outbox's tables, created (and older outboxes brought up to date) at open.

- ``outbox``: one row per reading, ``id`` is arrival order; ``UNIQUE(device, boot, seq)``
  makes a redelivered reading a no-op while the original is still pending.
- ``status_events``: one row per node status (birth or last will) to forward, ``id`` is
  arrival order.
- ``node_status``: the latest status per (site, device), kept after forwarding: it is what
  de-duplicates re-delivered retained statuses and what node liveness is counted from.
- ``dead_letters``: payloads that broke the contract, kept with the reason, never dropped. Each
  is forwarded to the cloud once (the ``deadletters/1`` envelope extension): ``bseq`` is the batch
  carrying it (NULL until one does), ``forwarded_ms`` when that batch was confirmed (NULL until
  then). They stay afterwards, as evidence on the Pi for ``tern-gateway outbox``.
- ``meta``: key/value integers; ``bseq`` is the last batch sequence number handed out.
- ``seq_high``, ``seq_gaps``: the highest seq committed per (device, boot) and the missing
  ranges (:mod:`tern.edge.seqtrack`): a re-send of a reading already forwarded is a duplicate.
- ``held_back``, ``hold_events``: devices held back by their share or rate, and the events that
  report it to the cloud (:mod:`tern.edge.shares`; ``holds/1``): claimed by a batch like drop
  events, deleted on its confirm.
- ``retained_junk``: retained junk already dead-lettered (:mod:`tern.edge.outbox.junk`), created
  when the first is seen.
"""

from __future__ import annotations

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import seqtrack
from tern.edge import shares
from tern.edge.outbox.connection import write_tx

OUTBOX = "outbox"
STATUS_EVENTS = "status_events"
NODE_STATUS = "node_status"
DEAD_LETTERS = "dead_letters"
META = "meta"
#: Retained junk already dead-lettered (see Outbox.known_junk).
RETAINED_JUNK = "retained_junk"


def create(db: sqlite_utils.Database) -> None:
    """Create every table the outbox uses, and add to an older outbox the columns it lacks."""
    with write_tx(db):
        db[OUTBOX].create(
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
        db[OUTBOX].create_index(
            ["device", "boot", "seq"], index_name="outbox_identity", unique=True, if_not_exists=True
        )
        db[STATUS_EVENTS].create(
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
        if "dropped" not in db[STATUS_EVENTS].columns_dict:
            db[STATUS_EVENTS].add_column("dropped", str, not_null_default="")
        db[NODE_STATUS].create(
            {"site": str, "device": str, "boot": str, "state": str, "received_ms": int},
            pk=("site", "device"),
            not_null={"boot", "state", "received_ms"},
            if_not_exists=True,
        )
        # The latest status's drop report, so a re-delivered retained birth is not told twice.
        if "dropped" not in db[NODE_STATUS].columns_dict:
            db[NODE_STATUS].add_column("dropped", str, not_null_default="")
        # The node's sensors that are down (JSON list, "" for none), in the event and the
        # latest status (a birth naming another set is news); added later, like "dropped".
        for table in (STATUS_EVENTS, NODE_STATUS):
            if "down" not in db[table].columns_dict:
                db[table].add_column("down", str, not_null_default="")
            # The node's update state (JSON object, "" for none): a fresh birth saying how
            # far a download or a trial got is news for the same boot; added later, likewise.
            if "ota" not in db[table].columns_dict:
                db[table].add_column("ota", str, not_null_default="")
        db[DEAD_LETTERS].create(
            {"id": int, "received_ms": int, "topic": str, "payload": bytes, "size": int, "error": str},
            pk="id",
            if_not_exists=True,
        )
        # Forwarding them (deadletters/1) came later: an older outbox gets the columns here,
        # and its letters are all unsent (NULL), so they go to the cloud too.
        letters = db[DEAD_LETTERS].columns_dict
        if "sha256" not in letters:  # of the whole payload: the row may keep only 64 KiB of it
            db[DEAD_LETTERS].add_column("sha256", str, not_null_default="")
        for column in ("bseq", "forwarded_ms"):
            if column not in letters:
                db[DEAD_LETTERS].add_column(column, int)
        # The unsent are few and the table only grows: finding them must not scan it.
        db.execute(f"CREATE INDEX IF NOT EXISTS dead_letters_unsent ON {DEAD_LETTERS} (bseq, id)"
                   " WHERE forwarded_ms IS NULL")
        db[META].create({"key": str, "value": int}, pk="key", if_not_exists=True)
        seqtrack.create_tables(db)
        rtn.create_tables(db)
        shares.create_tables(db)

"""The gateway's durable outbox: SQLite (WAL, synchronous=FULL) via sqlite-utils.

Its tables are listed (and created, and migrated) in :mod:`tern.edge.outbox.schema`.

The outbox is bounded by its :class:`~tern.edge.retention.RetentionPolicy`: ``max_rows``
pending rows (readings and status events together: a status event is a row on the SD card
like any other), optionally bytes on disk and age. With the default ``block`` policy it never
drops anything to make room: :meth:`Outbox.room` tells ingest how many more it may accept,
and ingest stops acking when that is zero. With ``drop_oldest`` the oldest readings make room
and every drop is counted and reported to the cloud (``drop_counts``, ``drop_events``). Status
events are never dropped. One :class:`Outbox` is shared by the ingest and uplink threads; a lock
serialises them on one connection (SQLite allows one writer at a time anyway).

:func:`summarize` is the one read path shared by :meth:`Outbox.summary` and
``tern-gateway outbox`` (which opens the file read-only, even while a gateway runs).

One job per module:

- :mod:`~tern.edge.outbox.store`: the :class:`Outbox` itself (connection, lock, waits), composed
  of the modules below; :mod:`~tern.edge.outbox.reads` is its read side.
- :mod:`~tern.edge.outbox.schema`: the tables (listed there), created and migrated at open.
- :mod:`~tern.edge.outbox.readings`, :mod:`~tern.edge.outbox.statuses`,
  :mod:`~tern.edge.outbox.dead_letters`, :mod:`~tern.edge.outbox.junk`: one table each.
- :mod:`~tern.edge.outbox.commit`: ingest's one-transaction commit and the sweep;
  :mod:`~tern.edge.outbox.enforce`: the retention policy applied inside them;
  :mod:`~tern.edge.outbox.capacity`: the room left and the shares' snapshot.
- :mod:`~tern.edge.outbox.batches`: batch sequence numbers and what batches claim by them;
  :mod:`~tern.edge.outbox.deleter`: deleting what the cloud confirmed, on its own connection.
- :mod:`~tern.edge.outbox.tally`: the counts kept in memory; :mod:`~tern.edge.outbox.summary`:
  the counts read from the file; :mod:`~tern.edge.outbox.connection`: opening the file, write
  transactions, a full disk; :mod:`~tern.edge.outbox.clock`: :func:`now_ms`.
"""

from __future__ import annotations

from tern.edge.outbox.clock import now_ms
from tern.edge.outbox.commit import AddResult
from tern.edge.outbox.connection import is_disk_full, open_readonly
from tern.edge.outbox.dead_letters import DEAD_LETTER_PAYLOAD_MAX, DeadLetter
from tern.edge.outbox.readings import OutboxRow
from tern.edge.outbox.schema import DEAD_LETTERS, META, NODE_STATUS, OUTBOX, RETAINED_JUNK, STATUS_EVENTS
from tern.edge.outbox.statuses import StatusRow
from tern.edge.outbox.store import Outbox
from tern.edge.outbox.summary import OutboxSummary, summarize

__all__ = [
    "DEAD_LETTERS", "DEAD_LETTER_PAYLOAD_MAX", "META", "NODE_STATUS", "OUTBOX", "RETAINED_JUNK", "STATUS_EVENTS",
    "AddResult", "DeadLetter", "Outbox", "OutboxRow", "OutboxSummary", "StatusRow",
    "is_disk_full", "now_ms", "open_readonly", "summarize",
]

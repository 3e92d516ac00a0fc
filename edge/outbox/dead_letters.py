"""The ``dead_letters`` table: payloads that broke the contract, kept with the reason, each
forwarded to the cloud once (``deadletters/1``) and kept afterwards as evidence on the Pi."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import sqlite_utils

from tern.core.codec import MAX_DEADLETTER_PAYLOAD, MAX_DEADLETTER_TOPIC, GatewayDeadLetter, gateway_dead_letter
from tern.edge.outbox.schema import DEAD_LETTERS

#: Dead letters keep at most this much of a payload (and its full size): an oversized
#: payload is evidence of a fault, not data, and must not be able to fill the SD card.
DEAD_LETTER_PAYLOAD_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be accepted as a reading, and why."""

    topic: str
    payload: bytes
    error: str
    received_ms: int = 0


def insert(db: sqlite_utils.Database, dead_letters: Sequence[DeadLetter], stamp: int) -> int:
    """Store these dead letters (inside the caller's transaction); how many."""
    letters = [
        {
            "received_ms": d.received_ms or stamp,
            "topic": d.topic,
            "payload": bytes(d.payload[:DEAD_LETTER_PAYLOAD_MAX]),
            "size": len(d.payload),
            "error": d.error,
            # Now, while the whole payload is at hand: the row keeps at most 64 KiB of it.
            "sha256": hashlib.sha256(d.payload).hexdigest(),
        }
        for d in dead_letters
    ]
    if letters:
        db[DEAD_LETTERS].insert_all(letters)
    return len(letters)


def claim(db: sqlite_utils.Database, bseq: int, limit: int) -> list[tuple]:
    """Hand batch ``bseq`` the oldest unsent letters not yet in a batch, up to ``limit`` in it
    (inside the caller's transaction); the rows it carries, cut to what travels."""
    db.execute(
        f"UPDATE {DEAD_LETTERS} SET bseq = ? WHERE id IN"
        f" (SELECT id FROM {DEAD_LETTERS} WHERE forwarded_ms IS NULL AND bseq IS NULL ORDER BY id LIMIT"
        f"  MAX(0, ? - (SELECT COUNT(*) FROM {DEAD_LETTERS} WHERE forwarded_ms IS NULL AND bseq = ?)))",
        [bseq, limit, bseq],
    )
    # Only what travels is read: a letter keeps up to 64 KiB and a topic 65,000 characters.
    return db.execute(
        f"SELECT id, substr(topic, 1, ?), length(topic), error, substr(payload, 1, ?), size, sha256,"
        f" received_ms, length(payload) FROM {DEAD_LETTERS}"
        " WHERE forwarded_ms IS NULL AND bseq = ? ORDER BY id",
        [MAX_DEADLETTER_TOPIC, MAX_DEADLETTER_PAYLOAD, bseq],
    ).fetchall()


def as_sent(rows: Sequence[tuple]) -> list[GatewayDeadLetter]:
    """The claimed rows (:func:`claim`) as the ``deadletters/1`` extension carries them."""
    out = []
    for id_, topic, topic_len, error, payload, size, digest, received, stored in rows:
        payload = bytes(payload or b"")
        if not digest and stored == size == len(payload):
            # A letter stored before digests were kept, small enough to be whole here.
            digest = hashlib.sha256(payload).hexdigest()
        out.append(gateway_dead_letter(id_, topic or "", error or "", payload, received or 0, size=size or 0,
                                       topic_len=topic_len or 0, sha256=digest or ""))
    return out


def mark_forwarded(db: sqlite_utils.Database, bseq: int, stamp: int) -> None:
    """Mark the letters batch ``bseq`` carried as forwarded (inside the caller's transaction)."""
    db.execute(f"UPDATE {DEAD_LETTERS} SET forwarded_ms = ? WHERE bseq = ? AND forwarded_ms IS NULL",
               [stamp, bseq])


def count(db: sqlite_utils.Database) -> int:
    """Rows in ``dead_letters``."""
    return db.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS}").fetchone()[0]


def count_unclaimed(db: sqlite_utils.Database) -> int:
    """Letters not forwarded and in no batch yet."""
    return db.execute(
        f"SELECT COUNT(*) FROM {DEAD_LETTERS} WHERE forwarded_ms IS NULL AND bseq IS NULL").fetchone()[0]


def count_unsent(db: sqlite_utils.Database) -> int:
    """Letters the cloud has not confirmed yet."""
    return db.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS} WHERE forwarded_ms IS NULL").fetchone()[0]

"""Per-device shares of the outbox and of the ingest: one node cannot starve the site.

**Shares of the outbox.** The bound (``max_rows``, or the rows ``max_bytes`` leaves room for)
is divided among the devices *in the site*: those with readings waiting plus those whose latest
status is ``online``. A device's share is ``max(floor, (capacity - reserve) / devices)``, never
more than ``device_share_cap``. Below the last tenth of the bound (the *reserve*) any device may
add; inside it only a device within its share may, so the reserve is left for the others. A
device alone in the site keeps the whole bound (there is nobody to starve) and stalls the
ingest at the bound as before: the Pi broker's session holds the rest.

- ``block``: a device over its share is *held back* (see below), never the others.
- ``drop_oldest``: nobody is held back for the bound; over it, the device holding the most
  rows loses its oldest readings (:func:`trim_order`), never the others.

Node statuses are exempt: they only need a free row.

**Held back, custody kept.** Not acknowledging a held-back device's messages would fill the Pi
broker's single in-flight window of the gateway's session with them and stall every device.
So ingest PUBACKs them to the broker *without committing them and without the node ack*: the
node still holds them (its ring and spill) and sends them again. From the first reading held
(``from_seq``) every later reading of that ``(device, boot)`` is held too, so the node ack (which
says "everything up to seq is committed") never passes a reading the gateway does not have.
The hold lifts when the node sends again from at or before a reading already held (its seqs
step back: a reconnect, or the resend hint below) and the device is within its share, or when
the node's birth arrives (after a reconnect it sends everything it still holds; what its ring
could not keep is counted in that birth). Not the retained birth the broker replays when the
gateway subscribes again: that node did not reconnect, and lifting its hold would let its next
reading be committed past the hole. Holds are stored in the outbox (table
``held_back``), in the transaction that precedes the PUBACKs, so a gateway restart keeps them.

**Reported to the cloud.** In that same transaction every reading held back is counted in a
*hold event* (table ``hold_events``): one per ``(site, device, boot, reason)`` while no batch has
taken it (later holds add to it), marked ``lifted`` when the hold lifts. The uplink hands events
to a batch (the ``holds/1`` envelope extension, at most 1000 per batch; a re-send carries exactly
the same ones); only that batch's confirm deletes them. Past :data:`MAX_HOLD_EVENTS` (a node
rebooting in a loop while held makes one per boot) a device's new holds are added to its newest
waiting event: the table stops growing, the counts stay exact. The bridge writes them to the
status topic as ``tern.hold/1`` records. A hold is not a loss: the node keeps the readings and
sends them again.

While a held device would be admitted again, ingest repeats the node ack of the last reading
committed before the hole (:data:`HINT_EVERY_S` apart): firmware that sees an ack equal to its
last one while it has sent beyond it sends again from there (older firmware ignores it and
sends again at its next reconnect).

**Ingest rate.** ``device_rate_limit`` (``"50 readings/s"``, off by default) gives each device a
token bucket of one second's worth; a device above it is held back the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import sqlite_utils

from tern.core.codec import HoldEvent
from tern.edge.ratelimit import READINGS, Rate, RateLimitError, parse_rate

HELD_BACK = "held_back"
HOLD_EVENTS = "hold_events"

#: Inside this part of the bound only devices within their share may add.
RESERVE_FRACTION = 10
#: Hold events the outbox keeps at most (about 1 MB) before a device's new ones are folded into
#: its newest waiting event: a node rebooting in a loop while held makes one event per boot,
#: and the cloud link may be down for days.
MAX_HOLD_EVENTS = 10_000
#: Seconds between two resend hints to one held device.
HINT_EVERY_S = 2.0

#: Why a device is held back.
SHARE = "share"
CAP = "cap"
RATE = "rate"
HOLD_REASONS = (SHARE, CAP, RATE)

#: Verdicts of :meth:`Admission.admit`.
ADMIT = "admit"
FULL = "full"  # no room for anyone: stall, as without shares


def default_floor(max_rows: int) -> int:
    """The floor when none is configured: a hundredth of the bound (at least 1 row)."""
    return max(1, max_rows // 100)


def parse_device_rate(text: str) -> Rate:
    """``"50 readings/s"`` -> :class:`Rate` (readings only: a node's rate is counted in readings)."""
    rate = parse_rate(text)
    if rate.unit != READINGS:
        raise RateLimitError(f"expected '<positive number> readings/s', found {text!r}")
    return rate


def fair_share(capacity: int, devices: int, floor: int, cap: int | None = None) -> int:
    """Rows one device may hold near the bound when ``devices`` share ``capacity``."""
    reserve = capacity // RESERVE_FRACTION if devices > 1 else 0
    share = max(floor, (capacity - reserve) // max(1, devices))
    return min(share, cap) if cap is not None else share


@dataclass
class Admission:
    """Which device may add rows now: a snapshot of the outbox taken once per ingest group and
    updated as the group's readings are admitted (the caller commits them together).

    ``counts`` are rows waiting per device, ``used`` every row waiting (statuses included),
    ``capacity`` the bound in rows, ``online`` the devices whose latest status is online.
    """

    counts: dict[str, int]
    used: int
    capacity: int
    floor: int
    cap: int | None = None
    online: frozenset[str] = frozenset()
    drops_oldest: bool = False
    #: Rows retention may drop to make room (``drop_oldest`` only).
    droppable: int = 0
    #: Rows admitted through this snapshot so far.
    admitted: int = 0

    def devices(self, device: str | None = None) -> int:
        """Devices in the site: readings waiting or online (plus ``device``)."""
        present = {d for d, n in self.counts.items() if n > 0} | set(self.online)
        if device is not None:
            present.add(device)
        return max(1, len(present))

    def share(self, device: str) -> int:
        """``device``'s share of the bound now."""
        return fair_share(self.capacity, self.devices(device), self.floor, self.cap)

    def admit(self, device: str, rows: int = 1) -> str:
        """:data:`ADMIT` (and counted), :data:`SHARE` or :data:`CAP` (hold the device back), or
        :data:`FULL` (no room for anyone: the caller stalls as it would without shares)."""
        held = self.counts.get(device, 0)
        if self.cap is not None and held + rows > self.cap and not self.drops_oldest:
            return CAP
        # With drop_oldest, rows no batch in flight holds can make room (the over-share device's,
        # see trim_step); when the cloud link is down they may all be in flight, and then the
        # shares hold back whoever is over, as with block.
        used = self.used - (self.droppable if self.drops_oldest else 0)
        room = self.capacity - used
        # Shares only bind near the bound: far from it, no device is held back, and the set of
        # devices present (a pass over every device) is not built for each message.
        near = used + rows > self.capacity - self.capacity // RESERVE_FRACTION or rows > room
        if near and self.devices(device) > 1 and held + rows > self.share(device):
            return SHARE
        # A bundle larger than the room goes alone into a group that has room at all
        # (overshooting the bound a little rather than never fitting), as without shares.
        if rows > room and (room <= 0 or self.admitted > 0):
            return FULL
        self.counts[device] = held + rows
        self.used += rows
        self.admitted += rows
        if self.drops_oldest:
            self.droppable += rows
        return ADMIT

    def sure_room(self) -> int:
        """Rows that may be admitted now, whoever's, with :meth:`admit` certain to say
        :data:`ADMIT` to each: below the reserve, where no share binds, and no per-device cap.
        The caller may skip asking for them, and counts them with :meth:`count_admitted`
        before it asks anything else."""
        if self.cap is not None:
            return 0
        return max(0, self.capacity - self.capacity // RESERVE_FRACTION - self.used)

    def count_admitted(self, devices: list[str]) -> None:
        """Count one row admitted for each of ``devices`` (as :meth:`admit` would have), within
        the :meth:`sure_room` taken before."""
        if not devices:
            return
        counts = self.counts
        for device, rows in Counter(devices).items():
            counts[device] = counts.get(device, 0) + rows
        self.used += len(devices)
        self.admitted += len(devices)
        if self.drops_oldest:
            self.droppable += len(devices)

    def admit_status(self) -> bool:
        """A status needs one free row (or one droppable), whatever any share."""
        room = self.capacity - self.used + (self.droppable if self.drops_oldest else 0)
        if room < 1:
            return False
        self.used += 1
        self.admitted += 1
        return True


def trim_order(counts: dict[str, int]) -> list[str]:
    """Devices in the order ``drop_oldest`` trims them: most rows first (ties by name)."""
    return [d for d, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n > 0]


def trim_step(counts: dict[str, int], over: int) -> tuple[str, int] | None:
    """The device to trim next and how many of its oldest rows: the one holding the most, down
    to one below the runner-up (so whoever holds the most is always the one trimmed)."""
    order = trim_order(counts)
    if not order or over <= 0:
        return None
    top = order[0]
    second = counts[order[1]] if len(order) > 1 else 0
    return top, max(1, min(over, counts[top] - second))


# --- holds ------------------------------------------------------------------------------------


@dataclass
class Hold:
    """One ``(site, device, boot)`` held back from ``from_seq`` on."""

    site: str
    device: str
    boot: str
    from_seq: int
    reason: str
    #: The highest seq held: a seq at or below it means the node is sending again.
    max_seq: int
    since: float = field(default_factory=time.monotonic)
    hinted_at: float = float("-inf")
    #: Wall-clock ms the hold started (what the cloud is told; ``since`` is for intervals).
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.site, self.device, self.boot)


def create_tables(db: sqlite_utils.Database) -> None:
    """The holds and hold events tables (inside the caller's transaction)."""
    db[HELD_BACK].create(
        {"site": str, "device": str, "boot": str, "from_seq": int, "max_seq": int, "reason": str},
        pk=("site", "device", "boot"),
        not_null={"from_seq", "max_seq", "reason"},
        if_not_exists=True,
    )
    # Added with the holds/1 extension: a hold stored before it reports 0 (unknown) as its start.
    if "started_ms" not in db[HELD_BACK].columns_dict:
        db[HELD_BACK].add_column("started_ms", int, not_null_default=0)
    db[HOLD_EVENTS].create(
        {
            "id": int,
            "site": str,
            "device": str,
            "boot": str,
            "reason": str,
            "first_seq": int,
            "count": int,
            "since_ms": int,
            "at_ms": int,
            "lifted": int,
            # The batch carrying it; NULL until the uplink hands it to one.
            "bseq": int,
        },
        pk="id",
        not_null={"site", "device", "boot", "reason", "first_seq", "count", "since_ms", "at_ms", "lifted"},
        if_not_exists=True,
    )


def load_holds(db: sqlite_utils.Database) -> list[Hold]:
    """Every hold stored."""
    if not db[HELD_BACK].exists():
        return []
    rows = db.execute(f"SELECT site, device, boot, from_seq, max_seq, reason, started_ms FROM {HELD_BACK}").fetchall()
    return [Hold(site, device, boot, from_seq, reason, max_seq, started_ms=started)
            for site, device, boot, from_seq, max_seq, reason, started in rows]


#: Readings held back in one commit, per (site, device, boot, reason): [count, lowest seq].
HeldCounts = dict[tuple[str, str, str, str], list[int]]


def save_holds(db: sqlite_utils.Database, holds: Iterable[Hold], released: Iterable[tuple[str, str, str]],
               held: HeldCounts | None = None, stamp: int | None = None) -> int:
    """Store new or changed holds, delete released ones, and record the hold events of both
    (``held``: what this commit held back), inside the caller's transaction: the events share
    the custody of the holds. Returns the events recorded or changed."""
    stamp = time.time_ns() // 1_000_000 if stamp is None else stamp
    holds = list(holds)
    # A hold stored before started_ms existed has 0 (unknown): its events start now, not in 1970.
    starts = {h.key: h.started_ms or stamp for h in holds}
    changed = 0
    for (site, device, boot, reason), (n, first) in (held or {}).items():
        changed += _note_held(db, site, device, boot, reason, first, n, starts.get((site, device, boot), stamp), stamp)
    for key in released:
        stored = db.execute(
            f"SELECT reason, from_seq, started_ms FROM {HELD_BACK} WHERE site = ? AND device = ? AND boot = ?", list(key)
        ).fetchone()
        db.execute(f"DELETE FROM {HELD_BACK} WHERE site = ? AND device = ? AND boot = ?", list(key))
        changed += _note_lifted(db, key, stored, stamp)
    for h in holds:
        db.execute(
            f"INSERT INTO {HELD_BACK} (site, device, boot, from_seq, max_seq, reason, started_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(site, device, boot) DO UPDATE SET from_seq = excluded.from_seq,"
            " max_seq = excluded.max_seq, reason = excluded.reason",
            [h.site, h.device, h.boot, h.from_seq, h.max_seq, h.reason, h.started_ms],
        )
    return changed


def _note_held(db: sqlite_utils.Database, site: str, device: str, boot: str, reason: str, first: int, n: int,
               since: int, stamp: int) -> int:
    # One event per (site, device, boot, reason) while no batch has taken it: a runaway held
    # for hours makes one row, not one per message. A batch in flight carries exactly what its
    # event said when it was taken, so what is held after that goes to a new event.
    cur = db.execute(
        f"UPDATE {HOLD_EVENTS} SET count = count + ?, first_seq = MIN(first_seq, ?), since_ms = MIN(since_ms, ?),"
        f" at_ms = MAX(at_ms, ?), lifted = 0"
        f" WHERE id = (SELECT id FROM {HOLD_EVENTS} WHERE bseq IS NULL AND site = ? AND device = ? AND boot = ?"
        f" AND reason = ? ORDER BY id DESC LIMIT 1)",
        [n, first, since, stamp, site, device, boot, reason],
    )
    if cur.rowcount == 0 and not (_full(db) and _fold(db, site, device, n, since, stamp, lifted=False)):
        db.execute(
            f"INSERT INTO {HOLD_EVENTS} (site, device, boot, reason, first_seq, count, since_ms, at_ms, lifted)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
            [site, device, boot, reason, first, n, min(since, stamp), stamp],
        )
    return 1


def _full(db: sqlite_utils.Database) -> bool:
    return db.execute(f"SELECT COUNT(*) >= ? FROM {HOLD_EVENTS}", [MAX_HOLD_EVENTS]).fetchone()[0] == 1


def _fold(db: sqlite_utils.Database, site: str, device: str, n: int, since: int, stamp: int, *, lifted: bool) -> bool:
    """With :data:`MAX_HOLD_EVENTS` reached, add to the device's newest event no batch has taken
    (its boot, reason and first seq stay): the count stays exact, only the detail coarsens.
    False if the device has none (then it gets one: the table grows by at most one per device)."""
    cur = db.execute(
        f"UPDATE {HOLD_EVENTS} SET count = count + ?, since_ms = MIN(since_ms, ?), at_ms = MAX(at_ms, ?), lifted = ?"
        f" WHERE id = (SELECT id FROM {HOLD_EVENTS} WHERE bseq IS NULL AND site = ? AND device = ?"
        f" ORDER BY id DESC LIMIT 1)",
        [n, since, stamp, int(lifted), site, device],
    )
    return cur.rowcount > 0


def _note_lifted(db: sqlite_utils.Database, key: tuple[str, str, str], stored: tuple | None, stamp: int) -> int:
    """Say that the hold of ``key`` lifted: on its events no batch has taken yet, or else (every
    event of a stored hold already went) in an event of its own with nothing held (n = 0)."""
    cur = db.execute(
        f"UPDATE {HOLD_EVENTS} SET lifted = 1, at_ms = MAX(at_ms, ?)"
        " WHERE bseq IS NULL AND site = ? AND device = ? AND boot = ?",
        [stamp, *key],
    )
    if cur.rowcount or stored is None:
        return cur.rowcount
    reason, first, started = stored
    since = started if started else stamp  # a hold stored before started_ms existed
    if _full(db) and _fold(db, key[0], key[1], 0, since, stamp, lifted=True):
        return 1
    db.execute(
        f"INSERT INTO {HOLD_EVENTS} (site, device, boot, reason, first_seq, count, since_ms, at_ms, lifted)"
        " VALUES (?, ?, ?, ?, ?, 0, ?, ?, 1)",
        [*key, reason, first, min(since, stamp), stamp],
    )
    return 1


def claim_events(db: sqlite_utils.Database, bseq: int, limit: int) -> list[HoldEvent]:
    """Hand the oldest unclaimed hold events (at most ``limit``) to batch ``bseq`` and return them.

    A batch that already carries events gets exactly those again, never more: its payload was
    fixed when it was first sent (re-sends repeat those bytes) and its confirm deletes every event
    claimed by its ``bseq``, so one claimed later would be deleted without ever being sent.
    """
    carried = _events_of(db, bseq)
    if carried:
        return carried
    db.execute(
        f"UPDATE {HOLD_EVENTS} SET bseq = ? WHERE id IN"
        f" (SELECT id FROM {HOLD_EVENTS} WHERE bseq IS NULL ORDER BY id LIMIT ?)",
        [bseq, limit],
    )
    return _events_of(db, bseq)


def _events_of(db: sqlite_utils.Database, bseq: int) -> list[HoldEvent]:
    rows = db.execute(
        f"SELECT site, device, boot, reason, first_seq, count, since_ms, at_ms, lifted FROM {HOLD_EVENTS}"
        " WHERE bseq = ? ORDER BY id",
        [bseq],
    ).fetchall()
    return [HoldEvent(*row[:8], lifted=bool(row[8])) for row in rows]


def unclaimed_events(db: sqlite_utils.Database) -> int:
    """Hold events not yet handed to a batch."""
    return db.execute(f"SELECT COUNT(*) FROM {HOLD_EVENTS} WHERE bseq IS NULL").fetchone()[0]


class DeviceRates:
    """One token bucket per device (one second's worth, refilled at ``rate``): a device may send
    while its bucket is above zero, and a message may take it below (a bundle is never split).
    Only the ingest worker uses it. Buckets of devices idle long enough to be full again are
    forgotten, so memory stays bounded by the devices sending now."""

    def __init__(self, rate: Rate, max_devices: int = 10_000) -> None:
        self.rate = rate
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, stamp)

    def _tokens(self, device: str, now: float) -> float:
        tokens, stamp = self._buckets.get(device, (self.rate.per_second, now))
        return min(self.rate.per_second, tokens + (now - stamp) * self.rate.per_second)

    def allows(self, device: str, now: float) -> bool:
        """True if ``device`` may send now."""
        return self._tokens(device, now) > 0

    def take(self, device: str, n: int, now: float) -> None:
        """``device`` sent ``n`` readings now."""
        tokens = self._tokens(device, now) - n
        if device not in self._buckets and len(self._buckets) >= self.max_devices:
            self._forget_full(now)
        self._buckets[device] = (tokens, now)

    def _forget_full(self, now: float) -> None:
        for device in [d for d in self._buckets if self._tokens(d, now) >= self.rate.per_second]:
            del self._buckets[device]
        while len(self._buckets) >= self.max_devices:  # all busy: the oldest entry goes
            self._buckets.pop(next(iter(self._buckets)))

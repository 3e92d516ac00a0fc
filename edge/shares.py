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
could not keep is counted in that birth). Holds are stored in the outbox (table
``held_back``), in the transaction that precedes the PUBACKs, so a gateway restart keeps them.

While a held device would be admitted again, ingest repeats the node ack of the last reading
committed before the hole (:data:`HINT_EVERY_S` apart): firmware that sees an ack equal to its
last one while it has sent beyond it sends again from there (older firmware ignores it and
sends again at its next reconnect).

**Ingest rate.** ``device_rate_limit`` (``"50 readings/s"``, off by default) gives each device a
token bucket of one second's worth; a device above it is held back the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import sqlite_utils

from tern.edge.ratelimit import READINGS, Rate, RateLimitError, parse_rate

HELD_BACK = "held_back"

#: Inside this part of the bound only devices within their share may add.
RESERVE_FRACTION = 10
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

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.site, self.device, self.boot)


def create_tables(db: sqlite_utils.Database) -> None:
    """The holds table (inside the caller's transaction)."""
    db[HELD_BACK].create(
        {"site": str, "device": str, "boot": str, "from_seq": int, "max_seq": int, "reason": str},
        pk=("site", "device", "boot"),
        not_null={"from_seq", "max_seq", "reason"},
        if_not_exists=True,
    )


def load_holds(db: sqlite_utils.Database) -> list[Hold]:
    """Every hold stored."""
    if not db[HELD_BACK].exists():
        return []
    rows = db.execute(f"SELECT site, device, boot, from_seq, max_seq, reason FROM {HELD_BACK}").fetchall()
    return [Hold(site, device, boot, from_seq, reason, max_seq) for site, device, boot, from_seq, max_seq, reason in rows]


def save_holds(db: sqlite_utils.Database, holds: Iterable[Hold], released: Iterable[tuple[str, str, str]]) -> None:
    """Store new or changed holds and delete released ones (inside the caller's transaction)."""
    for key in released:
        db.execute(f"DELETE FROM {HELD_BACK} WHERE site = ? AND device = ? AND boot = ?", list(key))
    for h in holds:
        db.execute(
            f"INSERT INTO {HELD_BACK} (site, device, boot, from_seq, max_seq, reason) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(site, device, boot) DO UPDATE SET from_seq = excluded.from_seq,"
            " max_seq = excluded.max_seq, reason = excluded.reason",
            [h.site, h.device, h.boot, h.from_seq, h.max_seq, h.reason],
        )


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

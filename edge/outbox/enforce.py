"""Applying the retention policy inside a write: which readings go, and whose."""

from __future__ import annotations

from typing import Callable

import sqlite_utils

from tern.edge import retention as rtn
from tern.edge import shares
from tern.edge.outbox.schema import OUTBOX
from tern.edge.outbox.tally import Tally
from tern.edge.retention import RetentionPolicy


def enforce(db: sqlite_utils.Database, policy: RetentionPolicy, device_cap: int | None, tally: Tally,
            pending: int, status_pending: int, stamp: int, counts: dict[str, int]) -> dict[str, int]:
    """Drop readings as the retention policy says, inside the caller's transaction; returns
    how many went per reason. ``pending`` counts the transaction's own inserts, and so do
    ``counts`` (readings per device), which the drops are taken off. Readings up to
    ``tally.taken_upto`` (in a batch in flight) are never dropped; every drop bumps
    ``tally.drop_generation``."""
    dropped: dict[str, int] = {}

    def drop(reason: str, count: int, cutoff_ms: int | None = None, device: str | None = None) -> int:
        gone: dict[str, int] = {}
        n = rtn.drop_oldest(db, OUTBOX, count, tally.taken_upto, reason, stamp, cutoff_ms, device, gone)
        for d, k in gone.items():
            counts[d] = counts.get(d, 0) - k
        if n:
            dropped[reason] = dropped.get(reason, 0) + n
            tally.drop_generation += 1
        return n

    def trim(reason: str, over: int) -> int:
        """Drop ``over`` readings, always of the device holding the most, and only of devices
        over an even share of the bound (their oldest that no batch in flight holds): a
        runaway loses its own readings, never the others'. Only when every droppable row
        of those devices is in a batch in flight do the others give way, most-holding first:
        the bound is the SD card's, and it holds."""
        waiting = {d: n for d, n in counts.items() if n > 0}
        # What the bound leaves, evenly divided: the device holding the most is always above.
        even = max(0, sum(waiting.values()) - over) // max(1, len(waiting))
        gone = 0
        for floor in (even, 0):
            candidates = {d: n - floor for d, n in counts.items() if n > floor}
            for _ in range(10_000):  # each step drops at least one row; bounded anyway
                step = shares.trim_step(candidates, over - gone)
                if step is None:
                    break
                device, n = step
                k = drop(reason, min(n, candidates[device]), device=device)
                if k == 0:  # all of it is in a batch in flight: the next device in line
                    candidates.pop(device)
                    continue
                candidates[device] -= k
                if candidates[device] <= 0:
                    candidates.pop(device)
                gone += k
            if gone >= over:
                break
        return gone

    _steps(db, policy, device_cap, pending, status_pending, stamp, dropped, drop, trim, counts)
    return dropped


def _steps(db: sqlite_utils.Database, policy: RetentionPolicy, device_cap: int | None, pending: int,
           status_pending: int, stamp: int, dropped: dict[str, int], drop: Callable[..., int],
           trim: Callable[[str, int], int], counts: dict[str, int]) -> None:
    if policy.max_age_s is not None:
        cutoff = stamp - int(policy.max_age_s * 1000)
        while drop(rtn.MAX_AGE, rtn.DROP_STEP_MAX, cutoff) == rtn.DROP_STEP_MAX:
            pass
    if not policy.drops_oldest:
        return
    over = pending - sum(dropped.values()) + status_pending - policy.max_rows
    if over > 0:
        trim(rtn.MAX_ROWS, over)
    if device_cap is not None:
        for device, n in sorted(counts.items()):
            if n > device_cap:
                drop(rtn.MAX_ROWS, n - device_cap, device=device)
    if policy.max_bytes is not None:
        for _ in range(100):  # each step frees at least a page's worth; bounded anyway
            excess = rtn.used_bytes(db) - policy.max_bytes
            if excess <= 0:
                break
            rows = rtn.rows_for_bytes(excess, rtn.row_bytes_estimate(db, OUTBOX))
            if not trim(rtn.MAX_BYTES, min(rtn.DROP_STEP_MAX, max(1, rows))):
                break

"""The gateway's health, collected once for /metrics, /status.json, the status page and
``tern-gateway status``.

Where each fact comes from:

- devices: online/offline, boot and the time of the latest status from the outbox's
  ``node_status`` table (durable: it survives restarts); firmware, reset cause, last reading
  and readings since start from :class:`ObservedOutbox`, which notes what every commit
  carried (in memory: after a restart a device's firmware is known again with its retained
  birth, which the broker re-delivers on subscribe);
- duplicates, sequence gaps and drops per device: from the outbox's sequence tracking and
  retention tables (``Outbox.device_seq_counts``, ``dedup_totals``, ``drop_counts``,
  ``drop_totals``), read through :func:`_optional` so that an outbox without them shows
  "unknown" instead of failing;
- the outbox: depth from the gateway's counters, bytes from the files on disk (database and
  WAL), drain rate and time to empty from samples taken once a second (:meth:`Health.sample`);
- the uplink: connection, batches in flight and the last confirm round-trip time;
- commands: unfinished ones per device, from the command desk (:mod:`tern.edge.commands`).

Nothing here holds a secret: broker addresses are HOST:PORT, never credentials.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tern.core.codec import Reading, StatusEvent
from tern.edge.outbox import NODE_STATUS, STATUS_EVENTS, AddResult, Outbox, now_ms, open_readonly

if TYPE_CHECKING:
    from tern.edge.service import Gateway

#: Drain rate and time to empty are measured over the last this-many seconds: long enough to
#: smooth batch-by-batch steps, short enough to follow a drain that has just begun.
RATE_WINDOW_S = 10.0
#: The status page's sparklines: one point every HISTORY_STEP_S seconds over the last hour,
#: kept in memory (a bounded ring: 720 points of three numbers).
HISTORY_STEP_S = 5.0
HISTORY_POINTS = int(3600 / HISTORY_STEP_S)
#: Devices listed at most (status page, status.json): a page must stay readable and small.
MAX_DEVICES = 1000


@dataclass(slots=True)
class DeviceSeen:
    """What the gateway committed last for one device, since it started."""

    boot: str = ""
    fw: str = ""
    reset: str = ""
    last_seq: int | None = None
    last_reading_ms: int | None = None
    #: Readings received since start, duplicates included (the outbox knows which were new).
    received: int = 0


class ObservedOutbox(Outbox):
    """The outbox, noting per device what each commit carried (firmware, last reading).

    Everything else is the plain :class:`Outbox`; the notes cost one dict update per reading
    under a lock of their own, never a query.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen_lock = threading.Lock()
        self._seen: dict[tuple[str, str], DeviceSeen] = {}

    def add(self, readings: Sequence[Reading], *args: Any, **kwargs: Any) -> AddResult:  # type: ignore[override]
        """:meth:`Outbox.add`, then note the devices it carried."""
        result = super().add(readings, *args, **kwargs)
        statuses = kwargs.get("statuses", args[2] if len(args) > 2 else ())
        self._note(readings, statuses)
        return result

    def _note(self, readings: Iterable[Reading], statuses: Iterable[StatusEvent]) -> None:
        stamp = now_ms()
        with self._seen_lock:
            for event in statuses:
                seen = self._seen.setdefault((event.site, event.device), DeviceSeen())
                seen.boot = event.boot
                seen.fw = event.fw or seen.fw
                seen.reset = event.reset or seen.reset
            for reading in readings:
                key = (reading.site, reading.device)
                seen = self._seen.get(key)
                if seen is None:  # (not setdefault: that builds a DeviceSeen per reading)
                    seen = self._seen[key] = DeviceSeen()
                seen.received += 1
                seen.last_reading_ms = stamp
                if reading.boot != seen.boot:
                    seen.boot, seen.last_seq = reading.boot, reading.seq
                else:
                    seen.last_seq = reading.seq if seen.last_seq is None else max(seen.last_seq, reading.seq)

    def seen(self) -> dict[tuple[str, str], DeviceSeen]:
        """A copy of the per-device notes, keyed by (site, device)."""
        with self._seen_lock:
            return {key: DeviceSeen(**{f: getattr(v, f) for f in DeviceSeen.__slots__}) for key, v in self._seen.items()}


def _optional(obj: object, names: Sequence[str]) -> Any:
    """The result of the first of ``names`` that ``obj`` has as a method, else None.

    Duplicates, gaps and drops are kept by outboxes that track sequences and retention;
    reading them this way shows them where they exist and '-' where not (an older outbox, or
    one closing as the service stops).
    """
    for name in names:
        method = getattr(obj, name, None)
        if callable(method):
            try:
                return method()
            except Exception:  # a fact we cannot read is shown as unknown, never a failed page
                return None
    return None


def seq_counts_by_device(rows: object) -> dict[tuple[str, str], dict]:
    """``Outbox.device_seq_counts()`` rows keyed by (site, device)."""
    out: dict[tuple[str, str], dict] = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and isinstance(row.get("device"), str):
            out[(str(row.get("site", "")), row["device"])] = row
    return out


def drops_by_device(rows: object) -> dict[tuple[str, str], dict[str, int]]:
    """``Outbox.drop_counts()`` rows (site, device, reason, count) as {(site, device): {reason: n}}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and isinstance(row.get("device"), str) and isinstance(row.get("count"), int):
            reasons = out.setdefault((str(row.get("site", "")), row["device"]), {})
            reasons[str(row.get("reason"))] = reasons.get(str(row.get("reason")), 0) + row["count"]
    return out


def _known(value: object, kept: object) -> int | None:
    """None when the outbox keeps no such count (``kept`` is None), else the count (0 if absent)."""
    return None if kept is None else int(value or 0)  # type: ignore[call-overload]


def per_reason_counts(value: object) -> dict[str, int]:
    """Drop totals as {reason: n}, from ``Outbox.drop_totals()`` ({reason: n})."""
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def batches_in_flight(stats: dict) -> int:
    """Batches published and not yet confirmed, from the uplink's counters: its
    ``inflight_batches`` (pipelined uplink), else whether its one ``inflight_bseq`` is set."""
    value = stats.get("inflight_batches")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return 0 if stats.get("inflight_bseq") is None else 1


def file_bytes(path: str | Path) -> int:
    """Bytes the outbox takes on disk: the database and its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            pass
    return total


def read_node_rows(db: Any) -> list[dict]:
    """Latest status per device from an outbox database (site, device, boot, state, received_ms),
    with the firmware of a still-pending status event where there is one."""
    try:
        rows = [
            dict(zip(("site", "device", "boot", "state", "status_ms"), r))
            for r in db.execute(
                f"SELECT site, device, boot, state, received_ms FROM {NODE_STATUS} ORDER BY site, device LIMIT ?",
                [MAX_DEVICES],
            ).fetchall()
        ]
        fw = {
            (r[0], r[1]): (r[2], r[3])
            for r in db.execute(
                f"SELECT site, device, fw, reset FROM {STATUS_EVENTS}"
                f" WHERE id IN (SELECT MAX(id) FROM {STATUS_EVENTS} GROUP BY site, device)"
            ).fetchall()
        }
    except sqlite3.Error:  # an outbox from before statuses were kept, or one being created
        return []
    try:
        down = dict(
            ((r[0], r[1]), r[2])
            for r in db.execute(f"SELECT site, device, down FROM {NODE_STATUS} ORDER BY site, device LIMIT ?", [MAX_DEVICES])
        )
    except sqlite3.Error:  # an outbox from before the column, opened read-only (not migrated)
        down = {}
    for row in rows:
        row["fw"], row["reset"] = fw.get((row["site"], row["device"]), ("", ""))
        row["down"] = _down(down.get((row["site"], row["device"])))
    return rows


def _down(raw: str | None) -> list[str]:
    """The sensors down of a node_status row (JSON list, "" for none)."""
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [str(x) for x in value] if isinstance(value, list) else []


class Health:
    """Collects the gateway's facts into one JSON-able dict (:meth:`snapshot`)."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.started_ms = now_ms()
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=int(RATE_WINDOW_S) + 5)
        #: (wall ms, rows waiting, readings/s committed over the step), oldest first.
        self._history: deque[tuple[int, int, float]] = deque(maxlen=HISTORY_POINTS)
        self._history_mark: tuple[float, int] | None = None  # (monotonic, committed) of the last point
        self._db: Any = None
        self.last_confirm_rtt_s: float | None = None
        self.rtt_observers: list[Callable[[float], None]] = []

    # --- inputs ----------------------------------------------------------------------------

    def note_confirm_rtt(self, seconds: float) -> None:
        """The uplink's hook: a batch was confirmed ``seconds`` after it was published."""
        self.last_confirm_rtt_s = seconds
        for observe in self.rtt_observers:
            observe(seconds)

    def sample(self) -> None:
        """Remember the counters now (called once a second by the status server)."""
        stats = self.gateway.stats()
        now = time.monotonic()
        committed = int(stats.get("committed", 0))
        with self._lock:
            self._samples.append((now, int(stats.get("forwarded", 0)), committed, int(stats.get("pending", 0))))
            mark = self._history_mark
            if mark is None or now - mark[0] >= HISTORY_STEP_S:
                rate = 0.0 if mark is None else (committed - mark[1]) / (now - mark[0])
                rows = int(stats.get("pending", 0)) + int(stats.get("status_pending", 0))
                self._history.append((now_ms(), rows, round(rate, 2)))
                self._history_mark = (now, committed)

    def history(self) -> dict:
        """The last hour for the sparklines: outbox rows and readings/s, one point per step."""
        with self._lock:
            points = list(self._history)
        return {"step_s": HISTORY_STEP_S, "t_ms": [p[0] for p in points], "rows": [p[1] for p in points],
                "readings_per_s": [p[2] for p in points]}

    # --- outputs ---------------------------------------------------------------------------

    def rates(self, stats: dict | None = None) -> dict[str, float | None]:
        """Readings/s leaving (confirmed) and entering the outbox over the last
        :data:`RATE_WINDOW_S` seconds (up to ``stats``, the counters now, when given), and the
        time to empty at the net rate (None unless the outbox is shrinking; 0 when empty)."""
        with self._lock:
            samples = list(self._samples)
        now = time.monotonic()
        if stats is not None:
            samples.append((now, int(stats.get("forwarded", 0)), int(stats.get("committed", 0)), int(stats.get("pending", 0))))
        window = [s for s in samples if now - s[0] <= RATE_WINDOW_S]
        pending = window[-1][3] if window else None
        if len(window) < 2 or window[-1][0] - window[0][0] <= 0:
            return {"drain_rate": None, "intake_rate": None, "time_to_empty_s": 0.0 if pending == 0 else None}
        (t0, f0, c0, _), (t1, f1, c1, p1) = window[0], window[-1]
        drain, intake = (f1 - f0) / (t1 - t0), (c1 - c0) / (t1 - t0)
        net = drain - intake
        return {
            "drain_rate": drain,
            "intake_rate": intake,
            "time_to_empty_s": 0.0 if p1 == 0 else (p1 / net) if net > 0 else None,
        }

    def _node_rows(self) -> list[dict]:
        """node_status through a read-only connection of our own (WAL: no lock shared with
        ingest and uplink)."""
        with self._lock:
            try:
                if self._db is None:
                    self._db = open_readonly(self.gateway.config.outbox_path)
                return read_node_rows(self._db)
            except (OSError, sqlite3.Error):
                self._db = None
                return []

    def devices(self) -> list[dict]:
        """One entry per device the gateway knows (latest status or a reading since start)."""
        outbox = self.gateway.outbox
        seen = outbox.seen() if isinstance(outbox, ObservedOutbox) else {}
        seq_rows = _optional(outbox, ("device_seq_counts",))
        seq = seq_counts_by_device(seq_rows)
        drop_rows = _optional(outbox, ("drop_counts",))
        drops = drops_by_device(drop_rows)
        held = self._held_by_device()
        by_key: dict[tuple[str, str], dict] = {}
        for row in self._node_rows():
            by_key[(row["site"], row["device"])] = row
        now = now_ms()
        out = []
        for key in sorted(set(by_key) | set(seen) | set(seq) | set(held))[:MAX_DEVICES]:
            row = by_key.get(key, {})
            note = seen.get(key, DeviceSeen())
            counts = seq.get(key, {})

            last = max((t for t in (row.get("status_ms"), note.last_reading_ms) if t is not None), default=None)
            out.append(
                {
                    "site": key[0],
                    "device": key[1],
                    "state": row.get("state", "unknown"),
                    "boot": row.get("boot") or note.boot,
                    "fw": note.fw or row.get("fw", ""),
                    "reset": note.reset or row.get("reset", ""),
                    "down": row.get("down", []),
                    "last_seen_ms": last,
                    "last_seen_age_s": None if last is None else max(0.0, (now - last) / 1000),
                    "last_seq": note.last_seq if note.last_seq is not None else counts.get("high_seq"),
                    "received": note.received,
                    "duplicates": _known(counts.get("duplicates"), seq_rows),
                    "gaps": _known(counts.get("gaps"), seq_rows),
                    "missing": _known(counts.get("missing"), seq_rows),
                    "dropped": None if drop_rows is None else sum(drops.get(key, {}).values()),
                    "dropped_by_reason": drops.get(key, {}),
                    # Per-device shares (edge/shares.py): readings held back (acked to the
                    # broker uncommitted; the node sends them again), holds started, held now.
                    "held_back": held.get(key, {}).get("held_back", 0),
                    "holds": held.get(key, {}).get("holds", 0),
                    "held": bool(held.get(key, {}).get("held", False)),
                    "held_reason": held.get(key, {}).get("reason", ""),
                }
            )
        return out

    def _held_by_device(self) -> dict[tuple[str, str], dict]:
        ingest = getattr(self.gateway, "ingest", None)
        stats = ingest.stats() if ingest is not None and hasattr(ingest, "stats") else {}
        out = {}
        for name, counters in (stats.get("held_back_by_device") or {}).items():
            site, _, device = name.partition("/")
            out[(site, device)] = counters
        return out

    def snapshot(self) -> dict:
        """Every fact, as plain JSON types."""
        gw = self.gateway
        stats = gw.stats()
        config = gw.config
        drops = per_reason_counts(_optional(gw.outbox, ("drop_totals",)))
        dedup = _optional(gw.outbox, ("dedup_totals",))
        dedup = dedup if isinstance(dedup, dict) else {}
        oldest = stats.get("oldest_pending_age_s")
        in_flight = batches_in_flight(stats)
        pending, status_pending = int(stats.get("pending", 0)), int(stats.get("status_pending", 0))
        now = now_ms()
        devices = self.devices()
        return {
            "gateway": {
                "id": config.gateway_id,
                "local_broker": config.local_broker,
                "cloud_broker": config.cloud_broker,
                "now_ms": now,
                "uptime_s": (now - self.started_ms) / 1000,
            },
            "ingest": {
                "connected": bool(stats.get("local_connected")),
                "received": int(stats.get("committed", 0)) + int(stats.get("duplicates", 0)),
                "committed": int(stats.get("committed", 0)),
                "duplicates": int(stats.get("duplicates", 0)),
                "dead_letters": int(stats.get("dead_lettered", 0)),
                "statuses": int(stats.get("status_committed", 0)),
                "backpressure": bool(stats.get("backpressure")),
                "session_contested": bool(stats.get("local_session_contested")),
                "session_takeovers": int(stats.get("local_session_takeovers", 0)),
                # Readings held back by the per-device shares or rate limit, and holds started.
                "held_back": int(stats.get("held_back", 0)),
                "hold_events": int(stats.get("hold_events", 0)),
                "devices_held": int(stats.get("holds_active", 0)),
                # Ever, from the outbox's sequence tracking (None where the outbox keeps none).
                "duplicates_total": dedup.get("duplicates_total"),
                "gaps_open": dedup.get("gaps_open"),
                "missing": dedup.get("missing_readings"),
            },
            "outbox": {
                "path": str(config.outbox_path),
                "readings": pending,
                "statuses": status_pending,
                "rows": pending + status_pending,
                "max_rows": stats.get("max_rows", config.max_rows),
                "bytes": file_bytes(config.outbox_path),
                "oldest_age_s": oldest,
                "dead_letters": int(stats.get("dead_letters", 0)),
                "dead_letters_unsent": int(stats.get("dead_letters_unsent", 0)),
                "drops": drops,
                **self.rates(stats),
            },
            "uplink": {
                "connected": bool(stats.get("cloud_connected")),
                "batches_in_flight": int(in_flight),
                "batches_confirmed": int(stats.get("batches_confirmed", 0)),
                "batches_resent": int(stats.get("batches_resent", 0)),
                "deadletters_forwarded": int(stats.get("deadletters_forwarded", 0)),
                "forwarded": int(stats.get("forwarded", 0)),
                "statuses_forwarded": int(stats.get("status_forwarded", 0)),
                "last_confirm_rtt_s": self.last_confirm_rtt_s,
                "session_contested": bool(stats.get("cloud_session_contested")),
                "session_takeovers": int(stats.get("cloud_session_takeovers", 0)),
            },
            "nodes": {"online": int(stats.get("nodes_online", 0)), "offline": int(stats.get("nodes_offline", 0))},
            "commands": {
                "connected": bool(stats.get("commands_connected")),
                "pending": int(stats.get("commands_pending", 0)),
                "by_device": dict(stats.get("commands_pending_by_device") or {}),
            },
            "devices": devices,
            "ota": self._ota(stats),
            "history": self.history(),
        }

    def _ota(self, stats: dict) -> dict:
        """Releases held, the pace, and the nodes' downloads (from the chunk requests served)."""
        server = getattr(self.gateway, "release_server", None)
        return {
            "releases": list(stats.get("ota_releases") or []),
            "chunks_per_s": getattr(server, "chunks_per_s", None),
            "chunks": int(stats.get("ota_chunks", 0)),
            "chunk_bytes": int(stats.get("ota_chunk_bytes", 0)),
            "paced_s": round(float(stats.get("ota_paced_s", 0.0)), 3),
            "downloads": server.downloads.snapshot() if server is not None else [],
        }

    def close(self) -> None:
        """Close the read-only connection."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

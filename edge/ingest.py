"""Ingest: node readings and statuses from the local broker into the outbox, PUBACKed only once committed.

paho runs with ``manual_ack=True``: its network thread only queues each message; a worker
thread decodes a group of them, commits the group to the outbox in one transaction, and only
then PUBACKs them (in receive order) and tells each node how far it is committed. Until the
PUBACK, the message belongs to the broker's persistent session, which re-delivers it if the
gateway dies: nothing is lost between the two.

The network thread takes messages on the raw path of :class:`tern.core.mqtt_client.BufferedClient`
(PUBLISH packets parsed straight from the socket buffer into plain values, no paho
``MQTTMessage``), and the worker collects a group by sleeping through its linger and then
taking what queued up, rather than waking for each message: at thousands of readings a
second both were a large part of the gateway's CPU (issue 27).

Node statuses (``tern/+/+/status``, retained: birth and last will) take the same path as
readings, in the same groups and transactions, so they reach the cloud with the same custody.
The broker re-delivers every retained status on each (re)subscribe; the outbox ignores a
status equal to the device's latest one. An empty retained payload only clears the retained
message: it is acked and otherwise ignored.

Back-pressure: when the outbox is full the worker holds the messages it has (in memory, not
acked) and waits for room. The broker stops sending once its in-flight window for us is full
and queues the rest in our session; nodes keep theirs in their rings. Nothing is dropped.

Per-device shares (:mod:`tern.edge.shares`): a device over its share of the outbox, or above
``device_rate_limit``, is *held back*: its messages are PUBACKed without being committed and
without the node ack, so they stop occupying the session's in-flight window (which would stall
every other device) while custody stays with the node, which sends them again.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Callable, NamedTuple

import paho.mqtt.client as mqtt

from tern.edge.config import GatewayConfig
from tern.edge import shares
from tern.edge.outbox import DeadLetter, Outbox, is_disk_full, now_ms
from tern.core import codec, topics
from tern.core.codec import NodeAck, Reading, StatusEvent
from tern.core.mqtt_client import as_message
from tern.core.mqtt_session import PersistentSession
from tern.core.quoting import describe, quote, shorten

log = logging.getLogger(__name__)

#: Messages committed per transaction at most: one fsync per group is what makes SQLite
#: keep up (~3.4k single-row commits/s, ~110k rows/s in batches).
GROUP_MAX = 500
#: A new group waits this long for more messages before it is committed. Every commit writes
#: whole pages to the WAL and fsyncs: once the worker got faster (issue 27), groups at a
#: moderate rate shrank to a few readings and each reading cost ~3.3 KB written to the SD card
#: (make bench, wear stage) instead of ~1.9 KB. A node's ack waits at most this much longer.
GROUP_LINGER_S = 0.02
#: While a group lingers, the worker looks at the queue this often: each message waking it
#: (a blocking get per message) cost both threads a GIL hand-over per reading.
LINGER_TICK_S = 0.002
#: Seconds between retention sweeps (readings expire by age even while nothing arrives).
SWEEP_EVERY_S = 2.0
#: A condition that lasts (drops by policy, a full disk) is logged at most once per this many seconds.
LOG_EVERY_S = 60.0
#: Devices whose hold-back counters are kept (the oldest forgotten beyond): bounded memory.
MAX_DEVICE_COUNTERS = 10_000
#: A node is sent at most one ack per this many seconds: a node sending faster (a backlog
#: replayed, a fast sensor) gets one ack for all it had committed meanwhile, instead of one
#: per group. A node's first ack after a quiet spell leaves at once. Under a live load of 100
#: fast devices, node acks (a QoS 1 publish, and its PUBACK, each) were a third as many as
#: the readings and a fifth of the gateway's CPU. A bundle is acked at once: the firmware
#: replays its flash spill with a few bundles in flight, each waiting for its ack.
NODE_ACK_EVERY_S = 0.1


_REPLY_SUFFIX = "/" + topics.REPLY
_FW_GET_SUFFIX = "/" + topics.FW_GET


class _Incoming(NamedTuple):
    """One message as the network thread queues it for the worker."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_ms: int
    #: The connection it arrived on: a packet id means nothing on any other connection.
    generation: int
    #: Sent because we subscribed (a retained message), not because someone published now.
    retain: bool = False


_new_tuple = tuple.__new__


Decoded = Reading | list[Reading] | StatusEvent | DeadLetter | None


def decode(topic: str, payload: bytes, received_ms: int = 0) -> Decoded:
    """Turn one node message into a Reading or a StatusEvent, or a DeadLetter saying why it is
    neither; None for an empty status payload (a cleared retained message: nothing to keep)."""
    try:
        where = topics.parse_node_topic(topic)
        if where.kind == topics.TELEMETRY:
            # One reading (v1) or a node's bundle of them (v2): a bundle is stored and acked
            # reading by reading, as if each had come alone.
            readings = codec.decode_readings(payload, site=where.site, topic_device=where.device)
            return readings[0] if len(readings) == 1 else list(readings)
        if where.kind == topics.STATUS:
            if not payload:
                return None
            status = codec.decode_status(payload, topic_device=where.device)
            return StatusEvent.from_status(status, where.site)
        raise codec.CodecError(f"not a telemetry or status topic: {topic!r}")
    except codec.CodecError as exc:
        # Shortened: the error quotes what it rejects, and that may be a 65,000-character topic.
        return DeadLetter(topic=topic, payload=payload, error=describe(exc, 1000), received_ms=received_ms)
    except Exception as exc:  # a decoder bug must cost one message a dead letter, not the gateway
        log.exception("unexpected error decoding %s", quote(topic))
        return DeadLetter(topic=topic, payload=payload, error=f"internal error: {describe(exc, 1000)}", received_ms=received_ms)


class Ingest:
    """The local-broker side of the gateway: subscribe, commit, PUBACK, node ack."""

    def __init__(self, config: GatewayConfig, outbox: Outbox, on_commit: Callable[[], None] | None = None,
                 on_reply: Callable[[mqtt.MQTTMessage, int], None] | None = None,
                 on_fw_request: Callable[[mqtt.MQTTMessage], None] | None = None) -> None:
        self.config = config
        self.outbox = outbox
        self._on_commit = on_commit
        #: Node command replies go here (message, connection generation), acked by the taker:
        #: one local session per gateway, because the Pi broker may bind client ids to accounts.
        self._on_reply = on_reply
        #: Nodes' requests for release chunks (QoS 0: nothing to ack) go here (edge/ota_serve.py).
        self._on_fw_request = on_fw_request
        self._queue: queue.SimpleQueue[_Incoming] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"tern-ingest-{config.gateway_id}", daemon=True)
        self._lock = threading.Lock()
        self._counts = {
            "processed": 0,
            "committed": 0,
            "duplicates": 0,
            "gaps_opened": 0,
            "gap_filled": 0,
            "status_committed": 0,
            "status_duplicates": 0,
            "status_cleared": 0,
            "dead_lettered": 0,
            "node_acks": 0,
            "backpressure_events": 0,
            "commit_errors": 0,
            "dead_letter_repeats": 0,
            "dropped": 0,
            "disk_full_events": 0,
            "disk_full_retries": 0,
            "held_back": 0,
            "hold_events": 0,
            "resend_hints": 0,
            # Transactions committed: processed / groups is the group size that the fsyncs,
            # PUBACK bursts and node acks are paid per.
            "groups": 0,
        }
        self._disk_full = False
        self._disk_full_logged_at = float("-inf")
        self._dropped_since_log: dict[str, int] = {}
        self._drops_logged_at = float("-inf")
        self._next_sweep = 0.0
        self._blocked = False
        self._held = 0
        # Per-device shares: the holds in force (stored in the outbox, so they survive a
        # restart), the per-device rate buckets, and the counters per device.
        self._holds: dict[tuple[str, str, str], shares.Hold] = {h.key: h for h in outbox.holds()}
        rate = shares.parse_device_rate(config.device_rate_limit) if config.device_rate_limit else None
        self._rates = shares.DeviceRates(rate) if rate is not None else None
        self._device_holds: dict[tuple[str, str], dict] = {}
        self._hold_logged: dict[str, float] = {}
        self._next_hint = 0.0
        # Node acks: the highest seq committed and not yet acked per (site, device, boot), and
        # when each was last acked (entries older than NODE_ACK_EVERY_S are forgotten).
        self._acks_due: dict[tuple[str, str, str], int] = {}
        self._acked_at: dict[tuple[str, str, str], float] = {}
        self._acks_urgent: set[tuple[str, str, str]] = set()  # acked at once (bundles)
        self._next_ack_flush = float("inf")
        host, port = config.local_hostport
        # manual_ack: the worker PUBACKs only after the outbox commit.
        self.session = PersistentSession(
            config.ingest_client_id,
            host,
            port,
            [(topics.TELEMETRY_FILTER, 1), (topics.STATUS_FILTER, 1)]
            + ([(topics.REPLY_FILTER, 1)] if on_reply is not None else [])
            + ([(topics.FW_GET_FILTER, 0)] if on_fw_request is not None else []),
            self._on_message,
            manual_ack=True,
            keepalive=config.keepalive_s,
            reconnect_max_s=config.reconnect_max_s,
            name="ingest",
            broker=f"the local broker {config.local_broker}",
            lost_hint="nodes keep their readings until it is back; what the outbox holds still goes to the cloud",
            takeover_hint=config.takeover_hint(),
            logger=log,
            **config.local_auth(),
        )
        self.client = self.session.client
        # Plain values straight from the socket buffer instead of one MQTTMessage per reading.
        self.client.set_raw_handler(self._on_publish)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and connect (in the background) to the local broker."""
        self._worker.start()
        self.session.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the group being committed (and ack it), then disconnect.

        Messages still queued or held are *not* acked: the broker keeps them in our
        session and re-delivers them to the next gateway run.
        """
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout)
        self.session.stop()

    @property
    def connected(self) -> bool:
        """True while connected (and subscribed) to the local broker."""
        return self.session.connected

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed on the local broker (or ``timeout``)."""
        return self.session.wait_connected(timeout)

    @property
    def committed(self) -> int:
        """Readings committed since start (the one counter, without copying them all)."""
        return self._counts["committed"]

    def stats(self) -> dict:
        """Counters since start, plus the back-pressure state."""
        with self._lock:
            out = dict(self._counts)
            out["backpressure"] = self._blocked
            out["disk_full"] = self._disk_full
            out["held"] = self._held
            out["holds_active"] = len(self._holds)
            out["held_back_by_device"] = {
                f"{site}/{device}": dict(c) for (site, device), c in sorted(self._device_holds.items())
            }
        out["local_connected"] = self.connected
        out["local_session_takeovers"] = self.session.takeovers
        out["local_session_contested"] = self.session.contested
        return out

    # --- paho's network thread: keep it short ---------------------------------------------

    def _on_publish(self, topic: str, payload: bytes, mid: int, qos: int, dup: bool, retain: bool) -> None:
        """The raw path's handler: every message from the local broker, as plain values."""
        if self._on_reply is not None and topic.endswith(_REPLY_SUFFIX):
            self._on_reply(as_message(topic, payload, mid, qos, dup, retain), self.session.generation)
            return
        if self._on_fw_request is not None and topic.endswith(_FW_GET_SUFFIX):
            self._on_fw_request(as_message(topic, payload, mid, qos, dup, retain))
            return
        # tuple.__new__: the NamedTuple's own __new__ is a Python function, called per message.
        self._queue.put(_new_tuple(_Incoming, (topic, payload, mid, qos, now_ms(), self.session.generation, retain)))

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        """paho's path (unused while the raw handler is set): the same, from an ``MQTTMessage``."""
        self._on_publish(msg._topic.decode("utf-8", "replace"), bytes(msg.payload), msg.mid, msg.qos,
                         bool(msg.dup), bool(msg.retain))

    # --- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        held: list[_Incoming] = []
        pending = self._queue
        while not self._stop.is_set():
            if not held:
                wait = min(0.2, max(0.0, self._next_ack_flush - time.monotonic()))
                try:
                    held.append(pending.get(timeout=wait))
                except queue.Empty:
                    self._flush_node_acks()
                    self._maybe_sweep()  # readings expire by age while nothing arrives too
                    continue
                # Linger for a fuller group, looking at the queue every tick (not waking per message).
                linger_until = time.monotonic() + GROUP_LINGER_S
                while pending.qsize() < GROUP_MAX - 1:
                    left = linger_until - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(left, LINGER_TICK_S))
            take = pending.get_nowait
            try:
                for _ in range(GROUP_MAX - len(held)):
                    held.append(take())
            except queue.Empty:
                pass
            try:
                self._commit_prefix(held)
            except Exception as exc:  # never let the worker die: the messages stay un-acked and retried
                with self._lock:
                    self._counts["commit_errors"] += 1
                if is_disk_full(exc):
                    self._note_disk_full(len(held))
                else:
                    log.exception("committing %d messages failed; retrying", len(held))
                self._stop.wait(1.0)
            with self._lock:
                self._held = len(held)
            self._flush_node_acks()
            self._maybe_sweep()
        # Stopping: what is committed is acked (the session is still up until stop() ends it).
        self._flush_node_acks(force=True)

    def _note_disk_full(self, held: int) -> None:
        """A full disk lasts: one clear line when it starts and once a minute while it lasts,
        never a traceback per retry."""
        with self._lock:
            self._counts["disk_full_retries"] += 1
            started = not self._disk_full
            if started:
                self._counts["disk_full_events"] += 1
            self._disk_full = True
            now = time.monotonic()
            if not started and now - self._disk_full_logged_at < LOG_EVERY_S:
                return
            self._disk_full_logged_at = now
            retries = self._counts["disk_full_retries"]
        log.error(
            "outbox disk full (%s): not acking new readings (%d held, the local broker keeps the rest);"
            " retrying every second, %d tries so far; free space on its file system",
            self.outbox.path,
            held,
            retries,
        )

    def _note_disk_ok(self) -> None:
        with self._lock:
            was_full, self._disk_full = self._disk_full, False
        if was_full:
            log.warning("outbox %s writable again: acking resumed", self.outbox.path)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if self._holds and now >= self._next_hint:
            self._next_hint = now + shares.HINT_EVERY_S / 2
            try:
                self._hint_holds(now)
            except Exception as exc:  # a hint is an optimisation: the next pass tries again
                log.warning("resend hint failed: %s", exc)
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        try:
            self._note_dropped(self.outbox.sweep())
        except Exception as exc:  # the next sweep tries again; readings are only ever kept longer
            if not is_disk_full(exc):  # a full disk is reported by the commit path, once a minute
                log.warning("retention sweep failed: %s", exc)

    def _note_dropped(self, dropped: dict[str, int]) -> None:
        """Count readings dropped by the retention policy and say so, once a minute at most."""
        with self._lock:
            for reason, n in dropped.items():
                self._counts["dropped"] += n
                self._dropped_since_log[reason] = self._dropped_since_log.get(reason, 0) + n
            now = time.monotonic()
            if not self._dropped_since_log or now - self._drops_logged_at < LOG_EVERY_S:
                return
            pending, self._dropped_since_log = self._dropped_since_log, {}
            self._drops_logged_at = now
        what = ", ".join(f"{n} ({reason})" for reason, n in sorted(pending.items()))
        log.warning(
            "retention dropped the oldest readings: %s; each drop is counted per device and reported to the cloud",
            what,
        )

    def _commit_prefix(self, incoming: list[_Incoming]) -> None:
        """Commit as long a prefix of ``incoming`` as fits, ack it, and remove it from ``incoming``.

        A device held back (:mod:`tern.edge.shares`) does not end the prefix: its messages are
        acked to the broker uncommitted, without a node ack, and the node sends them again.
        """
        config = self.config
        adm = self.outbox.admission(
            floor=config.device_share_floor, cap=config.device_share_cap,
        )
        view = dict(self._holds)  # this group's holds; kept only once the group is committed
        changed: dict[tuple[str, str, str], shares.Hold] = {}
        released: set[tuple[str, str, str]] = set()
        started: list[shares.Hold] = []
        held_back: dict[tuple[str, str], int] = {}
        # The same per (site, device, boot, reason) with the lowest seq: the hold events that
        # report them to the cloud are written in the commit below, with the holds.
        held_counts: shares.HeldCounts = {}
        now = time.monotonic()
        readings: list[Reading] = []
        statuses: list[StatusEvent] = []
        letters: list[DeadLetter] = []
        cleared = 0
        repeats = 0
        junk: list[tuple[str, str]] = []
        count = 0
        unlimited = self._rates is None
        # Far below the bound (the usual case) admit() can only say ADMIT: those readings are
        # counted in one step (quick) instead of asked for one by one, a tenth of the worker's
        # Python time per reading. Counted before anything else asks adm.
        sure = adm.sure_room() if unlimited else 0
        quick: list[str] = []
        for item in incoming:
            result = decode(item.topic, item.payload, item.received_ms)
            kind = type(result)
            if sure > 0 and kind is Reading and not view:
                sure -= 1
                quick.append(result.device)  # type: ignore[union-attr]
                readings.append(result)  # type: ignore[arg-type]
                count += 1
                continue
            if quick:
                adm.count_admitted(quick)
                quick = []
            if kind is Reading or kind is list:
                # A bundle: all of it or none of it in this group.
                group = [result] if kind is Reading else result  # type: ignore[list-item]
                verdict = self._admit(group, adm, view, changed, released, started, now)  # type: ignore[arg-type]
                if verdict == shares.FULL:
                    break
                if verdict != shares.ADMIT:
                    key = (group[0].site, group[0].device)
                    held_back[key] = held_back.get(key, 0) + len(group)
                    low = min(r.seq for r in group)
                    entry = held_counts.setdefault((group[0].site, group[0].device, group[0].boot, verdict), [0, low])
                    entry[0] += len(group)
                    entry[1] = min(entry[1], low)
                else:
                    readings.extend(group)
                    if len(group) > 1:
                        # A bundle: the node replays its flash spill, a few bundles in flight
                        # until acked; a coalesced ack would pace the replay.
                        self._acks_urgent.add((group[0].site, group[0].device, group[0].boot))
            elif isinstance(result, StatusEvent):
                # Exempt from shares: a status needs only a free row. A status that turns out
                # to be a duplicate only makes this check conservative.
                if not adm.admit_status():
                    break
                statuses.append(result)
                if result.state == "online" and not item.retain:
                    # A birth: the node reconnected and sends everything it still holds, from
                    # its oldest; what its ring could not keep is counted in this birth. Not a
                    # retained one the broker replays on our (re)subscribe: that node did not
                    # reconnect and sends nothing again, so lifting its hold would let its next
                    # reading be committed past the hole and the node ack drop what we never had
                    # (a node that did reconnect steps its seqs back, which lifts it anyway).
                    for key in [k for k in view if k[0] == result.site and k[1] == result.device]:
                        del view[key]
                        changed.pop(key, None)
                        released.add(key)
            elif result is None:
                cleared += 1
            elif self._repeated_junk(item, junk):
                repeats += 1
            else:
                letters.append(result)
            count += 1
            sure = adm.sure_room() if unlimited else 0
        adm.count_admitted(quick)
        full = count < len(incoming)
        if count == 0:
            # Full: hold everything, ack nothing, wait for the uplink to free some room.
            self._note_blocked(True)
            self.outbox.wait_for_room(0.5)
            return
        result = self.outbox.add(
            readings, letters, statuses=statuses, holds=list(changed.values()), released=sorted(released - set(changed)),
            held=held_counts,
        )
        self._holds = view
        self.outbox.remember_junk(junk)
        self._note_disk_ok()
        # Committed: now, and only now, the PUBACKs (in receive order, as MQTT requires).
        # A message from a lost connection is not acked here: the broker re-delivers it on the
        # new one, where the duplicate is ignored by the outbox and acked under its new id.
        # Held-back readings are acked too: their hold is committed, and the node keeps them.
        self.session.ack_many([(item.mid, item.qos, item.generation) for item in incoming[:count]])
        del incoming[:count]
        self._note_node_acks(readings)
        for letter in letters:
            log.warning("dead letter from %s: %s", quote(letter.topic), shorten(letter.error, 300))
        with self._lock:
            self._counts["processed"] += count
            self._counts["groups"] += 1
            self._counts["committed"] += result.inserted
            self._counts["duplicates"] += result.duplicates
            self._counts["gaps_opened"] += result.gaps
            self._counts["gap_filled"] += result.gap_filled
            self._counts["dead_lettered"] += result.dead_letters
            self._counts["status_committed"] += result.statuses
            self._counts["status_duplicates"] += result.status_duplicates
            self._counts["status_cleared"] += cleared
            self._counts["dead_letter_repeats"] += repeats
        self._note_held_back(held_back, started, released, adm)
        self._note_dropped(result.dropped)
        self._note_blocked(full)
        if (result.inserted or result.statuses) and self._on_commit is not None:
            self._on_commit()

    def _admit(
        self,
        group: list[Reading],
        adm: shares.Admission,
        view: dict[tuple[str, str, str], shares.Hold],
        changed: dict[tuple[str, str, str], shares.Hold],
        released: set[tuple[str, str, str]],
        started: list[shares.Hold],
        now: float,
    ) -> str:
        """:data:`shares.ADMIT` to commit ``group`` (one message of one device), :data:`shares.FULL`
        to stall, or the reason it is held back (the hold is then recorded in ``view``)."""
        first = group[0]
        if len(group) == 1:
            low = high = first.seq
        else:
            low, high = min(r.seq for r in group), max(r.seq for r in group)
        key = (first.site, first.device, first.boot)
        hold = view.get(key) if view else None
        if hold is not None and low > hold.max_seq:
            # Still going forward past the hole: committing this would let the node ack pass
            # readings the gateway does not have. Held until the node sends again from the hole.
            reason = hold.reason
        elif self._rates is not None and not self._rates.allows(first.device, now):
            reason = shares.RATE
        else:
            verdict = adm.admit(first.device, len(group))
            if verdict == shares.ADMIT:
                if self._rates is not None:
                    self._rates.take(first.device, len(group), now)
                if hold is not None:  # the node sends again from the hole, and it fits
                    del view[key]
                    changed.pop(key, None)
                    released.add(key)
                return shares.ADMIT
            if verdict == shares.FULL:
                return shares.FULL
            reason = verdict
        if hold is None:
            hold = shares.Hold(first.site, first.device, first.boot, low, reason, high)
            started.append(hold)
        else:
            hold = replace(hold, from_seq=min(hold.from_seq, low), max_seq=max(hold.max_seq, high), reason=reason)
        view[key] = hold
        changed[key] = hold
        return reason

    def _note_held_back(
        self,
        held_back: dict[tuple[str, str], int],
        started: list[shares.Hold],
        released: set[tuple[str, str, str]],
        adm: shares.Admission,
    ) -> None:
        """Count what was held back per device, and say so once per device when a hold starts
        (at most once a minute per device: a node at the rate limit toggles every second)."""
        if not held_back and not started and not released:
            return
        now = time.monotonic()
        lines = []
        with self._lock:
            for (site, device), n in held_back.items():
                c = self._device_counter(site, device)
                c["held_back"] += n
                self._counts["held_back"] += n
            for hold in started:
                c = self._device_counter(hold.site, hold.device)
                c["holds"] += 1
                c["reason"] = hold.reason
                self._counts["hold_events"] += 1
                if now - self._hold_logged.get(hold.device, float("-inf")) >= LOG_EVERY_S:
                    self._hold_logged[hold.device] = now
                    lines.append(hold)
            held_now = {(h.site, h.device) for h in self._holds.values()}
            for key, c in self._device_holds.items():
                c["held"] = key in held_now
        for hold in lines:
            if hold.reason == shares.RATE:
                log.warning(
                    "node %s sends faster than device_rate_limit (%s): its readings are held back; others continue",
                    quote(hold.device), self.config.device_rate_limit,
                )
            elif hold.reason == shares.CAP:
                log.warning(
                    "node %s holds %s rows, its cap (device_share_cap): its readings are held back; others continue",
                    quote(hold.device), f"{adm.counts.get(hold.device, 0):,}",
                )
            else:
                log.warning(
                    "node %s holds %s of %s rows: its readings are held back; others continue",
                    quote(hold.device), f"{adm.counts.get(hold.device, 0):,}", f"{adm.capacity:,}",
                )

    def _device_counter(self, site: str, device: str) -> dict:
        key = (site, device)
        c = self._device_holds.get(key)
        if c is None:
            if len(self._device_holds) >= MAX_DEVICE_COUNTERS:
                self._device_holds.pop(next(iter(self._device_holds)))
            c = self._device_holds[key] = {"held_back": 0, "holds": 0, "reason": "", "held": True}
        return c

    def _hint_holds(self, now: float) -> None:
        """Ask each held node that would be admitted now to send again from its hole: the node
        ack of the last reading committed before it, repeated (see :mod:`tern.edge.shares`)."""
        adm = self.outbox.admission(floor=self.config.device_share_floor, cap=self.config.device_share_cap)
        sent = 0
        for hold in list(self._holds.values())[:1000]:  # bounded work per pass
            if hold.from_seq < 1 or now - hold.hinted_at < shares.HINT_EVERY_S:
                continue
            if self._rates is not None and not self._rates.allows(hold.device, now):
                continue
            if adm.admit(hold.device, 1) != shares.ADMIT:
                continue
            hold.hinted_at = now
            self.client.publish(
                topics.ack_topic(hold.site, hold.device), codec.encode_node_ack(NodeAck(hold.boot, hold.from_seq - 1)), qos=1
            )
            sent += 1
        if sent:
            with self._lock:
                self._counts["resend_hints"] += sent

    @staticmethod
    def _junk_key(item: _Incoming) -> tuple[str, str]:
        return item.topic, hashlib.sha256(item.payload).hexdigest()

    def _repeated_junk(self, item: _Incoming, junk: list[tuple[str, str]]) -> bool:
        """True for a retained message already dead-lettered (re-delivered by a subscribe):
        acked, counted, not stored again. Junk on a status topic (always retained by nodes)
        or delivered as retained is noted in ``junk`` to be remembered once committed."""
        if not (item.retain or item.topic.endswith("/" + topics.STATUS)):
            return False
        key = self._junk_key(item)
        if item.retain and (key in junk or self.outbox.known_junk(*key)):
            return True
        junk.append(key)
        return False

    def _note_node_acks(self, readings: list[Reading]) -> None:
        """Note, per (device, boot) in the group, the highest seq committed: acked by
        :meth:`_flush_node_acks`, now or (a node acked less than NODE_ACK_EVERY_S ago) then.

        Duplicates are acked too: a node that re-sent because it missed our ack needs one.
        """
        due = self._acks_due
        for r in readings:
            key = (r.site, r.device, r.boot)
            seq = due.get(key)
            if seq is None or r.seq > seq:
                due[key] = r.seq

    def _flush_node_acks(self, force: bool = False) -> None:
        """Publish the node acks that are due (QoS 1): each node's at most once per NODE_ACK_EVERY_S."""
        if not self._acks_due:
            self._next_ack_flush = float("inf")
            return
        now = time.monotonic()
        acked_at = self._acked_at
        later: dict[tuple[str, str, str], int] = {}
        sent = 0
        for key, seq in self._acks_due.items():
            last = acked_at.get(key)
            if not force and last is not None and now - last < NODE_ACK_EVERY_S and key not in self._acks_urgent:
                later[key] = seq
                continue
            site, device, boot = key
            self.client.publish(topics.ack_topic(site, device), codec.encode_node_ack(NodeAck(boot, seq)), qos=1)
            acked_at[key] = now
            sent += 1
        self._acks_due = later
        self._acks_urgent.clear()
        # Forget nodes acked long enough ago: they are no longer limited (bounded memory).
        if len(acked_at) > len(later) * 2 + 1000:
            self._acked_at = {k: t for k, t in acked_at.items() if now - t < NODE_ACK_EVERY_S}
        self._next_ack_flush = (
            min(acked_at[k] for k in later) + NODE_ACK_EVERY_S if later else float("inf")
        )
        if sent:
            with self._lock:
                self._counts["node_acks"] += sent

    def _note_blocked(self, blocked: bool) -> None:
        with self._lock:
            if blocked and not self._blocked:
                self._counts["backpressure_events"] += 1
                policy = self.outbox.retention
                bounds = f"{policy.max_rows} rows" + (f", {policy.max_bytes} bytes" if policy.max_bytes else "")
                log.warning(
                    "outbox full (%s, policy %s): not acking new readings; the broker session holds them",
                    bounds,
                    policy.telemetry,
                )
            elif self._blocked and not blocked:
                log.info("outbox has room again: acking resumed")
            self._blocked = blocked

"""Uplink: outbox rows to the cloud broker in batches, deleted only once the bridge confirms them.

Pipelined: up to ``uplink_window`` (W) batches are in flight at once. Devices are spread over W
*lanes* by a stable hash of their id (CRC-32, the same on every run and machine), and a lane
has at most one batch in flight, so a device's readings are never in two in-flight batches:
whichever bridge writes which batch, and in whatever order the confirms come back, each
device's readings reach Kafka in order. A confirm frees its lane and hands exactly its batch's
rows to the *deleter*, a thread with an outbox connection of its own: the delete's commit
(an fsync) then runs while the next batches are read, encoded and sent. Until it is committed
the rows stay held (the read cursor stays above them), so they are never read again. The
deleter waits briefly (``DELETE_GATHER_S``) for a confirm per lane and deletes them together:
the lanes' batches interleave in the outbox, so one delete of all of them writes each page once.

Rows are read from the outbox in arrival order into small per-lane queues (bounded). A lane's
batch leaves when it has ``batch_size`` readings, or about ``batch_max_bytes`` of envelope, or
its oldest reading has waited ``batch_linger_ms``: a quiet site forwards within about the
linger, a backlog goes out in full envelopes on every lane at once.

Command outcomes (:mod:`tern.edge.commands`) ride along like drop events, in the ``outcomes/1``
envelope extension: at most one batch carrying outcomes is in flight (so a command's
``delivered`` never overtakes its ``done``), and they are deleted only on its confirm.

Dead letters (payloads the nodes sent that broke the contract, kept in the outbox) ride along the
same way, in the ``deadletters/1`` extension, at most 50 per batch, cut to 2 KiB each: a batch
claims them durably, a re-send carries the same ones, and only its confirm marks them forwarded
(the outbox keeps them as evidence), so each reaches the cloud once a confirm came back.

Hold events (devices held back by their share of the outbox or their rate, :mod:`tern.edge.shares`)
ride along like drop events too, in the ``holds/1`` extension, at most 1000 per batch: claimed
durably by a batch, carried again by its re-send, deleted only on its confirm.

Node status events travel with the batches too, and never wait behind the backlog or behind
another device's status. Their ordering rule is per device, like the lanes for readings: a
device's status events are never in two batches in flight at once (so its births and wills
reach Kafka in order whichever bridge writes which batch). Every other device's pending events
go in the very next batch published: the next lane batch leaving takes them (the oldest
pending, up to :data:`STATUS_BATCH_MAX`), and if no lane batch leaves in that round (none
ready, none free, or the rate limit holding readings back) they leave at once in a batch of
their own. A device whose earlier status is still in flight waits for that batch's confirm.

Re-sending. QoS 1 on a persistent session already re-delivers what the broker has not
acknowledged (paho re-sends it on reconnect), so re-publishing on a timer while the link or
the bridge is down would only queue copies that are all delivered later. A batch is
published again only when it can really have been lost:

* the broker had no session for us on a reconnect (it restarted without its state, or the
  session expired) and it had already acknowledged the batch: what it held may be gone;
* ``confirm_timeout_s`` passed since the broker's PUBACK while we stayed connected (a bridge
  died holding it, a confirm got lost); the wait doubles on each further attempt.

A re-sent batch keeps its bseq, so the bridge recognises it and confirms it again without
writing it a second time.

``bseq`` comes from the outbox's ``meta`` table, so it keeps increasing across restarts: a
confirm for a batch of an earlier run can never be mistaken for one of this run.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain, islice
from operator import itemgetter
from typing import TYPE_CHECKING, Callable

import paho.mqtt.client as mqtt

from tern.edge.config import GatewayConfig
from tern.edge.outbox import Outbox, StatusRow, is_disk_full, now_ms
from tern.edge.outbox.readings import DEVICE, ID, ITEM, RECEIVED_MS, Staged
from tern.edge.ratelimit import READINGS, TokenBucket, parse_rate
from tern.core import codec, topics
from tern.core.codec import Batch
from tern.core.mqtt_session import PersistentSession
from tern.core.lograte import Throttled
from tern.core.quoting import describe, quote

if TYPE_CHECKING:
    from tern.edge.command_store import CommandStore

log = logging.getLogger(__name__)

#: Status events per batch at most. They are rare (a birth per connect, a will per death) and
#: ~150 bytes each, so this never crowds the readings out of an envelope; a fleet rebooting
#: at once drains in a few batches.
STATUS_BATCH_MAX = 100
#: Re-sends after a PUBACK wait ``confirm_timeout_s``, doubling up to this many times that.
RESEND_BACKOFF_MAX = 8
#: Rows read ahead into the lane queues, in batches' worth per lane.
STAGING_BATCHES = 2
#: How often the forwarder looks for new rows and PUBACKs when it has nothing else to wait for.
POLL_S = 0.01
#: bseqs reserved per durable write (numbers left unused at a stop are skipped, never reused).
BSEQ_BLOCK = 64
#: Confirmed batches waiting for the deleter at most, per lane, before new batches wait too.
DELETE_BACKLOG_BATCHES = 2
#: First guess of a reading's size in a compressed envelope, refined by every encoding.
BYTES_PER_READING_GUESS = 60.0
#: Devices whose lane is remembered at most (forgotten all at once beyond: a site has far fewer).
LANE_CACHE_MAX = 100_000
#: The deleter waits up to this long for a confirm per lane (or for nothing more to be in
#: flight) before deleting: a lane's batch holds every W-th device's rows, so the batches of
#: all lanes together cover a run of the outbox, and deleting them at once rewrites its pages
#: once rather than once per lane (and commits once). Confirmed rows stay held meanwhile.
DELETE_GATHER_S = 0.05


def lane_of(device: str, lanes: int) -> int:
    """The lane of ``device``: a stable hash (CRC-32 of its id), unlike Python's salted hash()."""
    return zlib.crc32(device.encode()) % lanes


@dataclass(slots=True, eq=False)
class _InFlight:
    """One published, unconfirmed batch."""

    bseq: int
    lane: int | None  # None: a batch of status events only
    rows: list[Staged]
    statuses: list[StatusRow]
    payload: bytes
    info: mqtt.MQTTMessageInfo
    #: PersistentSession.new_sessions when (re)published.
    sessions: int
    #: When the broker's PUBACK was seen (monotonic), None until then.
    puback_at: float | None = None
    wait_s: float = 0.0
    attempts: int = 1
    #: Drop events it carries (deleted with its confirm).
    drops: int = 0
    #: When it was last published (monotonic), for the confirm round-trip time.
    published_at: float = field(default_factory=time.monotonic)
    #: Command outcomes it carries (deleted with its confirm).
    outcomes: int = 0
    #: Dead letters it carries (marked forwarded with its confirm).
    deadletters: int = 0
    #: Hold events it carries (deleted with its confirm).
    holds: int = 0


@dataclass(slots=True)
class _Lane:
    queue: deque[Staged] = field(default_factory=deque)
    since: float = 0.0  # monotonic time the queue last went from empty to non-empty
    busy: bool = False


class Uplink:
    """The cloud side of the gateway: publish batches, wait for confirms, delete."""

    def __init__(
        self,
        config: GatewayConfig,
        outbox: Outbox,
        *,
        commands: "CommandStore | None" = None,
        on_confirm_rtt: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._stop = threading.Event()
        self._draining = threading.Event()  # stopping: confirms still count, no new batches
        # Guards _confirms, _counts and _inflight's keys (read by stats()); signalled on a confirm.
        self._cond = threading.Condition()
        self._confirms: list[codec.Confirm] = []
        self._inflight: dict[int, _InFlight] = {}
        # Confirmed batches whose rows the deleter has not deleted yet (still held: never read
        # again), the groups handed to it, and the groups it has deleted, for this thread to
        # let go of. The deleter (a thread of its own) keeps the commits' fsyncs off this one.
        self._deleting: dict[int, _InFlight] = {}
        self._to_delete: list[_InFlight] = []
        self._deleted: list[tuple[list[_InFlight], int]] = []
        self._deleter = threading.Thread(target=self._delete_loop, name=f"tern-confirm-{config.gateway_id}", daemon=True)
        self._lanes = [_Lane() for _ in range(config.uplink_window)]
        self._lane_of: dict[str, int] = {}  # lane_of() per device, as staged (bounded: LANE_CACHE_MAX)
        self._staged = 0
        # Every outbox row with an id up to the cursor is held here (staged or in flight).
        self._cursor = 0
        # Devices with a status event in a batch in flight, and how many events those batches hold.
        self._status_devices: set[str] = set()
        self._statuses_held = 0
        # status_pending() when a take last found nothing it may send (all pending belong to
        # busy devices): no need to look again until that count or the busy set changes.
        self._status_idle: int | None = None
        self._bytes_per_reading = BYTES_PER_READING_GUESS
        self._bseqs = None  # an iterator over reserved bseqs, None when used up
        self._bseqs_left = 0
        self._generation = -1
        self._throttle = Throttled(log, 60.0)
        self._staged_generation = outbox.drop_generation
        self._held_since: float | None = None  # since when the rate limit holds readings back
        self._failing = False
        #: Called with the seconds from a batch's (last) publish to its confirm (metrics, status).
        self.on_confirm_rtt = on_confirm_rtt
        #: Where command outcomes wait (None: this uplink carries none).
        self.commands = commands
        self._outcome_batch: int | None = None
        self._counts = {
            "batches_sent": 0,
            "batches_resent": 0,
            "batches_confirmed": 0,
            "forwarded": 0,
            "status_forwarded": 0,
            "deadletters_forwarded": 0,
            "hold_events_forwarded": 0,
            "confirms_ignored": 0,
            "publish_errors": 0,
            # Delete transactions (each takes every batch confirmed meanwhile, see DELETE_GATHER_S).
            "deletes": 0,
        }
        self._topic = topics.batch_topic(config.gateway_id)
        self._confirm_topic = topics.confirm_topic(config.gateway_id)
        self._thread = threading.Thread(target=self._run, name=f"tern-uplink-{config.gateway_id}", daemon=True)
        # Metered links: the optional uplink_rate_limit, consulted before each publish.
        limit = getattr(config, "uplink_rate_limit", None)
        self._limiter = TokenBucket(parse_rate(limit)) if limit else None
        host, port = config.cloud_hostport
        self.session = PersistentSession(
            config.uplink_client_id,
            host,
            port,
            [(self._confirm_topic, 1)],
            self._on_message,
            keepalive=config.keepalive_s,
            reconnect_max_s=config.reconnect_max_s,
            # W batches plus the confirms' PUBACKs; paho's own window must not be the limit.
            max_inflight=max(100, 4 * config.uplink_window),
            name="uplink",
            broker=f"the cloud broker {config.cloud_broker}",
            lost_hint="readings accumulate in the outbox",
            takeover_hint=config.takeover_hint(),
            logger=log,
            **config.cloud_auth(),
        )
        self.client = self.session.client
        # A commit (readings or statuses) wakes the forwarder: it looks now, not at the next poll.
        outbox.on_commit = self.nudge

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background) to the cloud broker and start forwarding."""
        self.session.start()
        self._deleter.start()
        self._thread.start()

    def nudge(self) -> None:
        """Something new to send (a command outcome, a status event): look now rather than at the next poll."""
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop forwarding and disconnect; unconfirmed rows simply stay in the outbox.

        Batches in flight get most of ``timeout`` to be confirmed first (no new ones leave
        meanwhile): a batch confirmed now is not sent again, under a new bseq, by the next run.
        """
        deadline = time.monotonic() + timeout
        self._draining.set()
        if self._thread.is_alive() and self.session.connected:
            with self._cond:
                self._cond.wait_for(lambda: not self._inflight and not self._deleting,
                                    max(0.0, deadline - time.monotonic() - 0.5))
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        # Confirmed batches still being deleted are deleted before the outbox closes.
        if self._deleter.is_alive():
            self._deleter.join(max(0.5, deadline - time.monotonic()))
        self.session.stop()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed to confirms on the cloud broker."""
        return self.session.connected

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed on the cloud broker (or ``timeout``)."""
        return self.session.wait_connected(timeout)

    def stats(self) -> dict:
        """Counters since start; ``inflight_bseq`` is the oldest batch in flight (None if none)."""
        with self._cond:
            out = dict(self._counts)
            inflight = list(self._inflight)
            status_batches = sum(1 for b in self._inflight.values() if b.statuses)
        out["inflight_bseq"] = min(inflight) if inflight else None
        out["inflight_batches"] = len(inflight)
        out["status_batches_in_flight"] = status_batches
        if self._limiter is not None:
            out.update(self._limiter.stats())
        out["cloud_connected"] = self.connected
        out["cloud_session_takeovers"] = self.session.takeovers
        out["cloud_session_contested"] = self.session.contested
        return out

    # --- paho's network thread --------------------------------------------------------------

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            confirm = codec.decode_confirm(msg.payload)
        except codec.CodecError as exc:
            self._ignore(f"garbage on {quote(msg.topic)}: {describe(exc)}")
            return
        with self._cond:
            self._confirms.append(confirm)
            self._cond.notify_all()

    def _ignore(self, why: str) -> None:
        with self._cond:
            self._counts["confirms_ignored"] += 1
        log.info("ignored confirm: %s", why)

    # --- forwarder -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
                if self._failing:
                    self._failing = False
                    self._throttle.clear("step", "forwarding works again")
            except Exception as exc:  # never let the forwarder die; the rows stay in the outbox
                with self._cond:
                    self._counts["publish_errors"] += 1
                self._failing = True
                # A persisting fault (a full disk: confirmed rows cannot be deleted) is one line
                # a minute, not a traceback a second; the batches are re-sent and de-duplicated.
                if is_disk_full(exc):
                    why = f"the outbox {self.outbox.path} is full: confirmed batches cannot be deleted yet"
                else:
                    why = f"forwarding failed: {describe(exc)}"
                if self._throttle.log(logging.ERROR, "step", f"{why}; retrying every second, nothing is lost"):
                    # A bug's traceback is worth a line a minute; a full disk's is not.
                    log.log(logging.DEBUG if is_disk_full(exc) else logging.ERROR, "the failure:", exc_info=True)
                self._stop.wait(1.0)

    def _step(self) -> None:
        """One round: apply confirms, read new rows, re-send what may be lost, send what is ready,
        then sleep until the next thing can happen."""
        self._apply_confirms()
        self._apply_deleted()
        self._refill()
        connected = self.session.connected
        now = time.monotonic()
        wake = now + 0.5
        if connected:
            wake = min(wake, self._check_resends(now))
            if not self._draining.is_set():
                wake = min(wake, self._send_ready(now))
        # New rows and PUBACKs are polled for (cheap: two counters and a flag per batch).
        poll = connected and (
            (self._staged < self._staging_cap() and self._unread())
            or (not self._draining.is_set() and self._statuses_due())
            or any(b.puback_at is None for b in self._inflight.values())
        )
        if poll:
            wake = min(wake, now + POLL_S)
        with self._cond:
            if self._confirms or self._deleted or self._stop.is_set():
                return
            self._cond.wait(max(0.0, wake - time.monotonic()))

    def _unread(self) -> bool:
        """True if the outbox holds readings this uplink has not read yet (statuses: :meth:`_statuses_due`)."""
        held = self._staged + sum(len(b.rows) for b in self._inflight.values())
        held += sum(len(b.rows) for b in self._deleting.values())
        return self.outbox.pending() > held

    def _statuses_due(self) -> bool:
        """True if status events may be waiting that no batch in flight holds and that the last
        look did not already find all blocked (their device's earlier status still in flight)."""
        pending = self.outbox.status_pending()
        return pending > self._statuses_held and pending != self._status_idle

    def _apply_confirms(self) -> None:
        with self._cond:
            confirms, self._confirms = self._confirms, []
        done: dict[int, _InFlight] = {}
        for confirm in confirms:
            batch = self._inflight.get(confirm.bseq) if confirm.gateway == self.config.gateway_id else None
            if batch is None or confirm.bseq in done:
                # A late confirm of a re-sent batch, one from an earlier run, another gateway's.
                self._ignore(f"confirm for {confirm.gateway}/{confirm.bseq}, not in flight")
                continue
            done[confirm.bseq] = batch
        if not done:
            return
        if self.on_confirm_rtt is not None:
            now = time.monotonic()
            for batch in done.values():
                self.on_confirm_rtt(now - batch.published_at)
        # The custody rule: only now may these rows go. The deleter deletes them (one
        # transaction for all the batches confirmed meanwhile: one fsync, not one per batch);
        # until it has, they stay held, so nothing reads them again.
        with self._cond:
            for bseq, batch in done.items():
                del self._inflight[bseq]
                self._deleting[bseq] = batch
            self._to_delete.extend(done.values())
            self._counts["batches_confirmed"] += len(done)
            self._cond.notify_all()
        for batch in done.values():
            # Kafka has them: the lane's next batch (later readings of its devices) may go.
            if batch.lane is not None:
                self._lanes[batch.lane].busy = False
            log.debug("batch %d confirmed: %d readings, %d status events", batch.bseq, len(batch.rows), len(batch.statuses))

    def _apply_deleted(self) -> None:
        """Let go of the confirmed batches the deleter has deleted."""
        with self._cond:
            if not self._deleted:
                return
            finished, self._deleted = self._deleted, []
            for group, _ in finished:
                for batch in group:
                    del self._deleting[batch.bseq]
            self._cond.notify_all()  # stop() may be waiting for the last batch
        for group, _ in finished:
            for batch in group:
                if batch.statuses:
                    # These devices' next events (a will behind a birth) may go now: the
                    # confirmed ones are gone from the outbox, so they are not read again.
                    self._status_devices.difference_update(s.event.device for s in batch.statuses)
                    self._statuses_held -= len(batch.statuses)
                    self._status_idle = None
                if self._outcome_batch == batch.bseq:
                    self._outcome_batch = None

    def _delete_loop(self) -> None:
        """The deleter: delete confirmed batches' rows, everything confirmed meanwhile at once."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._to_delete or self._stop.is_set())
                if not self._to_delete:
                    return
                lanes = len(self._lanes)
                self._cond.wait_for(lambda: len(self._to_delete) >= lanes or not self._inflight or self._stop.is_set(),
                                    DELETE_GATHER_S)
                group, self._to_delete = self._to_delete, []
            # map/itemgetter: thousands of rows per delete, walked in C.
            rows = list(chain.from_iterable(b.rows for b in group))
            try:
                deleted = self.outbox.delete(
                    list(map(itemgetter(ID), rows)), [s.id for b in group for s in b.statuses],
                    drop_bseq=[b.bseq for b in group if b.drops],
                    deadletter_bseq=[b.bseq for b in group if b.deadletters],
                    hold_bseq=[b.bseq for b in group if b.holds],
                    per_device=Counter(map(itemgetter(DEVICE), rows)),
                )
                if self.commands is not None:
                    for batch in group:
                        if batch.outcomes:
                            self.commands.delete_outcomes(batch.bseq)
            except Exception as exc:  # the rows stay held and are deleted on the next try
                with self._cond:
                    self._counts["publish_errors"] += 1
                    self._to_delete[:0] = group
                    self._cond.notify_all()
                why = (f"the outbox {self.outbox.path} is full: confirmed batches cannot be deleted yet"
                       if is_disk_full(exc) else f"deleting confirmed batches failed: {describe(exc)}")
                if self._stop.is_set():
                    # Stopping: they stay in the outbox and go again next run (the cloud may
                    # then hold them twice, never none).
                    log.warning("%s; %d confirmed batches stay in the outbox", why, len(group))
                    return
                if self._throttle.log(logging.ERROR, "delete", f"{why}; retrying every second, nothing is lost"):
                    log.log(logging.DEBUG if is_disk_full(exc) else logging.ERROR, "the failure:", exc_info=True)
                self._stop.wait(1.0)
                continue
            self._throttle.clear("delete", "deleting confirmed batches works again")
            with self._cond:
                # Counted here, as the rows leave the outbox: whoever sees the outbox empty sees
                # them forwarded (the uplink's thread lets go of the batches when it next wakes).
                self._counts["deletes"] += 1
                self._counts["forwarded"] += deleted
                self._counts["status_forwarded"] += sum(len(b.statuses) for b in group)
                self._counts["deadletters_forwarded"] += sum(b.deadletters for b in group)
                self._counts["hold_events_forwarded"] += sum(b.holds for b in group)
                self._deleted.append((group, deleted))
                self._cond.notify_all()

    def _staging_cap(self) -> int:
        return len(self._lanes) * self.config.batch_size * STAGING_BATCHES

    def _refill(self) -> None:
        if self.outbox.drop_generation != self._staged_generation:
            self._restage()
        room = self._staging_cap() - self._staged
        if room <= 0 or not self._unread():
            return
        # Staged rows are not protected from retention until they leave (protect() in
        # _publish_lane): read-ahead must not make a full outbox undroppable. Reading while the
        # deleter deletes is safe: reading ids are never reused (outbox/readings.py insert).
        rows = self.outbox.take_staged(room, after_id=self._cursor)
        self._stage(rows)
        if rows:
            self._cursor = rows[-1][ID]

    def _stage(self, rows: list[Staged]) -> None:
        now = time.monotonic()
        lanes, known = self._lanes, self._lane_of
        if len(known) > LANE_CACHE_MAX:
            known.clear()
        for row in rows:
            device = row[DEVICE]
            index = known.get(device)
            if index is None:
                index = known[device] = lane_of(device, len(lanes))
            lane = lanes[index]
            if not lane.queue:
                lane.since = now
            lane.queue.append(row)
        self._staged += len(rows)

    def _restage(self) -> None:
        """Retention dropped readings, maybe staged ones: read the staged rows again.

        Everything up to the cursor was held before; after the drop, what is still there up to
        the cursor is the rows in flight (protected, untouched) plus what is left of the staged
        ones, which are read again in order, so the cursor's promise holds again.
        """
        generation = self.outbox.drop_generation
        in_flight = {r[ID] for b in (*self._inflight.values(), *self._deleting.values()) for r in b.rows}
        limit = self._staged + len(in_flight)
        rows = self.outbox.take_staged(limit, after_id=0) if limit else []
        self._staged_generation = generation
        for lane in self._lanes:
            lane.queue.clear()
        self._staged = 0
        self._stage([r for r in rows if r[ID] <= self._cursor and r[ID] not in in_flight])

    def _ready(self, lane: _Lane, now: float) -> float | None:
        """None if ``lane``'s batch should leave now, else when it will (monotonic)."""
        if len(lane.queue) >= self.config.batch_size:
            return None
        if len(lane.queue) * self._bytes_per_reading >= self.config.batch_max_bytes:
            return None
        linger = self.config.batch_linger_ms / 1000
        # The oldest reading's own age counts too: a backlog never lingers.
        age = max(now - lane.since, (now_ms() - lane.queue[0][RECEIVED_MS]) / 1000)
        if age >= linger:
            return None
        return now + linger - age

    def _send_ready(self, now: float) -> float:
        """Publish a batch on every free lane that is ready; the next time one will be."""
        wake = now + 0.5
        for index, lane in enumerate(self._lanes):
            if len(self._deleting) >= DELETE_BACKLOG_BATCHES * len(self._lanes):
                # The deleter is behind (a slow disk): no more readings leave until it catches
                # up, so confirmed rows held in memory stay bounded. It wakes this thread.
                break
            if lane.busy or not lane.queue:
                continue
            when = self._ready(lane, now)
            if when is not None:
                wake = min(wake, when)
                continue
            if self._limiter is not None:
                wait = self._limiter.delay()
                if wait > 0:
                    # Metered link: readings wait for the bucket; status events still go alone below.
                    if self._held_since is None:
                        self._held_since = now
                    wake = min(wake, now + wait)
                    break
                if self._held_since is not None:
                    self._limiter.note_waited(now - self._held_since)
                    self._held_since = None
            # The lane's batch takes the status events due (see _publish_new).
            if not self._publish_lane(index, lane):
                break  # the lanes were read again: their readiness is judged next round
        if self._statuses_due():
            # No lane batch left with them: they go alone, now (no linger, no rate limit, no
            # free lane needed).
            statuses = self._take_statuses()
            if statuses:
                self._publish_new(None, [], statuses)
                return wake
        if not self._inflight and (self.outbox.drops_unclaimed() or self._outcomes_due()
                                   or self.outbox.dead_letters_unclaimed() or self.outbox.holds_unclaimed()):
            # Drop events alone (readings expired by age on an idle site) are worth a batch
            # too, and so are command outcomes, dead letters and hold events.
            self._publish_new(None, [], [])
        return wake

    def _outcomes_due(self) -> bool:
        """True if command outcomes wait and no batch carrying outcomes is in flight."""
        return self.commands is not None and self._outcome_batch is None and self.commands.outcomes_unclaimed() > 0

    def _take_statuses(self) -> list[StatusRow]:
        """The oldest pending status events of the devices with none in flight (per device
        oldest first, so a device's events leave in order, one batch at a time)."""
        pending = self.outbox.status_pending()  # read first: a status added meanwhile changes it
        statuses = self.outbox.take_statuses(STATUS_BATCH_MAX, busy=self._status_devices)
        self._status_idle = None if statuses else pending
        return statuses

    def _publish_lane(self, index: int, lane: _Lane) -> bool:
        count = min(len(lane.queue), self.config.batch_size)
        count = max(1, min(count, int(self.config.batch_max_bytes / self._bytes_per_reading)))
        rows = list(islice(lane.queue, count))
        if not self.outbox.protect(rows[-1][ID], self._staged_generation):
            # Retention dropped readings since they were read: read again, send next round.
            self._restage()
            return False
        sent = self._publish_new(index, rows)
        for _ in range(sent):
            lane.queue.popleft()
        self._staged -= sent
        lane.since = time.monotonic()
        return True

    def _encode(
        self, rows: list[Staged], statuses: list[StatusRow], bseq: int, drops: tuple = (), outcomes: tuple = (),
        deadletters: tuple = (), holds: tuple = (),
    ) -> tuple[list[Staged], bytes]:
        """Encode as many of ``rows`` as fit ``batch_max_bytes`` with ``statuses``, ``drops``,
        ``outcomes``, ``deadletters`` and ``holds`` (shrinking the readings; the rest always goes: each is
        bounded per batch, together far below the envelope's hard limit)."""
        events = tuple(s.event for s in statuses)
        limit = self.config.batch_max_bytes
        # Each row's item as read (built by SQLite from the stored columns, values unparsed).
        items = list(map(itemgetter(ITEM), rows))
        while True:
            batch = Batch(self.config.gateway_id, bseq, now_ms(), (), events, drops, outcomes, deadletters, holds)
            try:
                payload = codec.encode_batch(batch, items[: len(rows)])
            except codec.CodecError:
                if len(rows) <= 1:
                    raise
                rows = rows[: len(rows) // 2]
                continue
            if rows:
                per = len(payload) / len(rows)
                self._bytes_per_reading = 0.8 * self._bytes_per_reading + 0.2 * per
            if len(payload) <= limit or len(rows) <= 1:
                return rows, payload
            rows = rows[: max(1, int(len(rows) * limit / len(payload) * 0.9))]

    def _publish_new(self, lane: int | None, rows: list[Staged], statuses: list[StatusRow] | None = None) -> int:
        """Publish a new batch of ``rows`` (a prefix of them if the envelope is full) and
        ``statuses`` (None: the status events due now, taken just before encoding, so that a
        status committed before this batch is encoded rides in it); returns how many rows it took."""
        bseq = self._next_bseq()
        # Drop events ride along (the drops/1 extension) and go on the same confirm; the
        # cached count spares an outbox transaction per batch when there are none.
        drops = tuple(self.outbox.claim_drops(bseq)) if self.outbox.drops_unclaimed() else ()
        outcomes: tuple = ()
        if self._outcomes_due():
            assert self.commands is not None
            outcomes = tuple(self.commands.claim_outcomes(bseq, codec.MAX_OUTCOMES_PER_BATCH))
        # Dead letters likewise (deadletters/1): claimed by this bseq, marked forwarded on its confirm.
        deadletters = tuple(self.outbox.claim_dead_letters(bseq)) if self.outbox.dead_letters_unclaimed() else ()
        # Hold events likewise (holds/1): claimed by this bseq, deleted on its confirm.
        holds = tuple(self.outbox.claim_holds(bseq)) if self.outbox.holds_unclaimed() else ()
        if statuses is None:
            statuses = self._take_statuses() if self._statuses_due() else []
        rows, payload = self._encode(rows, statuses, bseq, drops, outcomes, deadletters, holds)
        if self._limiter is not None and rows:
            # Readings or bytes, as the limit counts; a batch of status (and drop) events alone
            # rides free: a node that died is reported at once.
            self._limiter.take(len(rows) if self._limiter.rate.unit == READINGS else len(payload))
        info = self.client.publish(self._topic, payload, qos=1)
        batch = _InFlight(bseq, lane, rows, statuses, payload, info, self.session.new_sessions,
                          wait_s=self.config.confirm_timeout_s, drops=len(drops), outcomes=len(outcomes),
                          deadletters=len(deadletters), holds=len(holds))
        with self._cond:
            self._inflight[bseq] = batch
            self._counts["batches_sent"] += 1
        if lane is not None:
            self._lanes[lane].busy = True
        if statuses:
            self._status_devices.update(s.event.device for s in statuses)
            self._statuses_held += len(statuses)
        if outcomes:
            self._outcome_batch = bseq
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # paho keeps it queued and sends it on reconnect.
            log.warning("publishing batch %d: %s; paho sends it on reconnect", bseq, mqtt.error_string(info.rc))
        return len(rows)

    def _next_bseq(self) -> int:
        # Reserved a window's worth at a time: one durable write per W batches, not per batch.
        if not self._bseqs:
            self._bseqs = iter(self.outbox.reserve_bseqs(BSEQ_BLOCK))
            self._bseqs_left = BSEQ_BLOCK
        self._bseqs_left -= 1
        bseq = next(self._bseqs)
        if self._bseqs_left == 0:
            self._bseqs = None
        return bseq

    def _check_resends(self, now: float) -> float:
        """Re-publish the batches that may have been lost; the next time one may need it."""
        wake = now + 0.5
        generation = self.session.generation
        reconnected = generation != self._generation
        self._generation = generation
        sessions = self.session.new_sessions
        for batch in list(self._inflight.values()):
            if batch.puback_at is None and batch.info.is_published():
                batch.puback_at = now
            if batch.puback_at is None:
                # Not acknowledged by the broker: paho holds it and re-sends it on reconnect.
                batch.sessions = sessions
                continue
            if batch.sessions != sessions:
                why = "the broker lost our session after acknowledging it"
            elif now - batch.puback_at >= batch.wait_s:
                why = f"no confirm {batch.wait_s:.1f} s after the broker acknowledged it"
            else:
                if reconnected:
                    # The session survived: a confirm held for us arrives now; time from here.
                    batch.puback_at = max(batch.puback_at, now - batch.wait_s / 2)
                wake = min(wake, batch.puback_at + batch.wait_s)
                continue
            log.warning("re-sending batch %d (%d readings, %d status events): %s",
                        batch.bseq, len(batch.rows), len(batch.statuses), why)
            batch.info = self.client.publish(self._topic, batch.payload, qos=1)
            batch.published_at = now
            batch.sessions = sessions
            batch.puback_at = None
            batch.attempts += 1
            batch.wait_s = min(batch.wait_s * 2, self.config.confirm_timeout_s * RESEND_BACKOFF_MAX)
            with self._cond:
                self._counts["batches_resent"] += 1
        return wake

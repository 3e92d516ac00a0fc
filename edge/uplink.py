"""Uplink: outbox rows to the cloud broker in batches, deleted only once the bridge confirms them.

A batch carries the oldest pending readings (up to ``batch_size``) and the oldest pending node
status events (up to :data:`STATUS_BATCH_MAX`); the confirm covers both, and both are deleted
in one transaction. A batch may hold status events and no reading (a node died, nothing else
is happening), or readings and no status event (the usual case).

One batch is in flight at a time, so batches leave (and are confirmed) in outbox order and
per-device order needs no further bookkeeping. A batch that is not confirmed within
``confirm_timeout_s`` is published again (same rows, same bseq); the bridge and Kafka
consumers de-duplicate on each reading's (device, boot, seq).

``bseq`` comes from the outbox's ``meta`` table, so it keeps increasing across restarts: a
confirm for a batch of an earlier run can never be mistaken for the current one.
"""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as mqtt

from tern.edge.config import GatewayConfig
from tern.edge.outbox import Outbox, OutboxRow, StatusRow, now_ms
from tern.edge.ratelimit import READINGS, TokenBucket, parse_rate
from tern.core import codec, topics
from tern.core.codec import Batch
from tern.core.mqtt_session import PersistentSession

log = logging.getLogger(__name__)

#: Status events per batch at most. They are rare (a birth per connect, a will per death) and
#: ~150 bytes each, so this never crowds the readings out of an envelope; a fleet rebooting
#: at once drains in a few batches.
STATUS_BATCH_MAX = 100


class Uplink:
    """The cloud side of the gateway: publish batches, wait for confirms, delete."""

    def __init__(self, config: GatewayConfig, outbox: Outbox) -> None:
        self.config = config
        self.outbox = outbox
        self._stop = threading.Event()
        # Guards _inflight/_confirmed; signalled when a matching confirm arrives.
        self._cond = threading.Condition()
        self._inflight: int | None = None
        self._confirmed: int | None = None
        self._counts = {
            "batches_sent": 0,
            "batches_resent": 0,
            "batches_confirmed": 0,
            "forwarded": 0,
            "status_forwarded": 0,
            "confirms_ignored": 0,
            "publish_errors": 0,
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
            name="uplink",
            broker=f"the cloud broker {config.cloud_broker}",
            lost_hint="readings accumulate in the outbox",
            logger=log,
            **config.cloud_auth(),
        )
        self.client = self.session.client

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background) to the cloud broker and start forwarding."""
        self.session.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop forwarding and disconnect; unconfirmed rows simply stay in the outbox."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.session.stop()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed to confirms on the cloud broker."""
        return self.session.connected

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed on the cloud broker (or ``timeout``)."""
        return self.session.wait_connected(timeout)

    def stats(self) -> dict:
        """Counters since start."""
        with self._cond:
            out = dict(self._counts)
            out["inflight_bseq"] = self._inflight
        if self._limiter is not None:
            out.update(self._limiter.stats())
        out["cloud_connected"] = self.connected
        return out

    # --- paho's network thread --------------------------------------------------------------

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            confirm = codec.decode_confirm(msg.payload)
        except codec.CodecError as exc:
            self._ignore(f"garbage on {msg.topic!r}: {exc}")
            return
        with self._cond:
            if confirm.gateway == self.config.gateway_id and confirm.bseq == self._inflight:
                self._confirmed = confirm.bseq
                self._cond.notify_all()
                return
            inflight = self._inflight
        # Late confirms of a batch already re-sent under a newer bseq, or of another gateway.
        self._ignore(f"confirm for {confirm.gateway}/{confirm.bseq} while {inflight} is in flight")

    def _ignore(self, why: str) -> None:
        with self._cond:
            self._counts["confirms_ignored"] += 1
        log.info("ignored confirm: %s", why)

    # --- forwarder -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.outbox.wait_for_rows(0.5) or self._stop.is_set():
                    continue
                rows = self.outbox.take(self.config.batch_size)
                statuses = self.outbox.take_statuses(STATUS_BATCH_MAX)
                # Drop events alone (readings expired by age) are worth a batch too.
                if rows or statuses or self.outbox.drops_unclaimed():
                    self._forward(rows, statuses)
            except Exception:  # never let the forwarder die; the rows stay in the outbox
                with self._cond:
                    self._counts["publish_errors"] += 1
                log.exception("forwarding failed; retrying")
                self._stop.wait(1.0)

    def _encode(
        self, rows: list[OutboxRow], statuses: list[StatusRow], bseq: int, drops: tuple = ()
    ) -> tuple[list[OutboxRow], bytes]:
        """Encode as many of ``rows`` as fit one envelope with ``statuses`` and ``drops`` (halving
        the readings on the size limit; the few small status and drop events always go)."""
        events = tuple(s.event for s in statuses)
        while True:
            batch = Batch(self.config.gateway_id, bseq, now_ms(), tuple(r.reading for r in rows), events, drops)
            try:
                return rows, codec.encode_batch(batch)
            except codec.CodecError:
                if len(rows) <= 1:
                    raise
                rows = rows[: len(rows) // 2]

    def _forward(self, rows: list[OutboxRow], statuses: list[StatusRow]) -> None:
        """Publish one batch until it is confirmed (or we are stopping), then delete its rows."""
        bseq = self.outbox.next_bseq()
        # Drop events ride along (the drops/1 extension) and go on the same confirm.
        rows, payload = self._encode(rows, statuses, bseq, tuple(self.outbox.claim_drops(bseq)))
        with self._cond:
            self._inflight = bseq
            self._confirmed = None
        attempts = 0
        try:
            while not self._stop.is_set():
                # Publishing while disconnected would only pile copies up in paho's queue.
                if not self.session.wait_connected(0.5):
                    continue
                if self._limiter is not None:
                    # Readings or bytes, as the limit counts; a batch of status (and drop)
                    # events alone rides free: a node that died is reported at once.
                    cost = 0 if not rows else len(rows) if self._limiter.rate.unit == READINGS else len(payload)
                    if not self._limiter.acquire(cost, self._stop):
                        break
                info = self.client.publish(self._topic, payload, qos=1)
                attempts += 1
                with self._cond:
                    self._counts["batches_sent" if attempts == 1 else "batches_resent"] += 1
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    log.warning("publishing batch %d failed (%s); retrying", bseq, mqtt.error_string(info.rc))
                with self._cond:
                    confirmed = self._cond.wait_for(
                        lambda: self._confirmed == bseq or self._stop.is_set(), self.config.confirm_timeout_s
                    )
                    confirmed = self._confirmed == bseq
                if confirmed:
                    # The custody rule: only now may these rows go.
                    deleted = self.outbox.delete((r.id for r in rows), (s.id for s in statuses), drop_bseq=bseq)
                    with self._cond:
                        self._counts["batches_confirmed"] += 1
                        self._counts["forwarded"] += deleted
                        self._counts["status_forwarded"] += len(statuses)
                    log.debug("batch %d confirmed: %d readings, %d status events", bseq, deleted, len(statuses))
                    return
                if not self._stop.is_set():
                    log.warning(
                        "no confirm for batch %d (%d readings, %d status events) within %.1f s; re-sending",
                        bseq,
                        len(rows),
                        len(statuses),
                        self.config.confirm_timeout_s,
                    )
        finally:
            with self._cond:
                self._inflight = None

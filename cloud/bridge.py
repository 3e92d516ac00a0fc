"""The cloud bridge: gateway batches on MQTT → reading and node status records in Kafka, losslessly.

The one rule everything here serves: **an MQTT message is acknowledged (PUBACK) only after
Kafka has acknowledged what it carried.** Until then the broker's persistent session keeps
it and redelivers it if the bridge dies, so a crash, a Kafka outage or a restart costs at
most duplicates, never data.

Threads: paho runs its network thread (``loop_start``) and only enqueues received messages
onto the asyncio loop (``call_soon_threadsafe``). The asyncio side owns the Kafka producer.
It takes batches in receive order and starts each one's Kafka write at once, without waiting
for the ones before (at most ``max_inflight_records`` readings are being written at a time):
each batch's confirm is published as soon as Kafka has acknowledged all of it, while PUBACKs
still leave strictly in receive order, as MQTT requires (a batch done early waits, already
confirmed, for the ones received before it). Per-device order needs nothing more: a gateway
never has two batches holding one device in flight at once.

A gateway re-sends a batch whose confirm it has not seen in a long while (the bridge holding
it may have died). The bridge remembers the last ``dedup_window`` batches it wrote, by
(gateway, bseq, payload digest): a copy is confirmed again without being written, and
counted as ``duplicates_received``. With ``share_group`` set, N bridges split the batches on a
shared subscription; a copy then may reach another bridge, which writes it (at-least-once).

Poison input (a payload that is not a valid batch, a topic that is not a batch topic) is
written raw to the dead-letter topic with its MQTT metadata and then acknowledged: it can
never succeed, and holding it would stall every gateway behind it. Payloads above
``deadletter_max_bytes`` are stored truncated, with their size and SHA-256 in headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Sequence

import paho.mqtt.client as mqtt
from aiokafka.errors import KafkaError
from paho.mqtt.enums import MQTTErrorCode

from tern.cloud import presence
from tern.cloud.config import BridgeConfig
from tern.cloud.kafka_sink import KafkaSink, KafkaWriteError
from tern.cloud.kafka_security import credentials_refused
from tern.cloud.metrics import BridgeMonitor
from tern.cloud.topic_setup import TopicSetupError, ensure_topics
from tern.core import codec, topics
from tern.core.errors import CodecError, TernError
from tern.core.mqtt_session import PersistentSession
from tern.core.quoting import describe, quote, shorten

if TYPE_CHECKING:
    from tern.cloud.command_router import CommandRouter

log = logging.getLogger("tern.bridge")


class BridgeError(TernError, RuntimeError):
    """The bridge could not start (or died); the message says why."""


class _Stale(Exception):
    """Internal: the delivery's connection is gone; give it up (the broker redelivers it)."""


@dataclass(slots=True, eq=False)  # identity, not value: two redeliveries are two items
class _Delivery:
    """One MQTT message as received, with the connection generation it arrived on."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    generation: int
    received_ms: int
    received_mono: float
    #: Set once the delivery is settled (written, dead-lettered, a known copy, or given up).
    done: bool = False
    #: Whether it may be PUBACKed once settled (False: given up, the broker must redeliver it).
    ackable: bool = False
    #: True while its Kafka write is waiting to be retried.
    retrying: bool = False


@dataclass(slots=True, frozen=True)
class _Job:
    """What one delivery asks of Kafka: a batch's records, or (``batch`` None) why it is poison."""

    #: The batch, without its readings (their records are ``readings``), or None.
    batch: codec.Batch | None
    #: The records of its readings, made as the sink reads them (codec.decode_batch_records).
    readings: Sequence[codec.KafkaRecord] = ()
    #: Its other records: status, drop and hold events, command outcomes, dead letters.
    others: Sequence[codec.KafkaRecord] = ()
    poison: str = ""

    @property
    def count(self) -> int:
        """Records it writes (a poison payload: its one dead letter)."""
        return len(self.readings) + len(self.others) if self.batch is not None else 1


#: On a graceful stop, batches being written get this long to finish (and be acked, confirmed).
STOP_DRAIN_S = 5.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Bridge:
    """One bridge instance. ``await Bridge(config).run(stop)`` runs it until ``stop`` is set.

    Counters (see :meth:`stats`) follow EMQX's data-integration metrics: ``matched`` batches
    received, ``records_written`` (readings), ``status_written`` (node status events),
    ``batches_confirmed``, ``deadlettered``, ``retries`` of
    failed Kafka writes, ``inflight`` messages received but not yet acknowledged,
    ``duplicates_received`` copies of batches already written (confirmed again, not written),
    ``records_inflight`` and ``batches_writing`` for the Kafka writes under way,
    ``mqtt_dup_flags`` messages the broker marked as redelivered, ``gateway_deadletters_written``
    the gateways' dead letters (``deadletters/1``) written to the dead-letter topic, ``holds_written``
    the hold events (``holds/1``) written to the status topic.
    """

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self._counters: Counter[str] = Counter()
        self._inflight: list[_Delivery] = []  # received, not yet acked; oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Delivery] | None = None
        self._session: PersistentSession | None = None
        self._sink: KafkaSink | None = None
        # Receive order, for PUBACKs: the head leaves once it is done.
        self._ack_queue: deque[_Delivery] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._records_inflight = 0
        #: The command router (with ``config.commands``), else None.
        self.router: "CommandRouter | None" = None
        self._room: asyncio.Condition | None = None
        # (gateway, bseq, digest) -> future set True once written (False: given up, not written).
        self._written: OrderedDict[tuple[str, int, bytes], asyncio.Future] = OrderedDict()
        # A PUBACK names a packet id, and ids are only meaningful on the connection that
        # delivered the message: after a reconnect the broker resends unacked messages and
        # may reuse an acked id for another message. So every delivery remembers the
        # session's connection generation and is acked only on that same connection
        # (PersistentSession.ack); stale ones are dropped here because the broker
        # redelivers them on the new connection.
        self._connected = threading.Event()  # the TCP/MQTT connection, subscribed or not

    # --- public ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (safe to call from any thread)."""
        snapshot: dict[str, Any] = {
            name: self._counters.get(name, 0)
            for name in (
                "matched",
                "records_written",
                "status_written",
                "batches_confirmed",
                "deadlettered",
                "retries",
                "kafka_failures",
                "duplicates_received",
                "stale_dropped",
                "mqtt_dup_flags",
                "mqtt_connects",
                "mqtt_disconnects",
                "drops_written",
                "holds_written",
                "outcomes_written",
                "gateway_deadletters_written",
                "kafka_auth_failures",
            )
        }
        inflight = list(self._inflight)
        snapshot["batches_received"] = snapshot["matched"]
        snapshot["inflight"] = len(inflight)
        snapshot["oldest_unacked_age_s"] = round(time.monotonic() - inflight[0].received_mono, 3) if inflight else 0.0
        snapshot["mqtt_connected"] = self._connected.is_set()
        snapshot["records_inflight"] = self._records_inflight
        snapshot["batches_writing"] = len(self._tasks)
        if self.router is not None:
            snapshot.update(self.router.counts)
        return snapshot

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Connect, bridge until ``stop`` is set, then shut down; ``ready`` is set once running.

        Raises BridgeError if MQTT or Kafka cannot be reached at start-up (within
        ``config.connect_timeout_s``), or a topic it needs is missing and cannot be created
        (cloud/topic_setup.py). After start-up, outages are ridden out: MQTT
        reconnects with backoff, Kafka writes are retried with backoff.
        """
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._room = asyncio.Condition()
        if not await self._wait_for_credentials(stop):
            return  # stopped while Kafka still refused the credentials: nothing was started
        try:
            await ensure_topics(self.config)
        except TopicSetupError as exc:
            raise BridgeError(str(exc)) from None
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            raise BridgeError(f"cannot use Kafka at {self.config.kafka_bootstrap} (topics): {describe(exc)}") from None
        sink = KafkaSink(self.config)
        try:
            await sink.start(check_topics=self.config.kafka_topics)
        except KafkaWriteError as exc:
            raise BridgeError(str(exc)) from None
        self._sink = sink
        worker: asyncio.Task | None = None
        router_task: asyncio.Task | None = None
        monitor: BridgeMonitor | None = None
        try:
            await self._connect_mqtt(stop)
            if self.config.metrics_port:
                monitor = await BridgeMonitor(self, sink).start()
            worker = asyncio.create_task(self._work(), name="tern-bridge-worker")
            if self.config.commands:
                router_task = self._start_router(stop)
            log.info("bridge %s running: %s -> %s", self.config.name, self.config.mqtt_broker, self.config.kafka_bootstrap)
            if ready is not None:
                ready.set()
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({worker, stopper} | ({router_task} if router_task else set()),
                               return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if router_task is not None and router_task.done() and not stop.is_set():
                router_task.result()
                raise BridgeError("command router ended unexpectedly")
            if worker.done():
                worker.result()  # a crash of the worker is a bug: surface it
                raise BridgeError("bridge worker ended unexpectedly")
        finally:
            # Stop taking deliveries first; whatever is unacked stays in the broker's
            # session and is redelivered to the next bridge with this name.
            if worker is not None:
                worker.cancel()
                try:
                    await worker
                except (asyncio.CancelledError, Exception):
                    pass
            await self._drain(STOP_DRAIN_S)
            if router_task is not None:
                # Its consumed-but-unpublished command keeps its offset: the next router takes it.
                router_task.cancel()
                await asyncio.gather(router_task, return_exceptions=True)
            if monitor is not None:
                await monitor.stop()
            self._disconnect_mqtt()
            await sink.stop()
            self._sink = None

    async def _wait_for_credentials(self, stop: asyncio.Event) -> bool:
        """With SASL: wait, backing off, until Kafka accepts the bridge's credentials.

        A refusal is logged in one line per attempt (the reason, what to check, when it
        tries again) and the attempts back off from ``retry_initial_s`` doubling to
        ``retry_max_s``: the user may be created after the bridge starts (an init job), and a
        bridge that exited instead would be restarted in a tighter, noisier loop. Nothing is
        taken from MQTT meanwhile, so nothing is confirmed. Returns False if ``stop`` is set
        first; Kafka unreachable is left to the start-up checks that follow.
        """
        cfg = self.config
        delay = cfg.retry_initial_s
        refused = 0
        while not stop.is_set():
            reason = await credentials_refused(cfg.kafka_servers, cfg.kafka_security, cfg.connect_timeout_s)
            if reason is None:
                if refused:
                    log.info("Kafka accepted the bridge's credentials after %d refusals", refused)
                return True
            refused += 1
            self._counters["kafka_auth_failures"] += 1
            log.error("Kafka at %s refused the bridge's credentials (%s): %s; check TERN_KAFKA_SASL_USERNAME and "
                      "TERN_KAFKA_SASL_PASSWORD(_FILE); nothing is taken from MQTT until it accepts them; "
                      "retrying in %.0f s", cfg.kafka_bootstrap, cfg.kafka_security.describe(), reason, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, cfg.retry_max_s)
        return False

    def _start_router(self, stop: asyncio.Event) -> asyncio.Task:
        """Start routing commands (Kafka -> gateways) over this bridge's MQTT session.

        It runs beside the bridge rather than before it: joining its consumer group takes a few
        seconds, which the readings need not wait for (the group's committed offsets keep every
        command that arrives meanwhile).
        """
        from tern.cloud.command_router import CommandRouter, CommandSettings, paho_publisher

        assert self._session is not None
        self.router = CommandRouter(self.config, CommandSettings.from_config(self.config),
                                    paho_publisher(self._session.client))
        return asyncio.create_task(self.router.run(stop), name="tern-bridge-commands")

    # --- MQTT (paho's thread) -------------------------------------------------------

    async def _connect_mqtt(self, stop: asyncio.Event) -> None:
        cfg = self.config
        host, port = cfg.mqtt_address
        session = PersistentSession(
            cfg.client_id,
            host,
            port,
            [(cfg.batch_filter, 1)],
            self._on_message,
            manual_ack=True,
            # In a share group, a member's session must end with its connection: mosquitto
            # keeps handing a disconnected persistent member its share of the batches, so a
            # bridge killed for good would hold a third of them forever. What a dead member
            # held unacknowledged is re-sent by the gateways (confirm timeout) to the others.
            clean_session=bool(cfg.share_group),
            keepalive=cfg.mqtt_keepalive_s,
            reconnect_max_s=30,
            # Outgoing confirms are QoS 1 and small; paho's default window of 20 would make
            # them queue behind each other under load.
            max_inflight=1000,
            **cfg.mqtt_auth(),
            name="bridge",
            broker=f"the MQTT broker {cfg.mqtt_broker}",
            lost_hint="paho reconnects; unacked batches are redelivered",
            takeover_hint=f"a second bridge named {cfg.name!r}: give each bridge its own name",
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            logger=log,
        )
        self._session = session
        presence.set_will(session.client, cfg.name)  # a dead bridge shows as "offline"
        try:
            session.start()
        except (OSError, ValueError) as exc:
            raise BridgeError(f"cannot connect to MQTT broker {cfg.mqtt_broker}: {exc}") from None
        deadline = time.monotonic() + cfg.connect_timeout_s
        while not session.connected:
            if session.error:
                self._disconnect_mqtt()
                raise BridgeError(f"MQTT broker {cfg.mqtt_broker} refused the bridge: {session.error}")
            if time.monotonic() > deadline:
                self._disconnect_mqtt()
                raise BridgeError(f"no MQTT connection to {cfg.mqtt_broker} within {cfg.connect_timeout_s:.0f} s")
            if stop.is_set():
                self._disconnect_mqtt()
                raise BridgeError("stopped before the MQTT connection was up")
            await asyncio.sleep(0.02)

    def _disconnect_mqtt(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._connected.is_set():  # a clean stop has no last will: say goodbye ourselves
            presence.announce(session.client, self.config.name, "offline", wait_s=presence.GOODBYE_TIMEOUT_S)
        session.stop()  # moves the generation on: nothing received so far may be acked any more
        self._connected.clear()

    def _generation(self) -> int:
        """The current connection's generation (-1, matching no delivery, once disconnected)."""
        session = self._session
        return session.generation if session is not None else -1

    # Hooks run by the session on paho's thread, after it moved the generation on.

    def _on_connect(self) -> None:
        self._counters["mqtt_connects"] += 1
        self._connected.set()
        session = self._session
        if session is not None:
            presence.announce(session.client, self.config.name, "online")

    def _on_disconnect(self) -> None:
        self._connected.clear()
        self._counters["mqtt_disconnects"] += 1

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        # paho's thread: record and hand over, nothing else (a slow callback here would
        # stall keepalives for the whole connection).
        session = self._session
        if session is None:
            return  # shutting down: not acked, so the broker redelivers it
        delivery = _Delivery(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            dup=bool(message.dup),
            mid=message.mid,
            generation=session.generation,
            received_ms=_now_ms(),
            received_mono=time.monotonic(),
        )
        loop, queue = self._loop, self._queue
        if loop is None or queue is None or loop.is_closed():
            return  # shutting down: not acked, so the broker redelivers it
        try:
            loop.call_soon_threadsafe(self._enqueue, delivery)
        except RuntimeError:
            pass  # loop closed between the check and the call: same as above

    def _enqueue(self, delivery: _Delivery) -> None:
        assert self._queue is not None
        self._counters["matched"] += 1
        if delivery.dup:
            self._counters["mqtt_dup_flags"] += 1
        self._inflight.append(delivery)
        self._queue.put_nowait(delivery)

    # --- the worker (asyncio) -------------------------------------------------------

    async def _work(self) -> None:
        """Take deliveries in receive order and start each one's write without waiting for it."""
        assert self._queue is not None and self._room is not None
        while True:
            delivery = await self._queue.get()
            if delivery.generation != self._generation():
                # Arrived on a connection that is gone: the broker redelivers it on the
                # current one, and acking its old packet id could ack another.
                self._counters["stale_dropped"] += 1
                self._forget(delivery)
                continue
            job = self._prepare(delivery)
            count = job.count
            async with self._room:
                # A batch larger than the whole bound still goes, alone.
                await self._room.wait_for(
                    lambda: self._records_inflight == 0
                    or self._records_inflight + count <= self.config.max_inflight_records
                )
                self._records_inflight += count
            self._ack_queue.append(delivery)
            task = asyncio.create_task(self._settle(delivery, job, count))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _forget(self, delivery: _Delivery) -> None:
        try:
            self._inflight.remove(delivery)
        except ValueError:
            pass

    def _prepare(self, delivery: _Delivery) -> _Job:
        """Decode ``delivery`` into the records it asks Kafka to hold, or find it poison."""
        try:
            gateway = topics.parse_batch_topic(delivery.topic)
            allowed = self.config.allowed_gateways
            if allowed is not None and gateway not in allowed:
                raise CodecError(f"gateway not allowed: {gateway!r} is not in this bridge's allowed_gateways")
            now = _now_ms()
            # Straight from the envelope's items to records: no Reading object per reading.
            batch, records = codec.decode_batch_records(delivery.payload, topic_gateway=gateway,
                                                        topic=self.config.readings_topic, bridged_ms=now)
        except CodecError as exc:
            return _Job(None, poison=str(exc))
        statuses = [
            codec.kafka_status_record(e, batch.gateway, self.config.status_topic, now) for e in batch.statuses
        ]
        # Drop events (readings the gateway's retention policy deleted) share the status topic.
        drops = [codec.kafka_drop_record(d, batch.gateway, self.config.status_topic, now) for d in batch.drops]
        # Hold events (holds/1: devices the gateway held back; not losses) share it too, keyed by device.
        holds = [codec.kafka_hold_record(h, batch.gateway, self.config.status_topic, now) for h in batch.holds]
        # What became of commands (the outcomes/1 extension): the results topic, keyed by device.
        outcomes = [codec.kafka_outcome_record(o, batch.gateway, self.config.command_results_topic)
                    for o in batch.outcomes]
        # Payloads the gateway refused (deadletters/1): the dead-letter topic, beside the bridge's own.
        letters = [codec.kafka_deadletter_record(d, batch.gateway, self.config.deadletter_topic, self.config.client_id)
                   for d in batch.deadletters]
        return _Job(batch, records, statuses + drops + holds + outcomes + letters)

    async def _settle(self, delivery: _Delivery, job: _Job, count: int) -> None:
        """Write one delivery (or recognise it as a copy), let acks flow, then confirm it."""
        confirm: codec.Confirm | None = None
        deadlettered = False
        try:
            if job.batch is None:
                await self._write_with_retry(delivery, [self._deadletter_record(delivery, job.poison)])
                deadlettered = True
                log.warning("dead-lettered %d bytes from %s: %s", len(delivery.payload), quote(delivery.topic),
                            shorten(job.poison))
            else:
                confirm = await self._write_batch(delivery, job)
            delivery.ackable = True
        except _Stale:
            self._counters["stale_dropped"] += 1
        finally:
            delivery.done = True
            # PUBACK first when it can go now (nothing received earlier still pending): then
            # whoever sees the confirm sees the batch acknowledged. Otherwise the confirm does
            # not wait for it: Kafka holds the batch.
            self._flush_acks()
            if deadlettered:
                # Counted after the PUBACK, like a confirm: the metrics thread reads the
                # counters before the in-flight list, so it never sees the count ahead of it.
                self._counters["deadlettered"] += 1
            if confirm is not None:
                self._confirm(confirm)
            assert self._room is not None
            async with self._room:
                self._records_inflight -= count
                self._room.notify_all()

    async def _write_batch(self, delivery: _Delivery, job: _Job) -> codec.Confirm:
        """Write ``job``'s batch unless it is a copy of one already written; the confirm it earns."""
        batch = job.batch
        assert batch is not None
        key = (batch.gateway, batch.bseq, hashlib.blake2b(delivery.payload, digest_size=16).digest())
        earlier = self._written.get(key)
        if earlier is not None:
            self._written.move_to_end(key)
            # A copy (the gateway re-sent it): wait for the first one's write, if it is still
            # under way; if that one was written, this one only needs confirming again.
            if await asyncio.shield(earlier):
                self._counters["duplicates_received"] += 1
                log.info("batch %s/%d is a copy of one already in Kafka: confirmed again, not written",
                         batch.gateway, batch.bseq)
                return codec.Confirm(batch.gateway, batch.bseq, len(job.readings))
        assert self._loop is not None
        written: asyncio.Future = self._loop.create_future()
        self._remember(key, written)
        try:
            # One write: the batch is confirmed (and PUBACKed) only once Kafka holds all of it.
            await self._write_with_retry(delivery, job.readings, job.others)
        except BaseException:
            written.set_result(False)
            if self._written.get(key) is written:
                del self._written[key]
            raise
        written.set_result(True)
        self._counters["records_written"] += len(job.readings)
        self._counters["status_written"] += len(batch.statuses)
        self._counters["drops_written"] += len(batch.drops)
        self._counters["holds_written"] += len(batch.holds)
        self._counters["outcomes_written"] += len(batch.outcomes)
        self._counters["gateway_deadletters_written"] += len(batch.deadletters)
        if self.router is not None:
            # The freshest word on which gateway serves a device, before the status topic's.
            for event in batch.statuses:
                self.router.directory.learn(event.device, batch.gateway)
            for outcome in batch.outcomes:  # a gateway whose node took a command serves it
                if outcome.outcome in ("delivered", "done"):
                    self.router.directory.learn(outcome.device, batch.gateway)
        # n counts readings, as the contract always said; the gateway deletes the batch's
        # status events on the same confirm. Kafka holds it all: it is confirmed even if this
        # delivery's PUBACK must still wait for earlier ones (or its connection is gone).
        return codec.Confirm(batch.gateway, batch.bseq, len(job.readings))

    def _remember(self, key: tuple[str, int, bytes], written: asyncio.Future) -> None:
        if self.config.dedup_window <= 0:
            return
        self._written[key] = written
        self._written.move_to_end(key)
        while len(self._written) > self.config.dedup_window:
            self._written.popitem(last=False)

    def _flush_acks(self) -> None:
        """PUBACK, in receive order, every settled delivery at the head of the queue."""
        queue = self._ack_queue
        generation = self._generation()
        while queue and queue[0].generation != generation:
            # From a connection that is gone: it can never be acked (the broker redelivers
            # it), so it must not hold back the PUBACKs of what came after the reconnect.
            self._forget(queue.popleft())
        while queue and queue[0].done:
            if not queue[0].ackable and queue[0].generation == generation:
                # Given up on a live connection (only when stopping): acking anything after
                # it would break the receive order, and it must be redelivered.
                return
            delivery = queue.popleft()
            if delivery.ackable:
                self._ack(delivery)
            self._forget(delivery)

    async def _drain(self, timeout: float) -> None:
        """Let the writes under way finish (bounded), so their acks and confirms go out."""
        tasks = set(self._tasks)
        if tasks:
            # Kafka failing: nothing will finish in time, and a stop must stay prompt.
            failures = self._counters["kafka_failures"]
            deadline = time.monotonic() + timeout
            pending = tasks
            while pending and time.monotonic() < deadline and self._counters["kafka_failures"] == failures:
                if any(d.generation == self._generation() and not d.done and d.retrying for d in self._ack_queue):
                    break
                _, pending = await asyncio.wait(pending, timeout=0.05)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
                log.warning("stopped with %d batches unwritten: the broker redelivers them", len(pending))
        self._ack_queue.clear()

    async def _write_with_retry(self, delivery: _Delivery, *parts: Sequence[codec.KafkaRecord]) -> None:
        """Write until Kafka acknowledges all the records of ``parts``; only cancellation stops it.

        Each attempt reads them afresh, and keeps none: the sink drops each record once it is in
        its record batch (see codec.ReadingRecords).
        """
        assert self._sink is not None
        delay = self.config.retry_initial_s
        while True:
            if delivery.generation != self._generation():
                # The connection it came on is gone, so it cannot be acked any more and
                # is being redelivered: writing it now would only add a duplicate.
                raise _Stale()
            try:
                await self._sink.write(*parts)
                return
            except KafkaWriteError as exc:
                self._counters["kafka_failures"] += 1
                log.warning("Kafka write of %d records from %s failed (%s); retrying in %.1f s", sum(map(len, parts)),
                            quote(delivery.topic), describe(exc), delay)
            delivery.retrying = True
            try:
                await asyncio.sleep(delay)
            finally:
                delivery.retrying = False
            self._counters["retries"] += 1
            delay = min(delay * 2, self.config.retry_max_s)

    def _deadletter_record(self, delivery: _Delivery, error: str) -> codec.KafkaRecord:
        payload = delivery.payload
        limit = self.config.deadletter_max_bytes
        headers = [
            ("source_topic", delivery.topic.encode(errors="replace")),
            ("error", error.encode()[:1000]),
            ("mqtt_qos", str(delivery.qos).encode()),
            ("mqtt_retain", b"1" if delivery.retain else b"0"),
            ("mqtt_dup", b"1" if delivery.dup else b"0"),
            ("mqtt_mid", str(delivery.mid).encode()),
            ("received_ms", str(delivery.received_ms).encode()),
            ("bridge", self.config.client_id.encode()),
        ]
        if len(payload) > limit:
            # Kafka would refuse the whole payload (and retrying a refused record would
            # stall every gateway): keep a prefix and say loudly what was cut.
            headers += [
                ("truncated", b"1"),
                ("original_bytes", str(len(payload)).encode()),
                ("original_sha256", hashlib.sha256(payload).hexdigest().encode()),
            ]
            payload = payload[:limit]
        # Keyed by source topic, so one gateway's poison stays in order in one partition.
        return codec.KafkaRecord(
            topic=self.config.deadletter_topic,
            key=delivery.topic.encode(errors="replace"),
            value=payload,
            headers=tuple(headers),
        )

    def _ack(self, delivery: _Delivery) -> bool:
        """PUBACK ``delivery`` if its connection is still the current one; True if sent."""
        session = self._session
        rc = session.ack(delivery.mid, delivery.qos, delivery.generation) if session is not None else None
        if rc is None:
            self._counters["stale_dropped"] += 1
            return False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("PUBACK for mid %d not sent (%s): the broker will redeliver it", delivery.mid, rc)
            return False
        # Acked means no longer in flight, before anything (a confirm) can reveal it.
        try:
            self._inflight.remove(delivery)
        except ValueError:
            pass
        return True

    def _confirm(self, confirm: codec.Confirm) -> None:
        session = self._session
        if session is None:
            return
        # paho queues QoS 1 publishes while disconnected and sends them after reconnect; a
        # confirm that is lost anyway only makes the gateway resend (a duplicate, no loss).
        # Counted first: whoever sees the confirm must see the counter that says so.
        self._counters["batches_confirmed"] += 1
        session.client.publish(topics.confirm_topic(confirm.gateway), codec.encode_confirm(confirm), qos=1)


class BridgeThread:
    """A :class:`Bridge` on its own thread and event loop, for synchronous callers.

    ``start()`` returns once the bridge is connected to MQTT and Kafka (or raises
    BridgeError); ``stop()`` shuts it down. Use as a context manager in tests and demos.
    """

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.bridge = Bridge(config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float | None = None) -> "BridgeThread":
        """Start the bridge and wait until it runs; raise BridgeError if it cannot."""
        if self._thread is not None:
            raise BridgeError("bridge thread already started")
        self._thread = threading.Thread(target=self._main, name=f"tern-bridge-{self.config.name}", daemon=True)
        self._thread.start()
        limit = timeout if timeout is not None else self.config.connect_timeout_s * 2 + 5
        if not self._started.wait(limit):
            self.stop()
            raise BridgeError(f"bridge did not start within {limit:.0f} s")
        if self._error is not None:
            self._thread.join(5)
            error = self._error
            raise error if isinstance(error, BridgeError) else BridgeError(str(error))
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready = asyncio.Event()
            run = asyncio.create_task(self.bridge.run(self._stop, ready))
            readiness = asyncio.create_task(ready.wait())
            await asyncio.wait({run, readiness}, return_when=asyncio.FIRST_COMPLETED)
            readiness.cancel()
            if run.done():
                await run  # raises the start-up error, before start() is released
            self._started.set()
            await run

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to start(); after start, logged
            self._error = exc
            if self._started.is_set():
                log.error("bridge %s stopped with an error: %s", self.config.name, exc)
        finally:
            self._started.set()

    def stop(self, timeout: float = 10) -> None:
        """Stop the bridge and wait up to ``timeout`` seconds for it to finish."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # loop already closed: the bridge has ended
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise BridgeError(f"bridge {self.config.name} did not stop within {timeout:.0f} s")

    def stats(self) -> dict[str, Any]:
        """The bridge's counters (see :meth:`Bridge.stats`)."""
        return self.bridge.stats()

    @property
    def error(self) -> BaseException | None:
        """The exception the bridge ended with, if any."""
        return self._error

    def __enter__(self) -> "BridgeThread":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

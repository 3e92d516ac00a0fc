"""Commands, gateway half: take them from the cloud, hand them to the nodes, report outcomes.

Intake. A persistent session on the cloud broker (client id ``<uplink_client_id>-cmd``,
``clean_session=False``, manual PUBACK) is subscribed to ``tern-gw/<gateway>/cmd``. Each
command is committed to the ``commands`` table of the outbox file (:mod:`tern.edge.command_store`)
*before* its PUBACK: killed at any point, the gateway either has it on disk or the broker
still holds it. A command whose id is already known is acked and not stored again; one that
does not decode (or names another gateway) becomes a ``rejected`` outcome, and is acked.

Delivery. A node is online while its latest status (the retained birth the gateway commits to
the outbox's ``node_status``) says so. An unfinished command for an online node is published
on ``tern/<site>/<device>/cmd`` at QoS 1 through the ingest's local session; the local broker's
PUBACK records ``delivered``. It is published again when the node's status changes after that
(a new birth: it reconnected or rebooted, and may never have seen it) and after a gateway
restart: the node de-duplicates by command id. A command whose expiry passes first ends
``expired``; one for an offline or unknown node waits.

Replies. The ingest's local session also takes ``tern/+/+/reply`` and hands each reply here.
A reply must come from the device the command was for (the topic's device, the payload's and
the command's must agree): ``ok`` true ends the command ``done`` with the node's result,
``ok`` false ``rejected`` with its error. The reply is acked once that is committed. Replies
that do not decode become dead letters in the outbox.

Releases. The same cloud session takes firmware release bundles on ``tern-gw/<gateway>/release``
(one per release and gateway, :mod:`tern.core.ota_wire`): each is checked and stored in the
release store (:mod:`tern.edge.ota_store`) before its PUBACK, like a command. One that fails the
check becomes a dead letter (its first KB and the reason) and is acked. An ``ota_update``
command naming a release the store does not hold is rejected here, not sent to the node.

Outcomes wait in the outbox file until a batch carries them (the ``outcomes/1`` envelope
extension) and the cloud confirms it; the bridge writes them to the results topic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as mqtt

from tern.core import commands, topics
from tern.core.commands import Command
from tern.core.errors import CodecError
from tern.core.mqtt_session import PersistentSession
from tern.core.quoting import describe, quote
from tern.edge.command_store import CommandStore
from tern.core import ota_wire
from tern.edge.config import GatewayConfig
from tern.edge.ota_store import ReleaseRefused, ReleaseStore
from tern.edge.outbox import DeadLetter, Outbox, now_ms

log = logging.getLogger(__name__)

#: How often unfinished commands are looked at (nodes coming online, expiries, PUBACKs).
SCAN_S = 0.25
#: Finished commands are pruned this often.
PRUNE_EVERY_S = 600.0


@dataclass(slots=True)
class _Received:
    """A message from a broker, with the connection generation it came on (for its PUBACK)."""

    kind: str  # "command", "release" or "reply"
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


@dataclass(slots=True)
class _Sent:
    """A command published to its node in this run."""

    info: mqtt.MQTTMessageInfo
    #: The node's status time when it was sent: a newer status means it (re)connected since.
    status_ms: int


class CommandDesk:
    """The gateway's command handling: cloud intake, delivery to nodes, replies, outcomes."""

    def __init__(self, config: GatewayConfig, outbox: Outbox, local: PersistentSession, store: CommandStore,
                 on_outcome: Callable[[], None] | None = None, releases: ReleaseStore | None = None) -> None:
        self.config = config
        #: Firmware releases for the nodes (None: this desk takes none).
        self.releases = releases
        self.outbox = outbox
        #: The commands and their outcomes, in the outbox file (shared with the uplink, which
        #: carries the outcomes).
        self.store = store
        #: The ingest's session on the local broker: commands go out on it, replies come in.
        self.local = local
        self._on_outcome = on_outcome
        self._queue: queue.SimpleQueue[_Received] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._sent: dict[str, _Sent] = {}
        self._lock = threading.Lock()
        self._counts = {
            "commands_received": 0,
            "commands_duplicate": 0,
            "commands_rejected": 0,
            "commands_sent": 0,
            "commands_delivered": 0,
            "commands_done": 0,
            "commands_failed": 0,
            "commands_expired": 0,
            "replies_ignored": 0,
            "releases_stored": 0,
            "releases_refused": 0,
        }
        self._worker = threading.Thread(target=self._run, name=f"tern-commands-{config.gateway_id}", daemon=True)
        host, port = config.cloud_hostport
        self.session = PersistentSession(
            f"{config.uplink_client_id}-cmd",
            host,
            port,
            [(topics.gateway_command_topic(config.gateway_id), 1)]
            + ([(topics.gateway_release_topic(config.gateway_id), 1)] if releases is not None else []),
            self._on_command,
            manual_ack=True,
            keepalive=config.keepalive_s,
            reconnect_max_s=config.reconnect_max_s,
            name="commands",
            # Not "the cloud broker ...": that is how the uplink's lines read, and an operator
            # (or a log watch) looking for the readings' link must find that one.
            broker=f"{config.cloud_broker} (cloud broker, command session)",
            lost_hint="the broker holds commands for this gateway until it is back",
            takeover_hint=config.takeover_hint(),
            logger=log,
            **config.cloud_auth(),
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and connect (in the background) to the cloud broker."""
        self._worker.start()
        self.session.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking commands (what is not acked stays in the broker's session); the store
        stays open for the uplink's last confirms (the service closes it)."""
        self._stop.set()
        self.session.stop()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed to the gateway's command topic (or ``timeout``)."""
        return self.session.wait_connected(timeout)

    def stats(self) -> dict:
        """Counters since start, and the unfinished commands (``commands_pending``, per device)."""
        with self._lock:
            out = dict(self._counts)
        try:
            by_device = self.store.pending_by_device()
        except Exception:  # closed as the service stops: the levels are simply unknown
            by_device = {}
        out["commands_pending"] = sum(by_device.values())
        out["commands_pending_by_device"] = by_device
        out["commands_connected"] = self.session.connected
        return out

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # --- paho network threads: hand over, nothing else --------------------------------------

    def _on_command(self, msg: mqtt.MQTTMessage) -> None:
        kind = "release" if msg.topic.endswith("/release") else "command"
        self._queue.put(_Received(kind, msg.topic, bytes(msg.payload), msg.mid, msg.qos, self.session.generation))

    def on_reply(self, msg: mqtt.MQTTMessage, generation: int) -> None:
        """The ingest's hook for a message on a node's reply topic (paho's thread)."""
        self._queue.put(_Received("reply", msg.topic, bytes(msg.payload), msg.mid, msg.qos, generation))

    # --- worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        next_scan = 0.0
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=max(0.0, min(SCAN_S, next_scan - time.monotonic())))
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._handle(item)
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + SCAN_S
                    self._scan()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    self.store.prune(now_ms())
            except Exception:  # never let the worker die: what is not acked comes again
                if self._stop.is_set():
                    return
                log.exception("command handling failed; retrying")
                if item is not None:
                    self._queue.put(item)
                self._stop.wait(1.0)

    def _handle(self, item: _Received) -> None:
        if item.kind == "command":
            self._take_command(item)
            self.session.ack(item.mid, item.qos, item.generation)
        elif item.kind == "release":
            self._take_release(item)
            self.session.ack(item.mid, item.qos, item.generation)
        else:
            self._take_reply(item)
            self.local.ack(item.mid, item.qos, item.generation)
        if self._on_outcome is not None:
            self._on_outcome()

    def _take_command(self, item: _Received) -> None:
        now = now_ms()
        try:
            command = commands.decode_command(item.payload)
            if command.gateway and command.gateway != self.config.gateway_id:
                raise CodecError(f"command routed to gateway {command.gateway!r}, this is {self.config.gateway_id!r}")
        except CodecError as exc:
            command_id, device = commands.salvage_identity(item.payload, None)
            self.store.reject(command_id, device, describe(exc, 200), now)
            self._count("commands_rejected")
            log.warning("command rejected (%s): %s", command_id or "no id", describe(exc, 300))
            return
        if command.name == "ota_update":
            why = self._release_missing(command)
            if why:
                self.store.reject(command.id, command.device, why, now)
                self._count("commands_rejected")
                log.warning("command %s rejected: %s", command.id, why)
                return
        if self.store.accept(command, now):
            self._count("commands_received")
            log.info("command %s (%s) for %s taken", command.id, command.name, command.device)
        else:
            self._count("commands_duplicate")
            log.info("command %s again: already taken, not stored twice", command.id)

    def _release_missing(self, command: Command) -> str:
        """Why an ``ota_update`` cannot be served by this gateway ("" when it can)."""
        version = command.args.get("version")
        if self.releases is None:
            return "this gateway serves no releases"
        if not isinstance(version, str) or version not in self.releases.versions():
            return f"no release {str(version)[:40]} on gateway {self.config.gateway_id}: send it first"
        return ""

    def _take_release(self, item: _Received) -> None:
        """Check and store a release bundle; a bad one becomes a dead letter (and is acked)."""
        assert self.releases is not None
        try:
            version, new = self.releases.add(ota_wire.decode_bundle(item.payload))
        except (CodecError, ReleaseRefused) as exc:
            why = f"release refused: {describe(exc, 300)}"
            self.outbox.add([], [DeadLetter(item.topic, item.payload[:1024], why, now_ms())])
            self._count("releases_refused")
            log.warning("%s (%d bytes on %s)", why, len(item.payload), quote(item.topic))
            return
        if new:
            self._count("releases_stored")
            log.info("release %s stored (%d bytes), ready for the nodes", version, len(item.payload))
        else:
            log.info("release %s again: already stored", version)

    def _take_reply(self, item: _Received) -> None:
        now = now_ms()
        try:
            where = topics.parse_node_topic(item.topic)
            reply = commands.decode_node_reply(item.payload, topic_device=where.device)
        except CodecError as exc:
            # Evidence of a faulty node: kept in the outbox like any off-contract payload.
            self.outbox.add([], [DeadLetter(item.topic, item.payload, describe(exc, 1000), now)])
            self._count("replies_ignored")
            log.warning("bad command reply on %s: %s", quote(item.topic), describe(exc, 300))
            return
        outcome = commands.DONE if reply.ok else commands.REJECTED
        if not self.store.finish(reply.id, reply.device, outcome, now, detail=reply.error,
                                 reply=reply.result if reply.ok else None):
            # A second answer to a redelivered command, or an id this device was never sent.
            self._count("replies_ignored")
            log.info("reply from %s to command %s ignored: no such unfinished command", reply.device, reply.id)
            return
        self._sent.pop(reply.id, None)
        self._count("commands_done" if reply.ok else "commands_failed")
        log.info("command %s on %s: %s%s", reply.id, reply.device, outcome, f" ({reply.error})" if reply.error else "")

    def _scan(self) -> None:
        """Expire, deliver and note PUBACKs for the unfinished commands."""
        pending = self.store.unfinished()
        if not pending:
            self._sent.clear()
            return
        now = now_ms()
        changed = False
        live = set()
        for stored in pending:
            command = stored.command
            live.add(command.id)
            if command.expired(now):
                detail = ("delivered, no reply before the expiry" if stored.delivered_ms is not None
                          else "the node was not online before the expiry")
                if self.store.finish(command.id, command.device, commands.EXPIRED, now, detail=detail):
                    self._count("commands_expired")
                    log.info("command %s for %s expired: %s", command.id, command.device, detail)
                    changed = True
                self._sent.pop(command.id, None)
                continue
            sent = self._sent.get(command.id)
            if sent is not None and stored.delivered_ms is None and sent.info.is_published():
                if self.store.mark_delivered(command, now):
                    self._count("commands_delivered")
                    changed = True
            node = self.store.node(command.device)
            if node is None or node.state != "online" or not self.local.connected:
                continue  # held until the node is back (or the command expires)
            if sent is not None and sent.status_ms == node.status_ms:
                continue  # sent since the node's latest birth
            self._send(command, node.site, node.status_ms)
        for command_id in set(self._sent) - live:
            del self._sent[command_id]
        if changed and self._on_outcome is not None:
            self._on_outcome()

    def _send(self, command: Command, site: str, status_ms: int) -> None:
        info = self.local.client.publish(topics.command_topic(site, command.device),
                                         commands.encode_node_command(command), qos=1)
        again = command.id in self._sent
        self._sent[command.id] = _Sent(info, status_ms)
        self._count("commands_sent")
        log.info("command %s (%s) %s to %s/%s", command.id, command.name, "sent again" if again else "sent",
                 site, command.device)

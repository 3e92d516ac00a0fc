"""The gateway on real parts, from the outside: paho "nodes" on the local broker, a paho stand-in
for the bridge on the cloud broker that speaks the batch/confirm contract through
:mod:`tern.core.codec` (it is the contract, not a mock of the gateway), the outbox read back
through its own SQLite connection, and an in-process gateway started on two brokers.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tern.core import codec, topics
from tern.core.codec import Confirm, Reading
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto

GW = "gw1"
SITE = "site1"
BOOT = "b007"
DEADLINE = 20.0


# --- the outbox, read back -------------------------------------------------------------


def _pending(path: Path, query: str) -> list[tuple]:
    """Rows of ``query`` read through a separate connection; none before the outbox exists."""
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=10) as conn:
        try:
            return [tuple(r) for r in conn.execute(query)]
        except sqlite3.OperationalError:  # not created yet
            return []


def outbox_rows(path: Path) -> list[tuple[str, str, int]]:
    """(device, boot, seq) of pending rows in id order."""
    return _pending(path, "SELECT device, boot, seq FROM outbox ORDER BY id")


def status_rows(path: Path) -> list[tuple[str, str, str]]:
    """(device, boot, state) of pending status events in id order."""
    return _pending(path, "SELECT device, boot, state FROM status_events ORDER BY id")


def dead_letters(path: Path) -> list[tuple[str, bytes, str]]:
    """(topic, payload, error) of the dead letters in id order."""
    with sqlite3.connect(path, timeout=10) as conn:
        return [tuple(r) for r in conn.execute("SELECT topic, payload, error FROM dead_letters ORDER BY id")]


# --- paho nodes and the bridge's side of the contract ----------------------------------


def new_client(client_id: str | None = None, clean: bool = True) -> mqtt.Client:
    """A paho client (MQTT 3.1.1, reconnecting after 1 s), not yet connected."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
        clean_session=clean,
        protocol=mqtt.MQTTv311,
    )
    client.reconnect_delay_set(1, 1)
    return client


class Node:
    """A paho stand-in for a MicroPython node: publishes readings, collects gateway acks."""

    def __init__(self, broker: Mosquitto, device: str, on_ack: Callable[[codec.NodeAck], None] | None = None) -> None:
        self.device = device
        self.acks: list[codec.NodeAck] = []
        self._on_ack = on_ack
        self._subscribed = threading.Event()
        self.client = new_client()
        self.client.on_connect = lambda c, *a: c.subscribe(topics.ack_topic(SITE, device), qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(DEADLINE), "node could not subscribe"

    def _message(self, client, userdata, msg) -> None:
        ack = codec.decode_node_ack(msg.payload)
        if self._on_ack is not None:
            self._on_ack(ack)
        self.acks.append(ack)

    def send(self, seq: int) -> None:
        reading = Reading(self.device, BOOT, seq, 1_700_000_000_000 + seq, {"t": 20.5, "n": seq})
        self.publish_raw(topics.telemetry_topic(SITE, self.device), codec.encode_reading(reading))

    def publish_raw(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(DEADLINE)
        assert info.is_published()

    def acked_seq(self) -> int:
        return max((a.seq for a in self.acks), default=-1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class BridgeStub:
    """The bridge's side of the contract on the cloud broker: decode batches, publish confirms.

    A persistent session, so batches published while it reconnects are kept for it.
    """

    def __init__(self, broker: Mosquitto, gateway: str = GW, confirm: bool = True) -> None:
        self.gateway = gateway
        self.confirm = confirm
        self.batches: list[codec.Batch] = []
        self.confirmed: set[int] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = new_client(f"test-bridge-{uuid.uuid4().hex[:8]}", clean=False)
        self.client.on_connect = lambda c, *a: c.subscribe(topics.batch_topic(gateway), qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(DEADLINE), "bridge stub could not subscribe"

    def _message(self, client, userdata, msg) -> None:
        batch = codec.decode_batch(msg.payload, topic_gateway=topics.parse_batch_topic(msg.topic))
        with self._lock:
            self.batches.append(batch)
            if self.confirm:
                self._confirm(batch)

    def _confirm(self, batch: codec.Batch) -> None:
        self.client.publish(
            topics.confirm_topic(batch.gateway),
            codec.encode_confirm(Confirm(batch.gateway, batch.bseq, len(batch.readings))),
            qos=1,
        )
        self.confirmed.add(batch.bseq)

    def start_confirming(self) -> None:
        """Confirm from now on, including the batches waiting for it (several are in flight)."""
        with self._lock:
            self.confirm = True
            for batch in self.batches:
                if batch.bseq not in self.confirmed:
                    self._confirm(batch)

    def delivered(self) -> list[Reading]:
        """Readings of confirmed batches, in order, each confirmed batch once."""
        with self._lock:
            seen: set[int] = set()
            out: list[Reading] = []
            for batch in self.batches:
                if batch.bseq in self.confirmed and batch.bseq not in seen:
                    seen.add(batch.bseq)
                    out.extend(batch.readings)
            return out

    def delivered_statuses(self) -> list[codec.StatusEvent]:
        """Status events of confirmed batches, in order, each confirmed batch once."""
        with self._lock:
            seen: set[int] = set()
            out: list[codec.StatusEvent] = []
            for batch in self.batches:
                if batch.bseq in self.confirmed and batch.bseq not in seen:
                    seen.add(batch.bseq)
                    out.extend(batch.statuses)
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class StatusNode:
    """A paho node that does what the firmware does with its status: a retained QoS 1 last
    will set before connecting, a retained birth right after; :meth:`kill` drops the TCP
    connection without an MQTT DISCONNECT, so the broker publishes the will."""

    def __init__(self, broker: Mosquitto, device: str, boot: str = BOOT) -> None:
        self.device = device
        self.topic = topics.status_topic(SITE, device)
        self.client = new_client()
        will = codec.encode_status(codec.Status(device, "offline", boot))
        self.client.will_set(self.topic, will, qos=1, retain=True)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(broker.host, broker.port, keepalive=60)
        self.client.loop_start()
        assert connected.wait(DEADLINE), "status node could not connect"
        birth = codec.encode_status(codec.Status(device, "online", boot, fw="0.1.0", reset="PWRON_RESET"))
        info = self.client.publish(self.topic, birth, qos=1, retain=True)
        info.wait_for_publish(DEADLINE)
        assert info.is_published()

    def kill(self) -> None:
        self.client.loop_stop()  # no reconnect, no DISCONNECT
        self.client.socket().close()

    def close(self) -> None:
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def per_device(readings: list[Reading]) -> dict[str, list[int]]:
    """Each device's seqs, in the order given."""
    out: dict[str, list[int]] = {}
    for r in readings:
        out.setdefault(r.device, []).append(r.seq)
    return out



# --- the gateway ------------------------------------------------------------------------


def config(local: Mosquitto, cloud: Mosquitto, outbox: Path, **options: Any) -> GatewayConfig:
    """Gateway ``GW`` between ``local`` and ``cloud``: confirm timeout 2 s and reconnects capped
    at 1 s unless ``options`` say otherwise."""
    options.setdefault("confirm_timeout_s", 2.0)
    options.setdefault("reconnect_max_s", 1.0)
    return GatewayConfig(
        gateway_id=GW, local_broker=local.address, cloud_broker=cloud.address, outbox_path=outbox, **options
    )


def started_gateway(
    local: Mosquitto, cloud: Mosquitto, outbox: Path, cleanup: Callable[[Any], None], **options: Any
) -> Gateway:
    """A gateway on :func:`config` (``options`` as there), handed to ``cleanup``, started and
    connected to both brokers (within ``DEADLINE``)."""
    gw = Gateway(config(local, cloud, outbox, **options))
    cleanup(gw)
    gw.start()
    assert gw.wait_connected(DEADLINE)
    return gw

"""Kafka from a test's side: bridge configs for the per-test topics, records produced as the
cloud team writes them, what landed read back, a paho stand-in for the gateway's cloud side
that publishes batches to a bridge, and Tansu behind a fault proxy.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from tern.cloud.config import BridgeConfig
from tern.cloud.consume import read_all
from tern.core import codec, commands, topics
from tern.core.commands import Command
from tern.harness.observe import KafkaTail
from tern.harness.stack import Mosquitto, Tansu

#: The boot of the readings in :func:`make_batch`.
BATCH_BOOT = "a1b2c3d4"


def bridge_config(broker: Mosquitto, bootstrap: str, names: dict[str, str], **fields: Any) -> BridgeConfig:
    """A bridge from ``broker`` to the topics ``names`` (readings, status, deadletter) on
    ``bootstrap``; a fresh name unless ``fields`` give one, any other field from ``fields``."""
    fields.setdefault("name", f"t{uuid.uuid4().hex[:8]}")
    return BridgeConfig(
        mqtt_broker=broker.address,
        kafka_bootstrap=bootstrap,
        readings_topic=names["readings"],
        status_topic=names["status"],
        deadletter_topic=names["deadletter"],
        **fields,
    )


# --- writing and reading back ----------------------------------------------------------


def produce(bootstrap: str, topic: str, records: Iterable[Command | tuple[bytes, bytes]]) -> float:
    """Write ``records`` with acks=all, in order: a command as the cloud team writes it (key =
    device id), or a raw (key, value) record. Returns the monotonic time Kafka had them all."""
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for item in records:
                key, value = item if isinstance(item, tuple) else (item.device.encode(), commands.encode_command(item))
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    asyncio.run(go())
    return time.monotonic()


def committed(bootstrap: str, group: str, topic: str) -> int:
    """The offsets consumer group ``group`` committed on ``topic``, summed over its partitions."""
    async def go() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            total = 0
            for partition in consumer.partitions_for_topic(topic) or await _partitions(consumer, topic):
                total += (await consumer.committed(TopicPartition(topic, partition))) or 0
            return total
        finally:
            await consumer.stop()

    async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        await consumer._client.force_metadata_update()  # the consumer has no subscription to learn it from
        return consumer.partitions_for_topic(topic) or set()

    return asyncio.run(go())


def kafka_seqs(tail: KafkaTail, device: str, boot: str) -> list[int]:
    """Seqs of one boot of one device in Kafka, in partition order, first occurrences only."""
    seqs = [identity[2] for identity, _, _ in tail.records() if identity[0] == device and identity[1] == boot]
    return list(dict.fromkeys(seqs))


def kafka_statuses(bootstrap: str, topic: str, device: str) -> list[dict]:
    """The status values of ``device`` in ``topic``, in partition and offset order."""
    records = sorted(read_all(bootstrap, topic, timeout_s=5), key=lambda r: (r.partition, r.offset))
    values = [codec.decode_kafka_status_value(r.raw) for r in records]
    return [v for v in values if v["device"] == device]


# --- the gateway's cloud side, for a bridge --------------------------------------------


class FakeGateway:
    """The gateway's cloud side: publishes batches (QoS 1) and collects the bridge's confirms."""

    def __init__(self, broker: Mosquitto, gateway: str, persistent: bool = False) -> None:
        self.gateway = gateway
        self.confirms: dict[int, list[codec.Confirm]] = defaultdict(list)
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        # persistent: a session that survives a broker restart, so no confirm is missed
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-gw-{gateway}-{uuid.uuid4().hex[:6]}", clean_session=not persistent
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.confirm_topic(gateway), qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "gateway could not subscribe to its confirm topic"

    def _on_message(self, client, userdata, message) -> None:
        confirm = codec.decode_confirm(message.payload)
        with self._cond:
            self.confirms[confirm.bseq].append(confirm)
            self._cond.notify_all()

    def publish(self, batch: codec.Batch) -> None:
        self.publish_raw(topics.batch_topic(batch.gateway), codec.encode_batch(batch))

    def publish_raw(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)  # PUBACK from the broker: the broker has it
        assert info.is_published()

    def wait_confirms(self, bseqs: Iterable[int], timeout: float) -> None:
        """Wait until every batch of ``bseqs`` is confirmed; fail after ``timeout`` s."""
        wanted = set(bseqs)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not wanted <= self.confirms.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - self.confirms.keys())
                    raise AssertionError(f"no confirm for bseq {missing[:10]} after {timeout} s")
                self._cond.wait(left)

    def assert_no_confirm(self, bseq: int, within: float) -> None:
        """Fail if batch ``bseq`` is confirmed within ``within`` s."""
        deadline = time.monotonic() + within
        with self._cond:
            while bseq not in self.confirms:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
        raise AssertionError(f"batch {bseq} was confirmed during the outage: {self.confirms[bseq]}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_batch(
    gateway: str, bseq: int, devices: list[str], per_device: int, first_seq: int, boot: str = BATCH_BOOT
) -> codec.Batch:
    """A batch with ``per_device`` readings for each device, seqs from ``first_seq``, interleaved."""
    now = int(time.time() * 1000)
    readings = [
        codec.Reading(
            device=dev,
            boot=boot,
            seq=seq,
            ts_ms=now,
            values={"t": 20.0 + seq / 10, "n": seq},
            site="site1",
            received_ms=now,
        )
        for seq in range(first_seq, first_seq + per_device)
        for dev in devices
    ]
    return codec.Batch(gateway=gateway, bseq=bseq, sent_ms=now, readings=tuple(readings))


# --- Tansu behind a fault proxy ---------------------------------------------------------


class ProxiedTansu(Tansu):
    """Tansu that advertises the fault proxy's address, so every client connection
    (bootstrap and partition leader alike) goes through the proxy."""

    def __init__(self, workdir: Path, advertised_port: int) -> None:
        super().__init__(workdir)
        self.advertised_port = advertised_port

    def command(self) -> list[str]:
        from tern.toolchain import tansu_binary

        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
        ]


"""``make bench``: Tern's speed and memory figures, each as a ratio to a baseline of the same run.

Machines are noisy (the project's have 2 cores), so no figure here is judged on its own: every
measurement runs a Tern path and a plain baseline doing the same work on the same parts, in the
same run, and reports ``ratio = tern / baseline``. For throughputs a ratio of 0.5 means Tern
moves half as many readings per second as the baseline; for the firmware's free heap it is
the share of the heap left once the firmware holds a full ring.

Benchmarks (``--only NAME``, repeatable):

``codec``     ``decode_reading`` vs ``json.loads``; batch encode+decode vs zlib+json.
``outbox``    ``Outbox.add`` in groups of 100 vs raw ``sqlite3`` executemany, same pragmas.
``gateway``   paho node -> mosquitto -> Gateway (committed) vs paho -> mosquitto -> paho.
``bridge``    batches on the cloud broker -> BridgeThread -> Kafka (confirmed) vs aiokafka.
``e2e``       paho node -> gateway -> bridge -> Kafka vs the pub/sub baseline of ``gateway``.
``firmware``  free heap of the firmware with a full ring vs ``umqtt.simple`` alone (64K heap).

Everything runs on loopback with the project's own runners (``tern.stack``); Kafka is a private
Tansu unless ``KAFKA_BOOTSTRAP`` names one. Every wait is bounded by a deadline. Results go to a
``rich`` table and to ``.cache/bench/latest.json``. Errors print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tern import codec, topics
from tern.codec import Batch, Reading
from tern.errors import TernError
from tern.toolchain import cache_dir, micropython_binary, repo_root, umqtt_path

if TYPE_CHECKING:  # imported lazily at run time: `--only codec` needs neither edge nor cloud
    from cloud.bridge import BridgeThread
    from edge.service import Gateway
    from rich.table import Table
    from tern.stack import Mosquitto

BENCHMARKS = ("codec", "outbox", "gateway", "bridge", "e2e", "firmware")
SITE = "bench"
BOOT = "b0b0cafe"
#: Readings per batch envelope, as the gateway sends them by default.
BATCH_READINGS = 200
#: Outbox rows per transaction in the outbox benchmark.
OUTBOX_GROUP = 100
#: Distinct devices the paho "node" publishes for (round robin).
DEVICES = 10
#: Readings the firmware takes in the heap benchmark (its ring holds 64: full, dropping).
FIRMWARE_READINGS = 200
FIRMWARE_HEAP = "64K"
#: The paho publisher's QoS 1 window: mosquitto's max_inflight_messages in tern.stack.
PUBLISH_INFLIGHT = 100
POLL_S = 0.002


class BenchError(TernError, RuntimeError):
    """A benchmark could not run to the end; the message says which and why."""


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does, and how long any one wait may take."""

    decode_loops: int
    batch_loops: int
    repeats: int
    outbox_rows: int
    outbox_repeats: int
    readings: int  # gateway ingest and end to end (same count: they share a baseline)
    bridge_batches: int
    network_repeats: int  # rounds of gateway, bridge, e2e and pub/sub; the best of each counts
    deadline_s: float


QUICK = Sizes(decode_loops=5_000, batch_loops=25, repeats=3, outbox_rows=5_000, outbox_repeats=1,
              readings=2_000, bridge_batches=20, network_repeats=1, deadline_s=20.0)
FULL = Sizes(decode_loops=50_000, batch_loops=250, repeats=5, outbox_rows=20_000, outbox_repeats=3,
             readings=20_000, bridge_batches=200, network_repeats=2, deadline_s=60.0)


@dataclass
class Measurement:
    """One Tern figure and the baseline it is compared with, measured in the same run."""

    name: str
    benchmark: str
    unit: str
    figure: float
    baseline: float
    what: str
    baseline_what: str
    count: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """figure / baseline."""
        return self.figure / self.baseline

    def as_json(self) -> dict[str, Any]:
        """The JSON form written to latest.json."""
        return {
            "name": self.name,
            "benchmark": self.benchmark,
            "unit": self.unit,
            "figure": self.figure,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "what": self.what,
            "baseline_what": self.baseline_what,
            "count": self.count,
            "details": self.details,
        }


# --- small helpers ---------------------------------------------------------------------


def rate(count: int, seconds: float) -> float:
    """Items per second (a zero duration cannot happen with perf_counter, but never divide by it)."""
    return count / max(seconds, 1e-9)


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of_interleaved(tern: Callable[[], object], base: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Shortest time of each of two functions, run alternately ``repeats`` times each."""
    tern_times: list[float] = []
    base_times: list[float] = []
    for _ in range(repeats):
        base_times.append(timed(base))
        tern_times.append(timed(tern))
    return min(tern_times), min(base_times)


def wait_until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll ``predicate`` until true; raise BenchError after ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not done within {deadline_s:.0f} s")
        time.sleep(POLL_S)


def sample_reading(index: int) -> Reading:
    """The ``index``-th reading of the benchmark's fleet: ADC, temperature, humidity, like a node's."""
    device = f"bench-node-{index % DEVICES}"
    seq = index // DEVICES + 1
    values = {"adc_mv": 1200 + index % 400, "temp_c": 21.5 + (index % 50) / 16, "rh": 40.25, "sensor_err": 0}
    return Reading(device=device, boot=BOOT, seq=seq, ts_ms=1_795_456_737_123 + index, values=values, site=SITE)


def sample_readings(count: int, received_ms: int = 0) -> list[Reading]:
    """``count`` distinct readings (``received_ms`` stamped as the gateway would)."""
    out = []
    for i in range(count):
        r = sample_reading(i)
        out.append(Reading(r.device, r.boot, r.seq, r.ts_ms, r.values, r.site, received_ms))
    return out


def telemetry_messages(count: int) -> list[tuple[str, bytes]]:
    """(topic, payload) of ``count`` node readings, encoded as the firmware sends them."""
    return [(topics.telemetry_topic(r.site, r.device), codec.encode_reading(r)) for r in sample_readings(count)]


def sample_batches(gateway: str, batches: int) -> list[Batch]:
    """``batches`` envelopes of BATCH_READINGS distinct readings each, bseq 1..batches."""
    readings = sample_readings(batches * BATCH_READINGS, received_ms=1_795_456_737_500)
    return [
        Batch(gateway, b + 1, 1_795_456_738_000, tuple(readings[b * BATCH_READINGS : (b + 1) * BATCH_READINGS]))
        for b in range(batches)
    ]


def new_client(prefix: str, *, clean: bool = True) -> mqtt.Client:
    """A paho MQTT 3.1.1 client with a unique id and the publisher's in-flight window."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
        clean_session=clean,
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(PUBLISH_INFLIGHT)
    return client


class MqttPeer:
    """A paho client on its own network thread, connected and subscribed before it is used."""

    def __init__(self, host: str, port: int, prefix: str, subscriptions: Sequence[str] = (), timeout: float = 10.0) -> None:
        self.client = new_client(prefix)
        self._ready = threading.Event()
        self._subscriptions = list(subscriptions)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = lambda c, u, msg: self.on_message(msg)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._ready.wait(timeout):
            self.close()
            raise BenchError(f"{prefix}: no MQTT connection to {host}:{port} within {timeout:.0f} s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._subscriptions:
            client.subscribe([(t, 1) for t in self._subscriptions])
        else:
            self._ready.set()

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        """Called on paho's thread for every message; subclasses override."""

    def publish_all(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Queue every message at QoS 1 (paho sends them as its in-flight window allows)."""
        for topic, payload in messages:
            info = self.client.publish(topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BenchError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


class CountingSubscriber(MqttPeer):
    """A plain QoS 1 subscriber that counts what it receives: the pub/sub baseline's consumer."""

    def __init__(self, host: str, port: int, topic: str, expect: int) -> None:
        self.received = 0
        self.expect = expect
        self.done = threading.Event()
        super().__init__(host, port, "bench-sub", [topic])

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        if self.received >= self.expect:
            self.done.set()


class ConfirmingStandIn(MqttPeer):
    """The bridge's side of the contract on the cloud broker, without Kafka: decode, confirm.

    Used by the gateway benchmark so that it measures ingest, not Kafka (like the tests' BridgeStub).
    """

    def __init__(self, host: str, port: int, gateway: str) -> None:
        super().__init__(host, port, "bench-bridge-standin", [topics.batch_topic(gateway)])

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        batch = codec.decode_batch(msg.payload, topic_gateway=topics.parse_batch_topic(msg.topic))
        confirm = codec.Confirm(batch.gateway, batch.bseq, len(batch.readings))
        self.client.publish(topics.confirm_topic(batch.gateway), codec.encode_confirm(confirm), qos=1)


class BatchSender(MqttPeer):
    """The gateway's cloud side for the bridge benchmark: publishes batches, counts confirms."""

    def __init__(self, host: str, port: int, gateway: str, expect: int) -> None:
        self.confirmed: set[int] = set()
        self.expect = expect
        self.done = threading.Event()
        super().__init__(host, port, "bench-gw", [topics.confirm_topic(gateway)])

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        self.confirmed.add(codec.decode_confirm(msg.payload).bseq)
        if len(self.confirmed) >= self.expect:
            self.done.set()


def wait_event(event: threading.Event, deadline_s: float, what: str) -> None:
    """Wait for ``event``; raise BenchError after ``deadline_s`` seconds."""
    if not event.wait(deadline_s):
        raise BenchError(f"{what}: not done within {deadline_s:.0f} s")


# --- the lab: brokers and Kafka shared by the benchmarks of one run ----------------------


class Lab:
    """Working folder, process cleanup, Kafka and cached baselines for one ``make bench`` run."""

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.stack = ExitStack()
        self._bootstrap: str | None = None
        self.kafka_kind = ""
        self._pubsub: dict[int, float] = {}

    def folder(self, name: str) -> Path:
        """A fresh sub-folder of the working folder."""
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def mosquitto(self, stack: ExitStack, name: str) -> "Mosquitto":
        """Start a private mosquitto, stopped when ``stack`` closes."""
        from tern.stack import Mosquitto

        broker = Mosquitto(self.folder(name)).start()
        stack.callback(broker.stop)
        return broker

    def kafka(self) -> str:
        """Bootstrap of ``KAFKA_BOOTSTRAP`` or of a private Tansu started on first use."""
        if self._bootstrap is None:
            from tern.stack import Tansu, kafka_bootstrap_from_env

            external = kafka_bootstrap_from_env()
            if external:
                self._bootstrap, self.kafka_kind = external, f"KAFKA_BOOTSTRAP={external}"
            else:
                tansu = Tansu(self.folder("tansu")).start()
                self.stack.callback(tansu.stop)
                self._bootstrap, self.kafka_kind = tansu.bootstrap, "tansu (private, loopback)"
        return self._bootstrap

    def kafka_topics(self, *roles: str) -> list[str]:
        """Fresh topic names (unique to this run), created on the Kafka broker."""
        from tern.stack import ensure_topics

        suffix = uuid.uuid4().hex[:8]
        names = [f"bench.{role}.{suffix}" for role in roles]
        asyncio.run(ensure_topics(self.kafka(), names))
        return names

    def pubsub_baseline(self, count: int) -> float:
        """Readings/s of paho publisher -> mosquitto -> paho subscriber, measured once per count."""
        if count not in self._pubsub:
            self._pubsub[count] = measure_pubsub(self, count)
        return self._pubsub[count]

    def close(self) -> None:
        """Stop every process the run started."""
        self.stack.close()


# --- 1. codec ----------------------------------------------------------------------------


def bench_codec(lab: Lab) -> list[Measurement]:
    """decode_reading vs json.loads; batch encode+decode vs zlib+json."""
    return [bench_decode_reading(lab.sizes), bench_batch_roundtrip(lab.sizes)]


def bench_decode_reading(sizes: Sizes) -> Measurement:
    """Node readings decoded per second by the codec vs plain json.loads of the same bytes."""
    payloads = [payload for _, payload in telemetry_messages(DEVICES * 10)]
    loops = max(1, sizes.decode_loops // len(payloads))
    count = loops * len(payloads)

    def tern() -> None:
        decode = codec.decode_reading
        for _ in range(loops):
            for payload in payloads:
                decode(payload, site=SITE)

    def base() -> None:
        loads = json.loads
        for _ in range(loops):
            for payload in payloads:
                loads(payload)

    tern_s, base_s = best_of_interleaved(tern, base, sizes.repeats)
    return Measurement(
        name="codec.decode_reading", benchmark="codec", unit="readings/s",
        figure=rate(count, tern_s), baseline=rate(count, base_s),
        what="codec.decode_reading (parse + validate)", baseline_what="json.loads of the same bytes",
        count=count, details={"payload_bytes": len(payloads[0]), "repeats": sizes.repeats},
    )


def batch_document(batch: Batch) -> dict[str, Any]:
    """The envelope as a plain dict, for the baseline (same content as codec.encode_batch)."""
    return {
        "v": 1, "gw": batch.gateway, "bseq": batch.bseq, "sent": batch.sent_ms,
        "items": [
            {"site": r.site, "dev": r.device, "boot": r.boot, "seq": r.seq, "ts": r.ts_ms, "rx": r.received_ms, "r": dict(r.values)}
            for r in batch.readings
        ],
    }


def bench_batch_roundtrip(sizes: Sizes) -> Measurement:
    """Batches of 200 readings encoded and decoded per second vs zlib(json) both ways."""
    batch = sample_batches("bench-gw", 1)[0]
    doc = batch_document(batch)
    loops = sizes.batch_loops

    def tern() -> None:
        for _ in range(loops):
            codec.decode_batch(codec.encode_batch(batch))

    def base() -> None:
        for _ in range(loops):
            json.loads(zlib.decompress(zlib.compress(json.dumps(doc).encode())))

    tern_s, base_s = best_of_interleaved(tern, base, sizes.repeats)
    return Measurement(
        name="codec.batch_roundtrip", benchmark="codec", unit="readings/s",
        figure=rate(loops * BATCH_READINGS, tern_s), baseline=rate(loops * BATCH_READINGS, base_s),
        what=f"encode_batch + decode_batch, {BATCH_READINGS} readings",
        baseline_what="zlib.compress(json.dumps) + json.loads(zlib.decompress)",
        count=loops * BATCH_READINGS,
        details={"batch_bytes": len(codec.encode_batch(batch)), "repeats": sizes.repeats},
    )


# --- 2. outbox ---------------------------------------------------------------------------

RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, site TEXT NOT NULL, device TEXT NOT NULL, boot TEXT NOT NULL,
    seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, "values" TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_identity ON outbox (device, boot, seq);
"""
RAW_INSERT = 'INSERT OR IGNORE INTO outbox (site, device, boot, seq, ts_ms, received_ms, "values") VALUES (?, ?, ?, ?, ?, ?, ?)'


def groups(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` cut into consecutive slices of ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def outbox_add_seconds(path: Path, readings: list[Reading]) -> float:
    """Seconds to commit ``readings`` through Outbox.add in groups of OUTBOX_GROUP."""
    from edge.outbox import Outbox

    with Outbox(path) as outbox:
        start = time.perf_counter()
        for group in groups(readings, OUTBOX_GROUP):
            outbox.add(group)
        seconds = time.perf_counter() - start
        if outbox.pending() != len(readings):
            raise BenchError(f"outbox: {outbox.pending()} rows pending after adding {len(readings)}")
    return seconds


def raw_sqlite_seconds(path: Path, readings: list[Reading]) -> float:
    """Seconds to commit the same readings with sqlite3 executemany, same schema and pragmas.

    Like Outbox.add, the timing includes turning each group of Reading objects into rows.
    """
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(RAW_SCHEMA)
        start = time.perf_counter()
        for group in groups(readings, OUTBOX_GROUP):
            # Timed like Outbox.add: from Reading objects (values as compact JSON) to a commit.
            stamp = time.time_ns() // 1_000_000
            rows = [(r.site, r.device, r.boot, r.seq, r.ts_ms, stamp, json.dumps(dict(r.values), separators=(",", ":")))
                    for r in group]
            with conn:
                conn.executemany(RAW_INSERT, rows)
        seconds = time.perf_counter() - start
        if conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] != len(readings):
            raise BenchError("outbox baseline: row count differs from rows inserted")
    finally:
        conn.close()
    return seconds


def bench_outbox(lab: Lab) -> list[Measurement]:
    """Readings/s committed via Outbox.add vs raw sqlite3 (WAL, synchronous=FULL), groups of 100."""
    readings = sample_readings(lab.sizes.outbox_rows)
    tern_times, base_times = [], []
    for _ in range(lab.sizes.outbox_repeats):
        base_times.append(raw_sqlite_seconds(lab.folder("sqlite") / "raw.db", readings))
        tern_times.append(outbox_add_seconds(lab.folder("outbox") / "outbox.db", readings))
    count = len(readings)
    return [Measurement(
        name="outbox.add", benchmark="outbox", unit="readings/s",
        figure=rate(count, min(tern_times)), baseline=rate(count, min(base_times)),
        what=f"Outbox.add, {OUTBOX_GROUP} readings per commit",
        baseline_what="sqlite3 executemany of the same rows, same schema, WAL + synchronous=FULL",
        count=count, details={"repeats": lab.sizes.outbox_repeats, "group": OUTBOX_GROUP},
    )]


# --- 3. gateway ingest, and the pub/sub baseline ------------------------------------------


def measure_pubsub(lab: Lab, count: int) -> float:
    """Readings/s of paho QoS 1 publisher -> mosquitto -> plain paho QoS 1 subscriber (best round)."""
    messages = telemetry_messages(count)
    return rate(count, min(pubsub_seconds(lab, messages) for _ in range(lab.sizes.network_repeats)))


def pubsub_seconds(lab: Lab, messages: Sequence[tuple[str, bytes]]) -> float:
    """One round of the pub/sub baseline on a fresh mosquitto: seconds until all are received."""
    count = len(messages)
    with ExitStack() as stack:
        broker = lab.mosquitto(stack, "pubsub")
        subscriber = CountingSubscriber(broker.host, broker.port, topics.TELEMETRY_FILTER, count)
        stack.callback(subscriber.close)
        publisher = MqttPeer(broker.host, broker.port, "bench-node")
        stack.callback(publisher.close)
        start = time.perf_counter()
        publisher.publish_all(messages)
        wait_event(subscriber.done, lab.sizes.deadline_s, f"pub/sub baseline ({count} readings)")
        return time.perf_counter() - start


def start_gateway(lab: Lab, stack: ExitStack, local: "Mosquitto", cloud: "Mosquitto", name: str) -> "Gateway":
    """A Gateway between two private mosquittos, connected; stopped when ``stack`` closes."""
    from edge.config import GatewayConfig
    from edge.service import Gateway

    gateway_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    config = GatewayConfig(
        gateway_id=gateway_id, local_broker=local.address, cloud_broker=cloud.address,
        outbox_path=str(lab.folder(f"gateway-{name}") / "outbox.db"),
    )
    gateway = Gateway(config).start()
    stack.callback(gateway.stop)
    if not gateway.wait_connected(lab.sizes.deadline_s):
        raise BenchError(f"gateway {gateway_id} did not connect to its brokers")
    return gateway


def bench_gateway(lab: Lab) -> list[Measurement]:
    """QoS 1 readings/s from a paho node until committed in the Gateway's outbox."""
    count = lab.sizes.readings
    baseline = lab.pubsub_baseline(count)
    messages = telemetry_messages(count)
    seconds, stats = min(gateway_ingest_round(lab, messages) for _ in range(lab.sizes.network_repeats))
    return [Measurement(
        name="gateway.ingest", benchmark="gateway", unit="readings/s",
        figure=rate(count, seconds), baseline=baseline,
        what="paho node -> mosquitto -> Gateway, until committed (uplink confirmed by a paho stand-in)",
        baseline_what="paho node -> mosquitto -> plain paho QoS 1 subscriber",
        count=count, details={"seconds": round(seconds, 3), "rounds": lab.sizes.network_repeats, **stats},
    )]


def gateway_ingest_round(lab: Lab, messages: Sequence[tuple[str, bytes]]) -> tuple[float, dict[str, int]]:
    """One round on fresh brokers and outbox: seconds until every reading is committed, and ingest counters."""
    count = len(messages)
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        gateway = start_gateway(lab, stack, local, cloud, "ingest")
        standin = ConfirmingStandIn(cloud.host, cloud.port, gateway.config.gateway_id)
        stack.callback(standin.close)
        publisher = MqttPeer(local.host, local.port, "bench-node")
        stack.callback(publisher.close)
        start = time.perf_counter()
        publisher.publish_all(messages)
        wait_until(lambda: gateway.ingest.stats()["committed"] >= count, lab.sizes.deadline_s,
                   f"gateway ingest ({count} readings)")
        seconds = time.perf_counter() - start
        stats = gateway.ingest.stats()
        # Not timed: the round only counts if the stand-in confirmed every reading out again.
        wait_until(lambda: gateway.outbox.pending() == 0, lab.sizes.deadline_s, "gateway uplink draining the outbox")
    return seconds, {k: stats[k] for k in ("committed", "duplicates", "dead_lettered", "node_acks")}


# --- 4. bridge ---------------------------------------------------------------------------


def start_bridge(lab: Lab, stack: ExitStack, cloud: "Mosquitto", readings_topic: str, deadletter_topic: str, name: str) -> "BridgeThread":
    """A BridgeThread from the cloud mosquitto to Kafka; stopped when ``stack`` closes."""
    from cloud.bridge import BridgeThread
    from cloud.config import BridgeConfig

    # The bridge checks every topic it writes to at start-up: give it a status topic of its own.
    (status_topic,) = lab.kafka_topics(f"{name}-status")
    config = BridgeConfig(
        name=f"bench-{name}-{uuid.uuid4().hex[:6]}", mqtt_broker=cloud.address, kafka_bootstrap=lab.kafka(),
        readings_topic=readings_topic, status_topic=status_topic, deadletter_topic=deadletter_topic,
    )
    bridge = BridgeThread(config).start()
    stack.callback(bridge.stop)
    return bridge


def kafka_record_count(bootstrap: str, topic: str, expect: int, timeout_s: float) -> tuple[int, int]:
    """(records, distinct identities) read back from ``topic``, waiting up to ``timeout_s`` for ``expect``.

    Reads the records instead of subtracting offsets: on Tansu, end minus beginning offsets
    does not equal the number of records written.
    """
    from cloud.consume import read_all

    records = read_all(bootstrap, topic, timeout_s=timeout_s, expect=expect)
    return len(records), len({r.identity for r in records})


async def produce_seconds(bootstrap: str, records: Sequence[codec.KafkaRecord], topic: str, deadline_s: float) -> float:
    """Seconds for a raw aiokafka producer (acks=all, the bridge's settings) to write ``records``."""
    from aiokafka import AIOKafkaProducer

    from cloud.config import BridgeConfig

    cfg = BridgeConfig()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
        linger_ms=cfg.linger_ms, max_batch_size=cfg.max_batch_bytes, request_timeout_ms=cfg.request_timeout_ms,
    )
    await asyncio.wait_for(producer.start(), deadline_s)
    try:
        await asyncio.wait_for(producer.partitions_for(topic), deadline_s)
        start = time.perf_counter()
        futures = [await producer.send(topic, r.value, key=r.key, headers=list(r.headers)) for r in records]
        await asyncio.wait_for(asyncio.gather(*futures), deadline_s)
        return time.perf_counter() - start
    finally:
        await producer.stop()


def kafka_records(batches: Sequence[Batch], topic: str) -> list[codec.KafkaRecord]:
    """The records the bridge writes for ``batches`` (same keys, headers and value sizes)."""
    now = 1_795_456_739_000
    return [codec.kafka_record(r, b.gateway, topic, now) for b in batches for r in b.readings]


def bench_bridge(lab: Lab) -> list[Measurement]:
    """Records/s from batches on the cloud broker until confirmed by the real bridge, vs aiokafka."""
    gateway_id = f"bench-gw-{uuid.uuid4().hex[:6]}"
    batches = sample_batches(gateway_id, lab.sizes.bridge_batches)
    count = len(batches) * BATCH_READINGS
    rounds = [(baseline_round(lab, batches), bridge_round(lab, batches)) for _ in range(lab.sizes.network_repeats)]
    base_s = min(base for base, _ in rounds)
    seconds, details = min(tern for _, tern in rounds)
    return [Measurement(
        name="bridge.kafka", benchmark="bridge", unit="records/s",
        figure=rate(count, seconds), baseline=rate(count, base_s),
        what=f"{len(batches)} batches of {BATCH_READINGS} on the cloud broker -> BridgeThread -> Kafka, until confirmed",
        baseline_what="raw aiokafka producer, acks=all, same records (send all, then wait)",
        count=count, details={"seconds": round(seconds, 3), "baseline_seconds": round(base_s, 3),
                              "rounds": lab.sizes.network_repeats, "kafka": lab.kafka_kind, **details},
    )]


def baseline_round(lab: Lab, batches: Sequence[Batch]) -> float:
    """Seconds for a raw aiokafka producer to write the records of ``batches`` to a fresh topic."""
    (topic,) = lab.kafka_topics("baseline")
    return asyncio.run(produce_seconds(lab.kafka(), kafka_records(batches, topic), topic, lab.sizes.deadline_s))


def bridge_round(lab: Lab, batches: Sequence[Batch]) -> tuple[float, dict[str, Any]]:
    """One round on a fresh broker, bridge and topic: seconds until every batch is confirmed."""
    readings_topic, deadletter_topic = lab.kafka_topics("readings", "deadletter")
    gateway_id = batches[0].gateway
    count = len(batches) * BATCH_READINGS
    payloads = [(topics.batch_topic(gateway_id), codec.encode_batch(b)) for b in batches]
    with ExitStack() as stack:
        cloud = lab.mosquitto(stack, "cloud")
        bridge = start_bridge(lab, stack, cloud, readings_topic, deadletter_topic, "bridge")
        sender = BatchSender(cloud.host, cloud.port, gateway_id, len(batches))
        stack.callback(sender.close)
        start = time.perf_counter()
        sender.publish_all(payloads)
        wait_event(sender.done, lab.sizes.deadline_s, f"bridge confirming {len(batches)} batches")
        seconds = time.perf_counter() - start
        stats = bridge.stats()
    written, distinct = kafka_record_count(lab.kafka(), readings_topic, count, lab.sizes.deadline_s)
    if distinct < count:
        raise BenchError(f"bridge: {distinct} distinct readings in Kafka after {count} confirmed")
    return seconds, {"records_in_kafka": written, "distinct_in_kafka": distinct,
                     "bridge": {k: stats[k] for k in ("records_written", "batches_confirmed", "retries")}}


# --- 5. end to end -----------------------------------------------------------------------


def bench_e2e(lab: Lab) -> list[Measurement]:
    """Readings/s from a paho node through gateway, bridge and Kafka, vs mosquitto pub/sub."""
    count = lab.sizes.readings
    baseline = lab.pubsub_baseline(count)
    messages = telemetry_messages(count)
    seconds, details = min(e2e_round(lab, messages) for _ in range(lab.sizes.network_repeats))
    return [Measurement(
        name="e2e.node_to_kafka", benchmark="e2e", unit="readings/s",
        figure=rate(count, seconds), baseline=baseline,
        what="paho node -> mosquitto -> Gateway -> mosquitto -> BridgeThread -> Kafka",
        baseline_what="paho node -> mosquitto -> plain paho QoS 1 subscriber (as gateway.ingest)",
        count=count, details={"seconds": round(seconds, 3), "rounds": lab.sizes.network_repeats,
                              "kafka": lab.kafka_kind, **details},
    )]


def e2e_round(lab: Lab, messages: Sequence[tuple[str, bytes]]) -> tuple[float, dict[str, Any]]:
    """One round on fresh brokers, outbox, bridge and topic: seconds until every reading is in Kafka."""
    count = len(messages)
    readings_topic, deadletter_topic = lab.kafka_topics("e2e", "e2e-deadletter")
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        bridge = start_bridge(lab, stack, cloud, readings_topic, deadletter_topic, "e2e")
        gateway = start_gateway(lab, stack, local, cloud, "e2e")
        publisher = MqttPeer(local.host, local.port, "bench-node")
        stack.callback(publisher.close)
        start = time.perf_counter()
        publisher.publish_all(messages)
        # records_written counts records Kafka has acknowledged (acks=all).
        wait_until(lambda: bridge.stats()["records_written"] >= count, lab.sizes.deadline_s,
                   f"end to end ({count} readings into Kafka)")
        seconds = time.perf_counter() - start
        uplink = gateway.uplink.stats()
    written, distinct = kafka_record_count(lab.kafka(), readings_topic, count, lab.sizes.deadline_s)
    if distinct < count:
        raise BenchError(f"end to end: {distinct} distinct readings in Kafka, expected {count}")
    return seconds, {"records_in_kafka": written, "distinct_in_kafka": distinct,
                     "batches_confirmed": uplink["batches_confirmed"]}


# --- 6. firmware memory ------------------------------------------------------------------

#: Mirrors device_firmware/main.py's import order (one module at a time, collecting in
#: between), then takes readings without a broker: the ring fills and drops the oldest.
FIRMWARE_DRIVER = """\
import gc
import sys
import machine
import tern_config
cfg = tern_config.load()
del tern_config
del sys.modules["tern_config"]
gc.collect()
for _name in ("tern_util", "tern_ring", "umqtt.simple", "tern_link", "tern_sensors"):
    __import__(_name)
    gc.collect()
import tern_node
gc.collect()
node = tern_node.Node(cfg)
for _ in range(%d):
    node.take_reading()
gc.collect()
print("BENCH %%d %%d %%d %%d" %% (gc.mem_free(), node.ring.count, node.ring.size, node.ring.dropped))
""" % FIRMWARE_READINGS

UMQTT_DRIVER = """\
import gc
import umqtt.simple
gc.collect()
print("BENCH %d" % gc.mem_free())
"""

EMPTY_DRIVER = """\
import gc
gc.collect()
print("BENCH %d" % gc.mem_free())
"""


def run_micropython(folder: Path, script: str, timeout: float) -> list[int]:
    """Run ``script`` on the unix port (64K heap, emulated board, firmware on the path); its BENCH numbers."""
    path = folder / "driver.py"
    path.write_text(script)
    root = repo_root()
    env = dict(os.environ, MICROPYPATH=os.pathsep.join(
        [str(root / "hardware" / "emulated"), str(umqtt_path()), str(root / "device_firmware")]))
    try:
        out = subprocess.run(
            [str(micropython_binary()), "-X", f"heapsize={FIRMWARE_HEAP}", str(path)],
            cwd=folder, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"firmware: MicroPython driver did not finish within {timeout:.0f} s") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"firmware: MicroPython driver failed (exit {out.returncode}): {tail[0]}")
    return [int(x) for x in lines[-1].split()[1:]]


def bench_firmware(lab: Lab) -> list[Measurement]:
    """Free heap with the firmware loaded and a full ring vs with only umqtt.simple imported."""
    folder = lab.folder("firmware")
    (folder / "config.json").write_text(json.dumps(
        {"site": SITE, "device": "bench-node", "broker": "127.0.0.1", "port": 1883, "ntp": False}))
    timeout = lab.sizes.deadline_s
    tern_free, ring_count, ring_size, dropped = run_micropython(folder, FIRMWARE_DRIVER, timeout)
    if ring_count != ring_size or dropped != FIRMWARE_READINGS - ring_size:
        raise BenchError(f"firmware: ring not full after {FIRMWARE_READINGS} readings ({ring_count}/{ring_size}, {dropped} dropped)")
    (umqtt_free,) = run_micropython(folder, UMQTT_DRIVER, timeout)
    (empty_free,) = run_micropython(folder, EMPTY_DRIVER, timeout)
    return [Measurement(
        name="firmware.heap_free", benchmark="firmware", unit="bytes free",
        figure=float(tern_free), baseline=float(umqtt_free),
        what=f"gc.mem_free() after the firmware's imports + {FIRMWARE_READINGS} readings, ring full ({ring_size})",
        baseline_what="gc.mem_free() after importing only umqtt.simple",
        count=FIRMWARE_READINGS,
        details={"heap": FIRMWARE_HEAP, "empty_heap_free": empty_free, "firmware_used": empty_free - tern_free,
                 "umqtt_used": empty_free - umqtt_free, "ring_size": ring_size, "dropped": dropped},
    )]


# --- running and reporting ----------------------------------------------------------------

RUNNERS: dict[str, Callable[[Lab], list[Measurement]]] = {
    "codec": bench_codec,
    "outbox": bench_outbox,
    "gateway": bench_gateway,
    "bridge": bench_bridge,
    "e2e": bench_e2e,
    "firmware": bench_firmware,
}


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "platform": platform.platform(), "python": platform.python_version()}


def run_benchmarks(names: Sequence[str], sizes: Sizes, workdir: Path, progress: Callable[[str], None]) -> tuple[list[Measurement], str]:
    """Run the named benchmarks in order; return their measurements and which Kafka was used."""
    lab = Lab(sizes, workdir)
    results: list[Measurement] = []
    try:
        for name in names:
            progress(name)
            results.extend(RUNNERS[name](lab))
    finally:
        lab.close()
    return results, lab.kafka_kind


def format_figure(value: float, unit: str) -> str:
    """A figure with its unit, readable at a glance."""
    if unit.startswith("bytes"):
        return f"{value:,.0f} B"
    return f"{value:,.0f}/s"


def render_table(results: Sequence[Measurement], title: str) -> "Table":
    """The results as a rich Table."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measurement")
    table.add_column("Tern", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("n", justify="right")
    for m in results:
        table.add_row(m.name, format_figure(m.figure, m.unit), format_figure(m.baseline, m.unit),
                      f"{m.ratio:.2f}", f"{m.count:,}")
    return table


def legend(results: Sequence[Measurement]) -> list[str]:
    """One line per measurement: what the Tern figure and the baseline measure."""
    return [f"{m.name}: {m.what}; baseline: {m.baseline_what}" for m in results]


def report(results: Sequence[Measurement], mode: str, kafka: str, elapsed: float) -> dict[str, Any]:
    """The JSON document for latest.json."""
    return {
        "schema": "tern.bench/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "elapsed_s": round(elapsed, 2),
        "machine": machine_info(),
        "kafka": kafka,
        "measurements": [m.as_json() for m in results],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: --quick, --only NAME (repeatable), --json PATH."""
    parser = argparse.ArgumentParser(prog="python -m tern.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: the whole run takes well under 30 s")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON (default .cache/bench/latest.json)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table, write the JSON; one line and exit 2 on error."""
    from rich.console import Console

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    sizes, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    bench_root = cache_dir() / "bench"
    out_path = args.json or bench_root / "latest.json"
    started = time.monotonic()
    try:
        bench_root.mkdir(parents=True, exist_ok=True)
        # On the repository's disk, not a tmpfs: the outbox's fsyncs must cost what they cost.
        with tempfile.TemporaryDirectory(prefix="run-", dir=bench_root) as workdir:
            results, kafka = run_benchmarks(names, sizes, Path(workdir), lambda n: console.print(f"[dim]bench: {n}…[/dim]"))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (TernError, OSError, asyncio.TimeoutError, sqlite3.Error) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"bench: error: {message}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    doc = report(results, mode, kafka, elapsed)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    info = doc["machine"]
    console.print(render_table(results, f"Tern benchmarks ({mode}, {info['cpus']} cores, {elapsed:.0f} s)"))
    for line in legend(results):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    console.print(f"ratio = Tern / baseline, both measured in this run (Kafka: {kafka or 'not used'}). JSON: {out_path}",
                  highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

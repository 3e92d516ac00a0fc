"""Constants, sizes, the Measurement record and small helpers shared by every stage."""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tern.core import codec, topics
from tern.core.codec import Batch, Reading
from tern.core.errors import TernError

# ``apache`` last: its three JVMs are stopped when it ends, so they never share the cores with another stage.
BENCHMARKS = ("codec", "outbox", "gateway", "bridge", "e2e", "firmware", "ota", "drain", "live", "latency", "growth",
              "fleet", "wear", "scaleout", "apache")
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
#: The paho publisher's QoS 1 window (a node's own is far smaller).
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
    readings: int  # gateway ingest and end to end
    bridge_batches: int
    network_repeats: int  # rounds of gateway, bridge, e2e and pub/sub; the median counts
    deadline_s: float
    # --- issue 13: processes of their own, many connections, a big backlog ---
    naive_readings: int = 1_000  # per round of the naive per-message bridge (live and drain)
    drain_readings: int = 20_000  # the backlog, filled through Outbox.add
    raw_readings: int = 20_000  # at most this many of the backlog's records for raw aiokafka
    live_readings: int = 5_000
    connections: int = 20  # node connections publishing at once
    latency_s: float = 2.0  # seconds of steady load in the latency stage
    scale_readings: int = 10_000  # per gateway, three gateways, for the scale-out stage
    rounds: int = 1  # rounds of the issue-13 stages (min, median, max reported)
    stage_budget_s: float = 120.0  # no new round of a stage starts after this long
    # --- issue 23: the same bridge and drain stages on a 3-node Apache Kafka (RF 3, acks=all) ---
    apache_drain_readings: int = 5_000  # the backlog drained, and the records each raw client writes
    apache_rounds: int = 1
    # --- issue 27: cost as the work grows ---
    growth_preloads: tuple[int, ...] = (0, 20_000)  # readings already in the outbox (the first: the baseline)
    growth_drain: int = 3_000  # readings drained (the oldest), timed, at each preload
    growth_ingest: int = 1_000  # readings ingested, timed, at each preload
    growth_rounds: int = 1  # rounds of each, alternating the preloads; the best counts
    fleet_connections: int = 50  # node connections, one device each
    fleet_seconds: float = 2.0  # each publishes for this long
    fleet_rate: float = 2.0  # readings/s per connection
    wear_readings: int = 2_000  # readings through the gateway for the bytes-written figure
    #: Whether the apache stage may start a cluster of its own (a quick run does not, unless the
    #: stage is named with --only, the run's Kafka already is one, or a cluster is given).
    apache_start: bool = False
    # --- issue 26: nodes updated together behind one gateway ---
    ota_nodes: int = 2


QUICK = Sizes(decode_loops=5_000, batch_loops=25, repeats=3, outbox_rows=5_000, outbox_repeats=1,
              readings=2_000, bridge_batches=20, network_repeats=1, deadline_s=30.0)
FULL = Sizes(decode_loops=50_000, batch_loops=250, repeats=5, outbox_rows=20_000, outbox_repeats=3,
             readings=20_000, bridge_batches=200, network_repeats=2, deadline_s=300.0,
             naive_readings=4_000, drain_readings=1_000_000, raw_readings=200_000, live_readings=30_000,
             connections=50, latency_s=8.0, scale_readings=50_000, rounds=3, stage_budget_s=150.0, ota_nodes=20,
             apache_drain_readings=100_000, apache_rounds=2, apache_start=True,
             growth_preloads=(0, 1_000_000, 10_000_000), growth_drain=100_000, growth_ingest=10_000, growth_rounds=2,
             fleet_connections=1_000, fleet_seconds=20.0, fleet_rate=1.0, wear_readings=20_000)


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
    #: The figure of every round (the figure itself is their median), and the baseline's.
    rounds: list[float] = field(default_factory=list)
    baseline_rounds: list[float] = field(default_factory=list)
    #: ``"ratio >= 40"``, ``"figure <= 250"``...: what issue 13 asks; None when nothing is asked.
    target: str | None = None
    #: Why the stage did not run (then figure and baseline are 0 and no target is judged).
    skipped: str | None = None

    @property
    def ratio(self) -> float:
        """figure / baseline (NaN when the stage was skipped)."""
        if self.skipped or not self.baseline:
            return math.nan
        return self.figure / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None without a target or when skipped."""
        if self.target is None or self.skipped:
            return None
        return target_met(self.target, self.figure, self.ratio)

    def as_json(self) -> dict[str, Any]:
        """The JSON form written to latest.json."""
        return {
            "name": self.name,
            "benchmark": self.benchmark,
            "unit": self.unit,
            "figure": self.figure,
            "baseline": self.baseline,
            "ratio": None if math.isnan(self.ratio) else self.ratio,
            "what": self.what,
            "baseline_what": self.baseline_what,
            "count": self.count,
            "details": self.details,
            "rounds": spread(self.rounds),
            "baseline_rounds": spread(self.baseline_rounds),
            "target": self.target,
            "met": self.met,
            "skipped": self.skipped,
        }


def target_met(target: str, figure: float, ratio: float) -> bool:
    """Judge ``"<figure|ratio> <op> <number>"`` (op ``>=`` or ``<=``)."""
    subject, op, number = target.split()
    value = figure if subject == "figure" else ratio
    if math.isnan(value):
        return False
    return value >= float(number) if op == ">=" else value <= float(number)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """min, median, max and every value of a list of round figures (empty dict for none)."""
    if not values:
        return {}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "all": [round(v, 3) for v in values]}


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (the headline figure of a stage run in rounds)."""
    return float(statistics.median(values))


def skipped(name: str, benchmark: str, unit: str, what: str, baseline_what: str, reason: str,
            target: str | None = None) -> Measurement:
    """A measurement that could not be taken, with the visible reason why."""
    return Measurement(name=name, benchmark=benchmark, unit=unit, figure=0.0, baseline=0.0, what=what,
                       baseline_what=baseline_what, count=0, target=target, skipped=reason)


def run_rounds(lab_sizes: "Sizes", one: Callable[[int], Any]) -> list[Any]:
    """``one(round_index)`` for ``lab_sizes.rounds`` rounds, starting no new one after the stage budget."""
    started = time.monotonic()
    out = [one(0)]
    for index in range(1, lab_sizes.rounds):
        if time.monotonic() - started > lab_sizes.stage_budget_s:
            break
        out.append(one(index))
    return out


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

"""Latency node -> Kafka at a steady 50 % of the live capacity measured in the same run.

The fleet (:class:`~tern.harness.bench.pacedfleet.PacedFleet`: a connection per device, every
reading a ready-made QoS 1 PUBLISH sent from one loop in the bench process) publishes at a
fixed rate, each reading stamped with its send time (``ts``, wall clock ms). A consumer in a
process of its own tails the readings topic (``fetch_max_wait_ms`` 10) and stamps each
record's arrival, so a figure is an upper bound on node -> Kafka: it includes the consumer's
fetch. Baseline: the same load into a mosquitto with a plain subscriber process that stamps
each reading on arrival the same way.

The load generator must leave the machine to what it measures: a ``mosquitto_pub`` per
device fed through pipes cost ~90 µs of CPU per reading with its pacing loop, a whole core of
two at ~12,000/s, and the rounds (the baseline's too) measured a machine out of CPU. The paho
fleet before it queued readings behind its threads after stamping them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import ExitStack
from typing import Any

from tern.harness.bench.common import BenchError, Measurement, median, run_rounds
from tern.harness.bench.lab import Lab
from tern.harness.bench.live import devices, live_capacity, start_pipeline
from tern.harness.bench.proc import Child
from tern.harness.bench.pacedfleet import PacedFleet


#: The hops of :attr:`TopicTail.hops`, in path order: each ends at a stamp the record carries
#: (``gateway_rx_ms``: the gateway's outbox commit; ``bridge_ms``: the bridge's decode; the
#: record's CreateTime: the bridge's producer) or at the consumer's arrival stamp.
HOPS = ("node -> gateway commit", "gateway commit -> bridge decode", "bridge decode -> producer",
        "producer -> consumer")


class TopicTail:
    """A consumer on its own thread and loop, keeping arrival - ts (ms) of every reading."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.latencies: list[int] = []
        #: ts -> the record's CreateTime (stamped by the bridge's producer when it hands the
        #: record over): a lower bound, without Kafka's ack and the consumer's fetch.
        self.to_producer: list[int] = []
        #: The same path cut at the stamps each record carries (all wall clock, one machine):
        #: which hop a slow reading spent its time in, by hop name (see :data:`HOPS`).
        self.hops: dict[str, list[int]] = {name: [] for name in HOPS}
        #: (seconds since the first record, latency ms) of the slowest record of each second:
        #: a stall shows as one spike, an overload as a climb.
        self.by_second: dict[int, int] = {}
        self._first_s: float | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(bootstrap, topic)), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise BenchError(f"latency: no consumer on {topic} within 30 s")
        if self._error is not None:
            raise BenchError(f"latency: consumer failed: {self._error}")

    async def _run(self, bootstrap: str, topic: str) -> None:
        from aiokafka import AIOKafkaConsumer

        from tern.cloud.consume import assign_from_beginning

        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=10)
        try:
            await consumer.start()
            await assign_from_beginning(consumer, topic, 15)
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=50)
                now = time.time_ns() // 1_000_000
                if batches and self._first_s is None:
                    self._first_s = now / 1000
                for records in batches.values():
                    for record in records:
                        self._stamp(json.loads(record.value), record.timestamp, now)
        finally:
            await consumer.stop()

    def _stamp(self, value: dict[str, Any], created_ms: int, now: int) -> None:
        ts, committed, bridged = value["ts_ms"], value["gateway_rx_ms"], value["bridge_ms"]
        total = now - ts
        self.latencies.append(total)
        self.to_producer.append(created_ms - ts)
        hops = self.hops
        hops["node -> gateway commit"].append(committed - ts)
        hops["gateway commit -> bridge decode"].append(bridged - committed)
        hops["bridge decode -> producer"].append(created_ms - bridged)
        hops["producer -> consumer"].append(now - created_ms)
        second = int(now / 1000 - (self._first_s or 0))
        if total > self.by_second.get(second, -1):
            self.by_second[second] = total

    def close(self) -> None:
        """Stop the consumer."""
        self._stop.set()
        self._thread.join(10)


def percentiles(values: list[int]) -> dict[str, float]:
    """p50, p99 and max of latencies in ms."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("latency: no samples")
    pick = lambda q: float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": float(ordered[-1]), "n": len(ordered)}


def tern_round(lab: Lab, rate: float) -> dict[str, Any]:
    """One paced run through gateway and bridge into Kafka: the tail's final report
    (``latencies_ms``, ``to_producer_ms``, ``hops_ms`` by hop, ``by_second_ms``)."""
    with ExitStack() as stack:
        local, _, _, bridge, topic = start_pipeline(lab, stack, "latency")
        tail = Child("tail", {"bootstrap": lab.kafka(), "topic": topic}, timeout=45)
        stack.callback(tail.stop)
        fleet = PacedFleet(local.host, local.port, devices(lab))
        stack.callback(fleet.close)
        sent = fleet.publish_paced(rate, lab.sizes.latency_s)
        tail.wait_for(lambda s: s.get("received", 0) >= sent, lab.sizes.deadline_s,
                      f"latency: {sent} readings into Kafka")
        tail.stop()
        return dict(tail.final)


def pubsub_round(lab: Lab, rate: float) -> list[int]:
    """Latencies of the same paced run into a plain subscriber."""
    with ExitStack() as stack:
        broker = lab.mosquitto(stack, "latency-pubsub")
        subscriber = Child("subscriber", {"mqtt_host": broker.host, "mqtt_port": broker.port, "latency": True,
                                          "client_id": f"bench-lat-{time.time_ns() % 10**8}"})
        stack.callback(subscriber.stop)
        fleet = PacedFleet(broker.host, broker.port, devices(lab))
        stack.callback(fleet.close)
        sent = fleet.publish_paced(rate, lab.sizes.latency_s)
        subscriber.wait_for(lambda s: s.get("received", 0) >= sent, lab.sizes.deadline_s, "latency baseline")
        subscriber.stop()
        return list(subscriber.final.get("latencies_ms", []))


def bench_latency(lab: Lab) -> list[Measurement]:
    """p50/p99/max node -> Kafka at half the live capacity (target p99 <= 250 ms) vs plain pub/sub."""
    capacity = live_capacity(lab)
    rate = capacity / 2
    rounds = run_rounds(lab.sizes, lambda i: (pubsub_round(lab, rate), tern_round(lab, rate)))
    tern = [percentiles(t["latencies_ms"]) for _, t in rounds]
    base = [percentiles(b) for b, _ in rounds]
    lower = [percentiles(t["to_producer_ms"]) for _, t in rounds]
    # Where each round's time went: p50/p99/max per hop, and the slowest reading of each
    # second (a stall is one spike, an overload a climb).
    hops = [{hop: percentiles(t["hops_ms"][hop]) for hop in HOPS} for _, t in rounds]
    by_second = [t["by_second_ms"] for _, t in rounds]
    # The figures of docs/: every sample of the last round.
    lab.series["latency"] = {"Tern, node -> Kafka (consumer stamps)": rounds[-1][1]["latencies_ms"],
                             "Tern, node -> bridge's producer (record CreateTime)": rounds[-1][1]["to_producer_ms"],
                             "plain pub/sub": rounds[-1][0]}
    count = sum(p["n"] for p in tern)
    what = f"node -> gateway -> bridge -> Kafka at {rate:,.0f} readings/s (50 % of live capacity {capacity:,.0f}/s)"
    base_what = f"node -> mosquitto -> plain subscriber process at the same {rate:,.0f} readings/s"
    details: dict[str, Any] = {"rate": rate, "capacity": capacity, "seconds": lab.sizes.latency_s,
                               "tern": tern, "baseline": base, "to_bridge_producer": lower,
                               "hops": hops, "slowest_by_second": by_second}
    out = []
    for key, target in (("p50", None), ("p99", "figure <= 250"), ("max", None)):
        figures = [p[key] for p in tern]
        baselines = [p[key] for p in base]
        out.append(Measurement(name=f"latency.{key}", benchmark="latency", unit="ms", figure=median(figures),
                               baseline=max(median(baselines), 0.5), what=f"{key}, {what}", baseline_what=f"{key}, {base_what}",
                               count=count, details=details if key == "p99" else {}, rounds=figures,
                               baseline_rounds=baselines, target=target))
    return out

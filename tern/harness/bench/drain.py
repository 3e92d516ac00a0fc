"""Backlog drain: a full outbox emptied into Kafka through the real uplink and bridge.

The backlog is built in bulk **on the outbox's own schema** (:mod:`tern.harness.bench.preload`:
the tables and indexes ``Outbox`` creates, the rows and sequence marks ``Outbox.add`` would
leave), not through MQTT: a million readings through the ingest would take the whole time
budget of ``make bench``. It is cached between runs and copied for each round.
Then, in processes of their own, a bridge is started on a fresh cloud broker and a gateway on
that outbox; the round is timed from the gateway's start until its outbox is empty, i.e. until
the last confirm. Every reading is then read back from Kafka: all there, each device in order.

Baselines, same run: the naive per-message bridge draining its own backlog
(:mod:`tern.harness.bench.naive`), a raw aiokafka producer (acks=all) and a plain librdkafka
producer (:mod:`tern.harness.bench.rdkafka`, acks=all) writing the same records (the first
``raw_readings`` of them: keeping a million records in memory would measure the swap, not Kafka).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tern.core import codec
from tern.harness.bench.bridge import produce_seconds
from tern.harness.bench.common import BenchError, Measurement, median, rate, run_rounds, skipped
from tern.harness.bench.kafka_check import check_topic
from tern.harness.bench.lab import Lab
from tern.harness.bench.naive import naive_rate, naive_rates
from tern.harness.bench.nodes import fleet_reading
from tern.harness.bench.preload import preloaded_outbox
from tern.harness.bench.proc import Child

DEVICES = 200
FILL_GROUP = 10_000
RECEIVED_MS = 1_795_456_737_500


def fill_outbox(path: Path, count: int) -> float:
    """Write ``count`` readings into a new outbox at ``path`` through ``Outbox.add``; seconds taken."""
    from tern.edge.outbox import Outbox

    start = time.perf_counter()
    with Outbox(path, max_rows=max(count, 1)) as outbox:
        for first in range(0, count, FILL_GROUP):
            group = [fleet_reading(i, DEVICES) for i in range(first, min(first + FILL_GROUP, count))]
            outbox.add(group, received_ms=RECEIVED_MS)
        if outbox.pending() != count:
            raise BenchError(f"drain: outbox holds {outbox.pending()} readings after adding {count}")
    return time.perf_counter() - start


def template_outbox(lab: Lab, count: int | None = None) -> Path:
    """The filled outbox of ``count`` readings (default ``drain_readings``): built in bulk on the
    outbox's own schema and cached between runs (:mod:`tern.harness.bench.preload`)."""
    count = lab.sizes.drain_readings if count is None else count
    key = "drain_template" if count == lab.sizes.drain_readings else f"drain_template_{count}"
    if key not in lab.cache:
        path, built_s = preloaded_outbox(count)
        lab.cache[key.replace("template", "fill_s")] = built_s
        lab.cache[key] = path
    return lab.cache[key]  # type: ignore[return-value]


def copy_outbox(template: Path, folder: Path) -> Path:
    """A copy of the template outbox (its WAL, if any, too) in ``folder``."""
    target = folder / "outbox.db"
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(template) + suffix)
        if source.exists():
            shutil.copyfile(source, Path(str(target) + suffix))
            with Path(str(target) + suffix).open("rb+") as f:
                os.fsync(f.fileno())  # written back before the round is timed
    return target


def bridge_config(lab: Lab, broker: Any, name: str, readings: str, status: str, deadletter: str, **extra: Any) -> dict[str, Any]:
    """Settings of a bridge child (``extra`` may carry keys of a newer bridge, like share_group)."""
    return {"name": f"bench-{name}-{uuid.uuid4().hex[:6]}", "mqtt_broker": broker.address,
            "kafka_bootstrap": lab.kafka(), "readings_topic": readings, "status_topic": status,
            "deadletter_topic": deadletter, **extra}


def gateway_config(lab: Lab, local: Any, cloud: Any, outbox: Path, name: str, **extra: Any) -> dict[str, Any]:
    """Settings of a gateway child."""
    return {"gateway_id": f"bench-{name}-{uuid.uuid4().hex[:6]}", "local_broker": local.address,
            "cloud_broker": cloud.address, "outbox_path": str(outbox), "max_rows": max(lab.sizes.drain_readings, 5_000_000),
            **extra}


def drain_round(lab: Lab, index: int, count: int | None = None) -> dict[str, Any]:
    """One drain of ``count`` readings (default ``drain_readings``) on fresh brokers, topics and outbox copy."""
    count = lab.sizes.drain_readings if count is None else count
    readings, status, deadletter = lab.kafka_topics("drain", "drain-status", "drain-deadletter")
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        outbox = copy_outbox(template_outbox(lab, count), lab.folder(f"drain-{index}"))
        bridge = Child("bridge", bridge_config(lab, cloud, "drain", readings, status, deadletter))
        stack.callback(bridge.stop)
        gateway = Child("gateway", gateway_config(lab, local, cloud, outbox, "drain"))
        gateway.keep_history = True
        stack.callback(gateway.stop)
        end = gateway.wait_for(lambda s: s.get("pending", 1) == 0,
                               lab.sizes.deadline_s, f"drain of {count} readings")
        start = gateway.ready_t
        progress = [(round(t - start, 3), count - s.get("pending", count)) for t, s in gateway.history]
        used = {"gateway": gateway.resources(), "bridge": bridge.resources()}
        uplink = gateway.stats
        bridge_stats = bridge.stats
    check = check_topic(lab.kafka(), readings, count, lab.sizes.deadline_s)
    check.require(count, f"drain round {index + 1}")
    seconds = max(end - start, 1e-6)
    return {"rate": count / seconds, "seconds": round(seconds, 3), "progress": progress, "resources": used,
            "uplink": {k: uplink.get(k) for k in ("batches_sent", "batches_resent", "batches_confirmed", "forwarded", "deletes")},
            "bridge": {k: bridge_stats.get(k) for k in ("records_written", "batches_confirmed", "retries", "duplicates_received")},
            "dropped_keys": gateway.ready_info.get("dropped", []) + bridge.ready_info.get("dropped", []),
            "gateway_settings": gateway.ready_info.get("settings", {}), "bridge_settings": bridge.ready_info.get("settings", {}),
            **check.as_json()}


def raw_kafka_round(lab: Lab, count: int) -> tuple[float, float | None]:
    """Records/s of a raw aiokafka producer (acks=all, the bridge's settings) and of a plain
    librdkafka producer (None without confluent-kafka) on the backlog's first ``count`` records,
    each to a fresh topic of its own."""
    from tern.harness.bench import rdkafka

    aio_topic, rd_topic = lab.kafka_topics("drain-raw", "drain-librdkafka")
    # One list for both clients: they take the topic as an argument, not from the record.
    records = [codec.kafka_record(fleet_reading(i, DEVICES), "bench-raw", aio_topic, RECEIVED_MS) for i in range(count)]
    aio = rate(count, asyncio.run(produce_seconds(lab.kafka(), records, aio_topic, lab.sizes.deadline_s)))
    if rdkafka.missing():
        return aio, None
    return aio, rate(count, rdkafka.produce_seconds(lab.kafka(), records, rd_topic, lab.sizes.deadline_s))


def raw_measurements(prefix: str, what: str, count: int, raw_count: int, drain_rates: list[float],
                     raws: list[tuple[float, float | None]], target: str | None) -> list[Measurement]:
    """``<prefix>drain.vs_raw_kafka`` (target ``target``) and ``<prefix>drain.vs_librdkafka`` (no target)."""
    from tern.harness.bench import rdkafka

    aio_rates = [aio for aio, _ in raws]
    figure = median(drain_rates)
    out = [Measurement(name=f"{prefix}drain.vs_raw_kafka", benchmark="drain", unit="readings/s", figure=figure,
                       baseline=median(aio_rates), what=what,
                       baseline_what=f"raw aiokafka producer, acks=all, first {raw_count:,} of the same records",
                       count=count, details={"raw_count": raw_count}, rounds=drain_rates,
                       baseline_rounds=aio_rates, target=target)]
    rd_what = (f"plain librdkafka producer (confluent-kafka, its defaults, acks=all, no idempotence), "
               f"first {raw_count:,} of the same records")
    rd_rates = [rd for _, rd in raws if rd is not None]
    if not rd_rates:
        out.append(skipped(f"{prefix}drain.vs_librdkafka", "drain", "readings/s", what, rd_what,
                           rdkafka.missing() or "librdkafka baseline not measured"))
    else:
        out.append(Measurement(name=f"{prefix}drain.vs_librdkafka", benchmark="drain", unit="readings/s",
                               figure=figure, baseline=median(rd_rates), what=what, baseline_what=rd_what, count=count,
                               details={"raw_count": raw_count, "client": rdkafka.version()},
                               rounds=drain_rates, baseline_rounds=rd_rates))
    return out


#: Settings that shape throughput, shown next to the drain's figure (whichever exist in this tree).
TUNING_WORDS = ("batch", "window", "linger", "inflight", "in_flight", "share", "concurren", "lanes")


def tuning(settings: dict[str, Any]) -> str:
    """``key=value`` of the throughput settings in ``settings``."""
    return ", ".join(f"{k}={v}" for k, v in settings.items() if any(w in k for w in TUNING_WORDS) and v is not None)


def per_100k(cpu_s: float, count: int) -> float:
    """CPU seconds per 100,000 readings."""
    return cpu_s * 100_000 / max(count, 1)


def drain_what(count: int, drains: list[dict[str, Any]]) -> str:
    """What the drain figure measures, with the throughput settings the processes reported."""
    knobs = "; ".join(t for t in (tuning(drains[0].get("gateway_settings", {})), tuning(drains[0].get("bridge_settings", {}))) if t)
    return f"{count:,}-reading outbox -> uplink -> cloud mosquitto -> bridge -> Kafka, until the last confirm ({knobs})"


def bench_drain(lab: Lab) -> list[Measurement]:
    """Drain rate vs the naive bridge (target >= 50x, issue 27), vs raw aiokafka (target >= 0.5x) and vs
    librdkafka; resources."""
    count = lab.sizes.drain_readings
    naive, naive_rounds = naive_rate(lab, "drain")
    template_outbox(lab)
    raw_count = min(lab.sizes.raw_readings, count)
    rounds = run_rounds(lab.sizes, lambda i: (raw_kafka_round(lab, raw_count), drain_round(lab, i)))
    drains = [d for _, d in rounds]
    drain_rates = [d["rate"] for d in drains]
    figure = median(drain_rates)
    lab.series["drain_progress"] = [d["progress"] for d in drains]
    details = {"fill": "bulk, on the outbox's own schema (tern.harness.bench.preload; 0 s: cached from an earlier run)",
               "fill_s": round(float(lab.cache.get("drain_fill_s", 0.0)), 2), "devices": DEVICES,
               "rounds_detail": [{k: v for k, v in d.items() if k != "progress"} for d in drains]}
    what = drain_what(count, drains)
    out = [
        Measurement(name="drain.vs_naive", benchmark="drain", unit="readings/s", figure=figure, baseline=naive,
                    what=what, baseline_what=f"naive per-message bridge draining {lab.sizes.naive_readings:,} queued readings",
                    count=count, details=details, rounds=drain_rates, baseline_rounds=naive_rounds, target="ratio >= 50"),
        *raw_measurements("", what, count, raw_count, drain_rates, [raw for raw, _ in rounds], "ratio >= 0.5"),
    ]
    naive_runs = naive_rates(lab)["drain"]
    naive_cpu = median([per_100k(r["cpu_s"], r["count"]) for r in naive_runs])
    naive_rss = median([r["peak_rss_mib"] for r in naive_runs])
    for part in ("gateway", "bridge"):
        cpu = [per_100k(d["resources"][part]["cpu_s"], count) for d in drains]
        rss = [d["resources"][part]["peak_rss_mib"] for d in drains]
        out.append(Measurement(
            name=f"drain.{part}_cpu", benchmark="drain", unit="CPU s/100k", figure=median(cpu), baseline=naive_cpu,
            what=f"{part} process CPU seconds (user+system, /proc) per 100,000 readings drained",
            baseline_what="the naive per-message bridge process, per 100,000 readings drained",
            count=count, rounds=cpu))
        out.append(Measurement(
            name=f"drain.{part}_rss", benchmark="drain", unit="MiB", figure=median(rss), baseline=naive_rss,
            what=f"{part} process peak RSS (VmHWM) over the drain", baseline_what="the naive bridge process's peak RSS",
            count=count, rounds=rss))
    return out

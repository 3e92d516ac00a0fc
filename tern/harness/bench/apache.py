"""Stage ``apache``: the bridge and the drain against a real 3-node Apache Kafka cluster.

Issue 23: every other stage writes to the run's default Kafka (a private Tansu: one in-memory
broker, one copy of each record). Here the same round functions run against Apache Kafka 4.x,
three KRaft nodes on loopback (``tern.harness.kafka_cluster``), topics with replication factor
3 and ``min.insync.replicas`` 2, every producer with ``acks=all``: a record counts only once
two followers have it. The rows are the Tansu rows' twins, prefixed ``apache.``:

- ``apache.bridge.kafka`` and ``apache.bridge.vs_librdkafka``: :func:`bridge.bridge_measurements`,
  same records as ``bridge.kafka``, vs raw aiokafka and vs a plain librdkafka producer;
- ``apache.drain.vs_raw_kafka`` and ``apache.drain.vs_librdkafka``: a backlog of
  ``apache_drain_readings`` drained by gateway and bridge processes, vs the same records
  written by raw aiokafka and by librdkafka (all three the same count).

The cluster is started once (full JIT, ~10-50 s on 2 shared cores, not timed; by the
``scaleout`` stage just before, which needs it too, or here), warmed up with one untimed pass of the drain's records (:func:`warm_up`), and stopped
when the stage ends. Issue 13's and 27's targets are judged on the Tansu rows;
these rows carry none (they say what replication costs, not whether Tern keeps up).

A quick run (``--quick``) starts no cluster: the rows are skipped with that reason, unless the
stage is named (``--only apache``) or the run's Kafka already is Apache Kafka
(``TERN_KAFKA=apache``). ``tests/test_bench.py`` runs this stage on the suite's own cluster.
"""

from __future__ import annotations

import dataclasses

from tern.harness.bench.bridge import bridge_measurements
from tern.harness.bench.common import Measurement, median, run_rounds, skipped
from tern.harness.bench.drain import drain_round, drain_what, raw_kafka_round, raw_measurements
from tern.harness.bench.lab import Lab

PREFIX = "apache."
#: The rows of this stage, in order (also what a skip reports).
ROWS = (("bridge.kafka", "records/s"), ("bridge.vs_librdkafka", "records/s"),
        ("drain.vs_raw_kafka", "readings/s"), ("drain.vs_librdkafka", "readings/s"))
QUICK_SKIP = ("quick run: no 3-node Apache Kafka cluster is started (name the stage, --only apache, "
              "or set TERN_KAFKA=apache to run it; tests/test_bench.py runs it on the suite's cluster)")


def why_not(lab: Lab, stage: str = "apache") -> str | None:
    """Why ``stage`` (this one, or another that needs the cluster) cannot run here, or None."""
    if not (lab.sizes.apache_start or stage in lab.explicit or lab.has_apache()):
        return QUICK_SKIP
    if lab.has_apache():
        return None
    from tern.core.errors import ToolMissing
    from tern.toolchain import java_binary, kafka_libs

    try:
        java_binary()
        kafka_libs()
    except ToolMissing as exc:
        return f"Apache Kafka cannot start here: {exc}"
    return None


def bench_apache(lab: Lab) -> list[Measurement]:
    """The bridge and drain rows against the 3-node Apache Kafka cluster (or every row skipped, with why)."""
    reason = why_not(lab)
    if reason:
        return [skipped(f"{PREFIX}{name}", "apache", unit, "-", "-", reason) for name, unit in ROWS]
    try:
        with lab.on_apache():
            warmup_s = warm_up(lab)
            out = bridge_measurements(lab, PREFIX, {})
            out += drain_measurements(lab)
    finally:
        lab.stop_apache()
    for m in out:
        m.benchmark = "apache"
        m.details.update({"apache_start_s": round(lab.apache_start_s, 1), "warmup_s": round(warmup_s, 1)})
    return out


def warm_up(lab: Lab) -> float:
    """Write ``apache_drain_readings`` records to a scratch topic, untimed; the seconds it took.

    A freshly started JVM interprets, then compiles its hot paths while the first rounds run:
    measured, the first round's baselines on a cold cluster came out at a third of the second's.
    One pass of the drain's volume (librdkafka, else aiokafka) lets the brokers' request,
    replication and log-append paths compile before anything is timed. Tansu needs none (native).
    """
    import asyncio
    import time

    from tern.core import codec
    from tern.harness.bench import rdkafka
    from tern.harness.bench.bridge import produce_seconds
    from tern.harness.bench.drain import DEVICES, RECEIVED_MS
    from tern.harness.bench.nodes import fleet_reading

    started = time.perf_counter()
    (topic,) = lab.kafka_topics("apache-warmup")
    records = [codec.kafka_record(fleet_reading(i, DEVICES), "bench-warmup", topic, RECEIVED_MS)
               for i in range(lab.sizes.apache_drain_readings)]
    if rdkafka.missing():
        asyncio.run(produce_seconds(lab.kafka(), records, topic, lab.sizes.deadline_s))
    else:
        rdkafka.produce_seconds(lab.kafka(), records, topic, lab.sizes.deadline_s)
    return time.perf_counter() - started


def drain_measurements(lab: Lab) -> list[Measurement]:
    """Drain rate vs raw aiokafka and vs librdkafka, every round writing the same records three ways."""
    count = lab.sizes.apache_drain_readings
    sizes = dataclasses.replace(lab.sizes, rounds=lab.sizes.apache_rounds)
    rounds = run_rounds(sizes, lambda i: (raw_kafka_round(lab, count), drain_round(lab, i, count)))
    drains = [d for _, d in rounds]
    drain_rates = [d["rate"] for d in drains]
    out = raw_measurements(PREFIX, drain_what(count, drains), count, count, drain_rates, [raw for raw, _ in rounds], None)
    detail = [{k: v for k, v in d.items() if k not in ("progress", "gateway_settings", "bridge_settings")} for d in drains]
    for m in out:
        m.details.update({"rounds_detail": detail, "kafka": lab.current_kind, "median_rate": median(drain_rates)})
    return out

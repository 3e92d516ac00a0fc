"""Cost as the work grows: ingest and drain rates, and the gateway's RSS, with the outbox
already holding 0, 1M and 10M readings (issue 27).

Each preload size P gets outboxes of P readings and of P + ``growth_drain``, built in bulk on
the outbox's own schema (:mod:`tern.harness.bench.preload`, cached between runs) and copied
for the rounds. Both parts run in processes of their own:

- **drain**: a bridge (to Kafka) and a gateway on the copy; timed from the gateway's start
  until the uplink has had the oldest ``growth_drain`` readings confirmed and deleted
  (``forwarded``), the backlog behind them still waiting: the rate a site catching up moves at.
- **ingest**: on a copy of the outbox of P, a gateway whose cloud side
  has no bridge (the cloud is down: nothing is confirmed, the backlog stays) while paho node
  connections publish ``growth_ingest`` readings at QoS 1; timed from the first publish until
  ingest reports them all committed.

Figures are the rates at the bigger preloads, each against the same rate at 0 in the same run
(target: at 10M, at least 0.8 of it), the best of ``growth_rounds`` alternating rounds; RSS is
the gateway's peak (VmHWM) over all of them.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tern.harness.bench.common import BenchError, Measurement
from tern.harness.bench.drain import bridge_config, gateway_config
from tern.harness.bench.lab import Lab
from tern.harness.bench.live import require_connected
from tern.harness.bench.nodes import NodeFleet, fleet_messages
from tern.harness.bench.preload import copy_outbox, preloaded_outbox
from tern.harness.bench.proc import Child

#: Node connections and devices publishing the ingest round's readings.
INGEST_CONNECTIONS = 10
INGEST_DEVICES = 20
#: The preload at which the target applies, and the share of the empty outbox's rate asked for.
TARGET = "ratio >= 0.8"


def size_label(count: int) -> str:
    """``10m``, ``1m``, ``50k``, ``0``: a preload size in a measurement's name."""
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}m"
    if count >= 1_000 and count % 1_000 == 0:
        return f"{count // 1_000}k"
    return str(count)


def drain_part(lab: Lab, outbox: Path, preload: int) -> dict[str, Any]:
    """Time the oldest ``growth_drain`` readings of ``outbox`` into Kafka; the gateway's resources."""
    count = lab.sizes.growth_drain
    readings, status, deadletter = lab.kafka_topics("growth", "growth-status", "growth-deadletter")
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        bridge = Child("bridge", bridge_config(lab, cloud, "growth", readings, status, deadletter))
        stack.callback(bridge.stop)
        gateway = Child("gateway", gateway_config(lab, local, cloud, outbox, "growth-drain",
                                                  max_rows=2 * (preload + count) + lab.sizes.growth_ingest + 10_000))
        stack.callback(gateway.stop)
        end = gateway.wait_for(lambda s: s.get("forwarded", 0) >= count, lab.sizes.deadline_s,
                               f"growth: drain of {count} readings of {preload + count}")
        seconds = max(end - gateway.ready_t, 1e-6)
        used = gateway.resources()
        # The confirms came after Kafka's acks; the bridge's own counter says so a stats line later.
        bridge.wait_for(lambda s: s.get("records_written", 0) >= count, lab.sizes.deadline_s,
                        f"growth: the bridge's count of the {count} readings the gateway had confirmed")
        written = bridge.get("records_written", 0)
    return {"rate": count / seconds, "seconds": round(seconds, 3), "resources": used, "records_written": written}


def ingest_part(lab: Lab, outbox: Path, preload: int, index: int = 0) -> dict[str, Any]:
    """Time ``growth_ingest`` readings from node connections into ``outbox`` (cloud down); round
    ``index`` publishes the readings after those of the rounds before (never duplicates)."""
    count = lab.sizes.growth_ingest
    messages = fleet_messages(count, INGEST_DEVICES, first=index * count)
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        gateway = Child("gateway", gateway_config(lab, local, cloud, outbox, "growth-ingest",
                                                  max_rows=2 * (preload + count) + 10_000))
        stack.callback(gateway.stop)
        require_connected(gateway)
        held = gateway.get("pending", 0)
        fleet = NodeFleet(local.host, local.port, INGEST_CONNECTIONS)
        stack.callback(fleet.close)
        start = time.time()
        fleet.publish_all(messages)
        end = gateway.wait_for(lambda s: s.get("committed", 0) >= count, lab.sizes.deadline_s,
                               f"growth: ingest of {count} readings into an outbox of {held}")
        seconds = max(end - start, 1e-6)
        used = gateway.resources()
        pending = gateway.get("pending", 0)
    if pending < held + count:
        raise BenchError(f"growth: {held} + {count} readings committed, the outbox holds {pending}")
    return {"rate": count / seconds, "seconds": round(seconds, 3), "resources": used, "held_before": held}


def fresh_copy(lab: Lab, count: int, name: str) -> Path:
    """A copy of the cached outbox of ``count`` readings in a new folder."""
    template, _ = preloaded_outbox(count)
    return copy_outbox(template, lab.folder(name))


def remove(outbox: Path) -> None:
    """Delete an outbox copy and its WAL (up to gigabytes: not kept until the end of the run)."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(outbox) + suffix).unlink(missing_ok=True)


def bench_growth(lab: Lab) -> list[Measurement]:
    """Ingest and drain rates and gateway RSS at each preload against the same at 0.

    Rounds alternate the preloads (0, 1M, 10M, 0, 1M, ...) so that a slow spell of the machine
    hits them alike, and each figure is the best of its rounds (noise only ever slows a rate):
    every drain round times the oldest ``growth_drain`` readings of a fresh copy of the outbox
    of preload + ``growth_drain``, then every ingest round adds ``growth_ingest`` to a copy of
    the outbox of the preload (the same copy each round: a few thousand more in millions).
    """
    sizes = lab.sizes
    preloads, rounds = sizes.growth_preloads, sizes.growth_rounds
    prepared: dict[int, dict[str, Any]] = {}
    drains: dict[int, list[dict[str, Any]]] = {p: [] for p in preloads}
    ingests: dict[int, list[dict[str, Any]]] = {p: [] for p in preloads}
    for preload in preloads:  # built (or found) before anything is timed
        _, drain_built = preloaded_outbox(preload + sizes.growth_drain)
        _, ingest_built = preloaded_outbox(preload)
        prepared[preload] = {"built_s": round(drain_built + ingest_built, 1)}
    for _ in range(rounds):
        for preload in preloads:
            # A fresh copy each: a drain goes on past its count until its gateway stops.
            started = time.perf_counter()
            outbox = fresh_copy(lab, preload + sizes.growth_drain, f"growth-drain-{size_label(preload)}")
            prepared[preload]["copy_s"] = round(time.perf_counter() - started, 1)
            prepared[preload]["outbox_mib"] = round(outbox.stat().st_size / 2**20, 1)
            try:
                drains[preload].append(drain_part(lab, outbox, preload))
            finally:
                remove(outbox)
    outboxes = {p: fresh_copy(lab, p, f"growth-ingest-{size_label(p)}") for p in preloads}
    try:
        for index in range(rounds):
            for preload in preloads:
                ingests[preload].append(ingest_part(lab, outboxes[preload], preload + index * sizes.growth_ingest, index))
    finally:
        for path in outboxes.values():
            remove(path)
    best = {p: {"drain": max(r["rate"] for r in drains[p]), "ingest": max(r["rate"] for r in ingests[p]),
                "rss": max(r["resources"]["peak_rss_mib"] for r in drains[p] + ingests[p]),
                "ingest_cpu_100k": min(r["resources"]["cpu_s"] for r in ingests[p]) * 100_000 / sizes.growth_ingest}
            for p in preloads}
    base, biggest = preloads[0], preloads[-1]
    details = {"preloads": [{"preload": p, **prepared[p], **best[p], "drain_rounds": drains[p], "ingest_rounds": ingests[p]}
                            for p in preloads],
               "ingest_connections": INGEST_CONNECTIONS, "ingest_devices": INGEST_DEVICES, "rounds": rounds}
    out: list[Measurement] = []
    for preload in preloads[1:]:
        label = size_label(preload)
        target = TARGET if preload == biggest else None
        out.append(Measurement(
            name=f"growth.drain_{label}", benchmark="growth", unit="readings/s", figure=best[preload]["drain"],
            baseline=best[base]["drain"],
            what=f"oldest {sizes.growth_drain:,} readings of an outbox holding {preload:,} more -> uplink -> bridge -> Kafka, "
                 f"until confirmed and deleted (best of {rounds})",
            baseline_what=f"the same with the outbox holding only those {sizes.growth_drain:,}",
            count=sizes.growth_drain, details=details, rounds=[r["rate"] for r in drains[preload]],
            baseline_rounds=[r["rate"] for r in drains[base]], target=target))
        out.append(Measurement(
            name=f"growth.ingest_{label}", benchmark="growth", unit="readings/s", figure=best[preload]["ingest"],
            baseline=best[base]["ingest"],
            what=f"{sizes.growth_ingest:,} readings from {INGEST_CONNECTIONS} paho node connections -> mosquitto -> gateway, "
                 f"until committed, the outbox already holding {preload:,} (cloud down: nothing drains; best of {rounds})",
            baseline_what="the same into an empty outbox", count=sizes.growth_ingest,
            rounds=[r["rate"] for r in ingests[preload]], baseline_rounds=[r["rate"] for r in ingests[base]], target=target))
        out.append(Measurement(
            name=f"growth.gateway_rss_{label}", benchmark="growth", unit="MiB", figure=best[preload]["rss"],
            baseline=best[base]["rss"],
            what=f"gateway peak RSS (VmHWM), the highest of those drain and ingest rounds, outbox of {preload:,} readings "
                 f"({prepared[preload]['outbox_mib']:,.0f} MiB on disk)",
            baseline_what="the same with the outbox empty", count=preload))
    return out

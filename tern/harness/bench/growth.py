"""Cost as the work grows: ingest and drain rates, and the gateway's RSS, with the outbox
already holding 0, 1M and 10M readings (issue 27).

Each preload size gets an outbox of that many readings **plus** the ``growth_drain`` the drain
round times, built in bulk on the outbox's own schema (:mod:`tern.harness.bench.preload`,
cached between runs) and copied for the round. Both parts run in processes of their own:

- **drain**: a bridge (to Kafka) and a gateway on the copy; timed from the gateway's start
  until the uplink has had the oldest ``growth_drain`` readings confirmed and deleted
  (``forwarded``), the backlog behind them still waiting: the rate a site catching up moves at.
- **ingest**: then, on the same file (holding the preload again), a gateway whose cloud side
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
        written = bridge.get("records_written", 0)
    if written < count:
        raise BenchError(f"growth: the bridge wrote {written} readings, the gateway had {count} confirmed")
    return {"rate": count / seconds, "seconds": round(seconds, 3), "resources": used, "records_written": written}


def ingest_part(lab: Lab, outbox: Path, preload: int) -> dict[str, Any]:
    """Time ``growth_ingest`` readings from node connections into ``outbox`` (cloud down)."""
    count = lab.sizes.growth_ingest
    messages = fleet_messages(count, INGEST_DEVICES)
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


def bench_growth(lab: Lab) -> list[Measurement]:
    """Ingest and drain rates and gateway RSS at each preload against the same at 0.

    Rounds alternate the preloads (0, 1M, 10M, 0, 1M, ...) so that a slow spell of the machine
    hits them alike, and each figure is the best of its rounds (noise only ever slows a rate):
    every drain round takes the next ``growth_drain`` readings of its outbox, then every
    ingest round adds ``growth_ingest`` on top of what is left (the preload).
    """
    sizes = lab.sizes
    preloads, rounds = sizes.growth_preloads, sizes.growth_rounds
    outboxes: dict[int, Path] = {}
    prepared: dict[int, dict[str, Any]] = {}
    for preload in preloads:
        template, built_s = preloaded_outbox(preload + rounds * sizes.growth_drain)
        started = time.perf_counter()
        outboxes[preload] = copy_outbox(template, lab.folder(f"growth-{size_label(preload)}"))
        prepared[preload] = {"built_s": round(built_s, 1), "copy_s": round(time.perf_counter() - started, 1),
                             "outbox_mib": round(outboxes[preload].stat().st_size / 2**20, 1)}
    drains: dict[int, list[dict[str, Any]]] = {p: [] for p in preloads}
    ingests: dict[int, list[dict[str, Any]]] = {p: [] for p in preloads}
    try:
        for index in range(rounds):
            for preload in preloads:
                drains[preload].append(drain_part(lab, outboxes[preload], preload + (rounds - 1 - index) * sizes.growth_drain))
        for _ in range(rounds):
            for preload in preloads:
                ingests[preload].append(ingest_part(lab, outboxes[preload], preload))
    finally:
        for path in outboxes.values():  # up to gigabytes each: not kept until the end of the run
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
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

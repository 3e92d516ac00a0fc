"""A light fleet on one gateway: 1,000 node connections, what each reading costs it (issue 27).

Each connection is one device: an MQTT client (aiomqtt, all in one asyncio loop of the bench
process: no thread and no MicroPython process per node) publishing its readings as the
firmware does (per-reading JSON, QoS 1, each publish awaiting its PUBACK) at a low steady rate,
the connections' ticks spread evenly over the second. The gateway runs in a process of its own
between the local mosquitto and a cloud mosquitto where the bridge's stand-in confirms every
batch (so rows are committed, sent and deleted, as in production, without Kafka's CPU on the
cores). Timed until ingest has committed every reading published (anything less fails the
stage); the gateway's CPU seconds over that window per 100,000 readings, and its peak RSS.

Baseline, same run: the same devices, readings and rate on ``BASE_CONNECTIONS`` connections
(each carrying many devices), so the ratio is what the number of connections costs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack
from typing import Any

from tern.core import codec, topics
from tern.harness.bench.common import BenchError, ConfirmingStandIn, Measurement
from tern.harness.bench.drain import gateway_config
from tern.harness.bench.lab import Lab
from tern.harness.bench.live import require_connected
from tern.harness.bench.nodes import fleet_reading
from tern.harness.bench.proc import Child

#: Connections of the baseline round (the same devices, several per connection).
BASE_CONNECTIONS = 10


async def _publish(host: str, port: int, connections: int, devices: int, rate: float, seconds: float,
                   deadline_s: float) -> int:
    """``devices`` devices on ``connections`` aiomqtt clients, each device publishing ``rate``
    readings/s for ``seconds``; returns how many the broker acknowledged."""
    import aiomqtt

    ticks = max(1, int(rate * seconds))
    acked = 0

    async def device_loop(client: "aiomqtt.Client", device: int, start: float) -> None:
        nonlocal acked
        # Spread over the first second, so the load is steady rather than 1,000 at once.
        offset = device / devices / rate
        for tick in range(ticks):
            delay = start + offset + tick / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            r = fleet_reading(tick * devices + device, devices)
            await client.publish(topics.telemetry_topic(r.site, r.device), codec.encode_reading(r), qos=1)
            acked += 1

    async def connection(index: int, ready: asyncio.Event, go: asyncio.Event, counted: list[int]) -> None:
        async with aiomqtt.Client(host, port, identifier=f"bench-fleet-{index}-{uuid.uuid4().hex[:6]}",
                                  clean_session=True, keepalive=60, timeout=deadline_s) as client:
            counted.append(index)
            if len(counted) == connections:
                ready.set()
            await go.wait()
            start = go_time[0]
            await asyncio.gather(*(device_loop(client, d, start) for d in range(index, devices, connections)))

    ready, go = asyncio.Event(), asyncio.Event()
    counted: list[int] = []
    go_time = [0.0]
    tasks = [asyncio.create_task(connection(i, ready, go, counted)) for i in range(connections)]
    try:
        await asyncio.wait_for(ready.wait(), deadline_s)
        go_time[0] = time.monotonic()
        go.set()
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + deadline_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return acked


def fleet_round(lab: Lab, connections: int) -> dict[str, Any]:
    """One round: ``fleet_connections`` devices on ``connections`` connections into one gateway."""
    sizes = lab.sizes
    devices = sizes.fleet_connections
    count = devices * max(1, int(sizes.fleet_rate * sizes.fleet_seconds))
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        gateway = Child("gateway", gateway_config(lab, local, cloud, lab.folder("fleet-gw") / "outbox.db", "fleet"))
        stack.callback(gateway.stop)
        require_connected(gateway)
        standin = ConfirmingStandIn(cloud.host, cloud.port, gateway.ready_info["settings"]["gateway_id"])
        stack.callback(standin.close)
        before = gateway.resources()["cpu_s"]
        start = time.time()
        acked = asyncio.run(_publish(local.host, local.port, connections, devices, sizes.fleet_rate,
                                     sizes.fleet_seconds, sizes.deadline_s))
        end = gateway.wait_for(lambda s: s.get("committed", 0) >= count, sizes.deadline_s,
                               f"fleet: {count} readings from {connections} connections committed")
        used = gateway.resources()
        committed = gateway.get("committed", 0)
    if acked != count or committed != count:
        raise BenchError(f"fleet: {count} readings published, {acked} acknowledged by the broker, {committed} committed")
    return {"connections": connections, "devices": devices, "count": count, "committed": committed,
            "seconds": round(end - start, 3), "cpu_s": used["cpu_s"] - before, "peak_rss_mib": used["peak_rss_mib"]}


def bench_fleet(lab: Lab) -> list[Measurement]:
    """Gateway CPU per reading and peak RSS with one connection per device vs a few connections."""
    sizes = lab.sizes
    base = fleet_round(lab, BASE_CONNECTIONS)
    many = fleet_round(lab, sizes.fleet_connections)
    per_100k = lambda r: r["cpu_s"] * 100_000 / r["count"]  # noqa: E731
    load = (f"{sizes.fleet_connections:,} devices publishing {sizes.fleet_rate:g} reading/s each for "
            f"{sizes.fleet_seconds:g} s (QoS 1, per-reading JSON)")
    details = {"rounds": [base, many]}
    return [
        Measurement(name="fleet.gateway_cpu", benchmark="fleet", unit="CPU s/100k", figure=per_100k(many),
                    baseline=per_100k(base),
                    what=f"gateway CPU seconds per 100,000 readings committed: {load}, one connection each",
                    baseline_what=f"the same devices and readings on {BASE_CONNECTIONS} connections",
                    count=many["count"], details=details),
        Measurement(name="fleet.gateway_rss", benchmark="fleet", unit="MiB", figure=many["peak_rss_mib"],
                    baseline=base["peak_rss_mib"],
                    what=f"gateway peak RSS (VmHWM): {load}, one connection each",
                    baseline_what=f"the same on {BASE_CONNECTIONS} connections", count=many["count"], details=details),
    ]

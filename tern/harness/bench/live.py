"""Live end to end from many node connections, and the bytes each reading costs on the uplink.

Throughput rounds: the node fleet (one ``mosquitto_pub`` process per device, each on a
connection of its own: :mod:`tern.harness.bench.pubfleet`) publishes per-reading JSON at QoS 1
into the gateway's local mosquitto, as fast as the brokers take it; the gateway and the bridge
run in processes of their own. Timed from the publishers' start until the bridge has Kafka's
ack for the last reading, then every reading is read back. (Until December 2026 the fleet was
50 paho clients in the bench's own process, which could not send more than ~5,000/s on two
cores: the rounds measured the fleet.)

Baselines, same run: the same fleet into a mosquitto with one plain paho QoS 1 subscriber (a
process of its own), timed until it has them all; and the naive per-message bridge, live.

Bytes: one more round with two counting relays, one between the fleet and the local broker
(per-message JSON over MQTT, what a node's link carries per reading, both ways) and one
between the gateway and the cloud broker (the uplink, both ways: batches, confirms, PUBACKs,
pings). Kept out of the throughput rounds, where a relay in Python would be the bottleneck.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from tern.harness.bench.common import BenchError, Measurement, median, run_rounds
from tern.harness.bench.drain import bridge_config, gateway_config
from tern.harness.bench.kafka_check import check_topic
from tern.harness.bench.lab import Lab
from tern.harness.bench.naive import naive_rate
from tern.harness.bench.nodes import NodeFleet, fleet_messages
from tern.harness.bench.proc import Child
from tern.harness.bench.pubfleet import PubFleet
from tern.harness.bench.relay import CountingRelay


def devices(lab: Lab) -> int:
    """Two devices per node connection."""
    return lab.sizes.connections * 2


def start_pipeline(lab: Lab, stack: ExitStack, name: str, cloud_address: str | None = None) -> tuple[Any, Any, Child, Child, str]:
    """Brokers, topics, a bridge and a gateway process: (local, cloud, gateway, bridge, readings topic).

    ``cloud_address`` (a relay in front of the cloud broker) is where the gateway connects, if given.
    """
    readings, status, deadletter = lab.kafka_topics(name, f"{name}-status", f"{name}-deadletter")
    local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
    bridge = Child("bridge", bridge_config(lab, cloud, name, readings, status, deadletter))
    stack.callback(bridge.stop)
    config = gateway_config(lab, local, cloud, lab.folder(f"{name}-gw") / "outbox.db", name)
    if cloud_address is not None:
        config["cloud_broker"] = cloud_address
    gateway = Child("gateway", config)
    stack.callback(gateway.stop)
    require_connected(gateway)
    return local, cloud, gateway, bridge, readings


def require_connected(gateway: Child) -> None:
    """Raise BenchError unless the gateway process reached both brokers."""
    if not gateway.ready_info.get("connected"):
        raise BenchError(f"gateway did not connect to its brokers within 30 s: {gateway.stderr_tail()}")


def all_in_kafka(count: int, gateway: Child, bridge: Child, deadline_s: float, what: str) -> float:
    """Wall time at which the bridge had Kafka's ack for ``count`` readings.

    From the bridge's ``records_written`` counter; a bridge without it is judged from the
    gateway's side (every reading committed and confirmed), one confirm later.
    """
    if "records_written" in bridge.snapshot()[1]:
        return bridge.wait_for(lambda s: s.get("records_written", 0) >= count, deadline_s, what)
    return gateway.wait_for(lambda s: s.get("committed", 0) >= count and s.get("pending", 1) == 0, deadline_s, what)


def live_round(lab: Lab, messages: list) -> dict[str, Any]:
    """One Tern round: readings/s from the fleet's first publish until Kafka acked the last."""
    count = len(messages)
    with ExitStack() as stack:
        local, _, gateway, bridge, topic = start_pipeline(lab, stack, "live")
        fleet = PubFleet(local.host, local.port, lab.folder("live-fleet"))
        stack.callback(fleet.close)
        start = fleet.start(messages)
        end = all_in_kafka(count, gateway, bridge, lab.sizes.deadline_s, f"live end to end ({count} readings into Kafka)")
        used = {"gateway": gateway.resources(), "bridge": bridge.resources()}
        uplink = gateway.stats
    check = check_topic(lab.kafka(), topic, count, lab.sizes.deadline_s)
    check.require(count, "live end to end")
    return {"rate": count / max(end - start, 1e-6), "seconds": round(end - start, 3), "resources": used,
            "batches_confirmed": uplink.get("batches_confirmed"), **check.as_json()}


def pubsub_round(lab: Lab, messages: list) -> dict[str, Any]:
    """One baseline round: the same fleet into mosquitto, one plain subscriber process."""
    count = len(messages)
    with ExitStack() as stack:
        broker = lab.mosquitto(stack, "pubsub")
        subscriber = Child("subscriber", {"mqtt_host": broker.host, "mqtt_port": broker.port,
                                          "client_id": f"bench-sub-{time.time_ns() % 10**8}"})
        stack.callback(subscriber.stop)
        fleet = PubFleet(broker.host, broker.port, lab.folder("pubsub-fleet"))
        stack.callback(fleet.close)
        start = fleet.start(messages)
        end = subscriber.wait_for(lambda s: s.get("received", 0) >= count, lab.sizes.deadline_s,
                                  f"plain pub/sub ({count} readings)")
        used = subscriber.resources()
    return {"rate": count / max(end - start, 1e-6), "seconds": round(end - start, 3), "resources": used}


def fleet_round(lab: Lab, messages: list) -> dict[str, Any]:
    """The fleet's own capacity: the same files into a mosquitto with no subscriber, timed until
    every publisher has its last PUBACK (a receiver's rate near this measured the load)."""
    count = len(messages)
    with ExitStack() as stack:
        broker = lab.mosquitto(stack, "fleet-only")
        fleet = PubFleet(broker.host, broker.port, lab.folder("fleet-only"))
        stack.callback(fleet.close)
        start = fleet.start(messages)
        fleet.wait_published(lab.sizes.deadline_s)
        seconds = max(time.time() - start, 1e-6)
    return {"rate": count / seconds, "seconds": round(seconds, 3)}


def bytes_round(lab: Lab, messages: list) -> dict[str, Any]:
    """Bytes per reading on the node links and on the uplink, through counting relays."""
    count = len(messages)
    with ExitStack() as stack:
        readings, status, deadletter = lab.kafka_topics("bytes", "bytes-status", "bytes-deadletter")
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        relay_up = CountingRelay(cloud.host, cloud.port)
        stack.callback(relay_up.close)
        relay_nodes = CountingRelay(local.host, local.port)
        stack.callback(relay_nodes.close)
        bridge = Child("bridge", bridge_config(lab, cloud, "bytes", readings, status, deadletter))
        stack.callback(bridge.stop)
        config = gateway_config(lab, local, cloud, lab.folder("bytes-gw") / "outbox.db", "bytes")
        config["cloud_broker"] = relay_up.address
        gateway = Child("gateway", config)
        stack.callback(gateway.stop)
        require_connected(gateway)
        fleet = NodeFleet(relay_nodes.host, relay_nodes.port, lab.sizes.connections)
        stack.callback(fleet.close)
        # Only the traffic of the readings counts, not the connection set-ups.
        up0, nodes0 = relay_up.total_bytes, relay_nodes.total_bytes
        fleet.publish_all(messages)
        fleet.wait_published(lab.sizes.deadline_s)
        gateway.wait_for(lambda s: s.get("committed", 0) >= count and s.get("pending", 1) == 0, lab.sizes.deadline_s,
                         "uplink forwarding (bytes round)")
        time.sleep(0.2)  # the last confirm's PUBACK crosses the relay just after the delete
        uplink = relay_up.total_bytes - up0
        node = relay_nodes.total_bytes - nodes0
        batches = gateway.stats.get("batches_confirmed", 0)
    return {"uplink_bytes": uplink, "node_bytes": node, "uplink_per_reading": uplink / count,
            "node_per_reading": node / count, "batches": batches, "readings_per_batch": count / max(batches, 1)}


def live_capacity(lab: Lab) -> float:
    """The median live end-to-end rate of this run (measured here if the live stage did not run)."""
    if "live_capacity" not in lab.cache:
        messages = fleet_messages(lab.sizes.live_readings, devices(lab))
        lab.cache["live_capacity"] = live_round(lab, messages)["rate"]
    return float(lab.cache["live_capacity"])  # type: ignore[arg-type]


def bench_live(lab: Lab) -> list[Measurement]:
    """Live end to end vs plain pub/sub (target >= 0.9) and vs the naive bridge (>= 10, issue 27);
    uplink bytes (<= 25 %)."""
    count = lab.sizes.live_readings
    messages = fleet_messages(count, devices(lab))
    naive, naive_rounds = naive_rate(lab, "live")
    rounds = run_rounds(lab.sizes, lambda i: (pubsub_round(lab, messages), live_round(lab, messages)))
    tern = [r["rate"] for _, r in rounds]
    base = [b["rate"] for b, _ in rounds]
    figure = median(tern)
    lab.cache["live_capacity"] = figure
    what = f"{devices(lab)} node connections (mosquitto_pub) -> mosquitto -> gateway -> mosquitto -> bridge -> Kafka (processes)"
    details = {"connections": devices(lab), "devices": devices(lab), "fleet": "mosquitto_pub, one per device",
               "rounds_detail": [r for _, r in rounds], "baseline_detail": [b for b, _ in rounds]}
    byte_count = min(count, 10_000)
    sizes = bytes_round(lab, fleet_messages(byte_count, devices(lab)))
    cpu = [per_100k(r["resources"][p]["cpu_s"], count) for _, r in rounds for p in ("gateway",)]
    bridge_cpu = [per_100k(r["resources"]["bridge"]["cpu_s"], count) for _, r in rounds]
    sub_cpu = [per_100k(b["resources"]["cpu_s"], count) for b, _ in rounds]
    return [
        Measurement(name="live.vs_pubsub", benchmark="live", unit="readings/s", figure=figure, baseline=median(base),
                    what=what, baseline_what=f"the same {devices(lab)} connections -> mosquitto -> one plain paho QoS 1 subscriber process",
                    count=count, details=details, rounds=tern, baseline_rounds=base, target="ratio >= 0.9"),
        Measurement(name="live.vs_naive", benchmark="live", unit="readings/s", figure=figure, baseline=naive,
                    what=what, baseline_what="the naive per-message bridge, live (send_and_wait per reading, then PUBACK)",
                    count=count, rounds=tern, baseline_rounds=naive_rounds, target="ratio >= 10"),
        Measurement(name="live.uplink_bytes", benchmark="live", unit="bytes/reading",
                    figure=sizes["uplink_per_reading"], baseline=sizes["node_per_reading"],
                    what="bytes both ways between gateway and cloud broker, per reading (counting relay)",
                    baseline_what="bytes both ways of per-message JSON over MQTT (node connections <-> broker), per reading",
                    count=byte_count, details=sizes, target="ratio <= 0.25"),
        Measurement(name="live.gateway_cpu", benchmark="live", unit="CPU s/100k", figure=median(cpu), baseline=median(sub_cpu),
                    what="gateway process CPU seconds per 100,000 live readings (ingest + outbox + uplink)",
                    baseline_what="the plain subscriber process, per 100,000 readings", count=count, rounds=cpu),
        Measurement(name="live.bridge_cpu", benchmark="live", unit="CPU s/100k", figure=median(bridge_cpu),
                    baseline=median(sub_cpu), what="bridge process CPU seconds per 100,000 live readings",
                    baseline_what="the plain subscriber process, per 100,000 readings", count=count, rounds=bridge_cpu),
    ]


def per_100k(cpu_s: float, count: int) -> float:
    """CPU seconds per 100,000 readings."""
    return cpu_s * 100_000 / max(count, 1)

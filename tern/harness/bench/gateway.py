"""Stage 3, gateway ingest: paho node -> mosquitto -> Gateway (committed) vs pub/sub."""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from typing import TYPE_CHECKING, Sequence

from tern.harness.bench.common import (
    BenchError,
    ConfirmingStandIn,
    Measurement,
    MqttPeer,
    median,
    rate,
    telemetry_messages,
    wait_until,
)
from tern.harness.bench.lab import Lab

if TYPE_CHECKING:

    from tern.edge.service import Gateway

    from tern.harness.stack import Mosquitto


def start_gateway(lab: Lab, stack: ExitStack, local: "Mosquitto", cloud: "Mosquitto", name: str) -> "Gateway":
    """A Gateway between two private mosquittos, connected; stopped when ``stack`` closes."""
    from tern.edge.config import GatewayConfig
    from tern.edge.service import Gateway

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
    """QoS 1 readings/s from a paho node until committed in the Gateway's outbox (target: the
    plain subscriber's rate, issue 27)."""
    count = lab.sizes.readings
    baseline = lab.pubsub_baseline(count)
    messages = telemetry_messages(count)
    rounds = [gateway_ingest_round(lab, messages) for _ in range(lab.sizes.network_repeats)]
    rates = [rate(count, seconds) for seconds, _ in rounds]
    seconds, stats = min(rounds, key=lambda r: r[0])
    return [Measurement(
        name="gateway.ingest", benchmark="gateway", unit="readings/s",
        figure=median(rates), baseline=baseline, rounds=rates,
        what="paho node -> mosquitto -> Gateway, until committed (uplink confirmed by a paho stand-in)",
        baseline_what="paho node -> mosquitto -> plain paho QoS 1 subscriber",
        count=count, details={"seconds": round(seconds, 3), "rounds": lab.sizes.network_repeats, **stats},
        # Issue 27: committed with fsync and acked, as fast as a subscriber that does neither.
        target="ratio >= 1.0",
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
        # The one counter, not stats(): a copy of every counter each 2 ms cost the GIL-bound
        # process ~8 % of a round's time, a cost the baseline's event wait does not have.
        wait_until(lambda: gateway.ingest.committed >= count, lab.sizes.deadline_s,
                   f"gateway ingest ({count} readings)")
        seconds = time.perf_counter() - start
        stats = gateway.ingest.stats()
        # Not timed: the round only counts if the stand-in confirmed every reading out again.
        wait_until(lambda: gateway.outbox.pending() == 0, lab.sizes.deadline_s, "gateway uplink draining the outbox")
    return seconds, {k: stats[k] for k in ("committed", "duplicates", "dead_lettered", "node_acks")}

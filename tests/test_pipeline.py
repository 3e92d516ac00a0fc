"""Throughput and scale-out on real parts: a pipelined gateway uplink (W batches in flight),
concurrent bridges on a real mosquitto, Kafka (Tansu or $KAFKA_BOOTSTRAP).

Readings enter through the gateway's own outbox API (what ingest does after a node's
message), so every test drives many readings through the real uplink and bridge quickly.
Every test reads Kafka back and checks each device's readings: none missing, in order.

The outage tests last 60 s each, as issue 13 asks; everything else waits on outcomes under
deadlines.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import uuid

import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import read_all
from tern.edge.service import Gateway
from tern.edge.uplink import lane_of
from tern.harness.stack import Mosquitto, ensure_topics

import helpers
from helpers import BridgeProcess, bridge_config
from helpers.pipeline import (
    assert_complete_in_order, by_device, feed, outbox_empty, pipeline_gateway_config as gateway_config,
)

OUTAGE_S = 60.0
DEADLINE = 90.0

#: Waits here get this module's deadline unless they say otherwise.
wait_until = functools.partial(helpers.wait_until, timeout=DEADLINE)


@pytest.fixture
def cloud_and_pi(mosquitto_factory) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("pi"), mosquitto_factory("cloud")


# --- W > 1 ----------------------------------------------------------------------------


def test_per_device_order_with_many_batches_in_flight(tmp_path, cloud_and_pi, kafka_bootstrap, kafka_topics):
    pi, cloud = cloud_and_pi
    devices = [f"dev-{i:02d}" for i in range(12)]
    window = 4
    assert len({lane_of(d, window) for d in devices}) == window  # every lane has devices
    per_device = 300
    gateway = Gateway(gateway_config(tmp_path, pi, cloud, uplink_window=window, batch_size=40, confirm_timeout_s=30))
    bridge = BridgeThread(bridge_config(cloud, kafka_bootstrap, kafka_topics))
    most_in_flight = 0

    def sample(_: int = 0) -> None:
        nonlocal most_in_flight
        most_in_flight = max(most_in_flight, gateway.stats()["inflight_batches"])

    with gateway, bridge:
        assert gateway.wait_connected(30)
        feed(gateway, devices, per_device, chunk=50, during=sample)
        deadline = time.monotonic() + DEADLINE
        while not outbox_empty(gateway) and time.monotonic() < deadline:
            sample()
            time.sleep(0.002)
        assert outbox_empty(gateway), gateway.stats()
        # The uplink counts a delete as forwarded once its thread takes the deleter's word,
        # a moment after the rows are gone from the outbox.
        wait_until(lambda: gateway.stats()["forwarded"] >= len(devices) * per_device, timeout=10)
        stats = gateway.stats()
    assert most_in_flight >= 2, f"never more than {most_in_flight} batch in flight"
    assert stats["forwarded"] == len(devices) * per_device and stats["batches_resent"] == 0, stats

    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=30, expect=len(devices) * per_device)
    # Nothing went wrong, so nothing was written twice: exactly each device's seqs, in order.
    assert by_device(records) == {d: list(range(per_device)) for d in devices}
    # Each batch was confirmed once.
    assert bridge.stats()["batches_confirmed"] == stats["batches_confirmed"]


# --- three bridges on a shared subscription, one killed -----------------------------------


@pytest.mark.apache_kafka
@pytest.mark.xdist_group("apache_kafka")
def test_three_bridges_on_a_shared_subscription_one_killed(tmp_path, cloud_and_pi, concurrent_writers_kafka):
    # Three bridges write the same partitions at once: on a real Kafka (see the fixture).
    kafka_bootstrap, kafka_topics = concurrent_writers_kafka
    pi, cloud = cloud_and_pi
    group = f"g{uuid.uuid4().hex[:6]}"
    bridges = [
        BridgeProcess(tmp_path / f"b{i}", bridge_config(cloud, kafka_bootstrap, kafka_topics, name=f"{group}-{i}", share_group=group))
        for i in range(3)
    ]
    devices = [f"dev-{i:02d}" for i in range(8)]
    per_device = 400
    # A short confirm timeout: what the killed bridge held comes back quickly.
    gateway = Gateway(gateway_config(tmp_path, pi, cloud, uplink_window=4, batch_size=20, confirm_timeout_s=3))
    try:
        for bridge in bridges:
            bridge.wait_running()
        with gateway:
            assert gateway.wait_connected(30)
            killed = False

            def kill_mid_stream(first: int) -> None:
                nonlocal killed
                if not killed and first >= per_device // 2:
                    bridges[0].kill()
                    killed = True

            feed(gateway, devices, per_device, chunk=20, pause=0.05, during=kill_mid_stream)
            assert killed
            wait_until(lambda: outbox_empty(gateway), what="outbox drained by the two bridges left")
            stats = gateway.stats()
        assert stats["forwarded"] == len(devices) * per_device
    finally:
        for bridge in bridges:
            bridge.stop()
    # Every bridge took part: the two left say what they confirmed when stopped, and the
    # killed one confirmed the rest before it died.
    confirmed = []
    for bridge in bridges[1:]:
        log = bridge.log()
        assert "Traceback" not in log, log[-3000:]
        found = re.search(r"stopped: .*'batches_confirmed': (\d+)", log)
        copies = re.search(r"stopped: .*'duplicates_received': (\d+)", log)
        assert found and copies, log[-3000:]
        # A copy of a batch it had written is confirmed again: count each batch once.
        confirmed.append(int(found.group(1)) - int(copies.group(1)))
    assert all(n > 0 for n in confirmed), confirmed
    assert sum(confirmed) < stats["batches_confirmed"], (confirmed, stats)

    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=30, expect=len(devices) * per_device)
    assert_complete_in_order(records, devices, per_device)


# --- a 60 s bridge outage: no duplicates -------------------------------------------------


@pytest.mark.slow
def test_bridge_outage_with_batches_in_flight_adds_no_duplicates(tmp_path, cloud_and_pi, kafka_bootstrap, kafka_topics):
    pi, cloud = cloud_and_pi
    window = 4
    devices = [f"dev-{i:02d}" for i in range(12)]
    per_device = 100
    # A confirm timeout well inside the outage: the gateway re-sends its batches (several
    # times, backing off), and every copy waits in the broker for the bridge's session.
    gateway = Gateway(gateway_config(tmp_path, pi, cloud, uplink_window=window, batch_size=50, confirm_timeout_s=5))
    config = bridge_config(cloud, kafka_bootstrap, kafka_topics)
    with gateway:
        assert gateway.wait_connected(30)
        with BridgeThread(config):  # the bridge's session exists on the broker from here on
            feed(gateway, devices, 10)
            wait_until(lambda: outbox_empty(gateway), what="warm-up readings forwarded")
        t0 = time.monotonic()
        feed(gateway, devices, per_device - 10, start=10)
        wait_until(lambda: gateway.stats()["inflight_batches"] == window, what=f"{window} batches in flight")
        wait_until(lambda: gateway.stats()["batches_resent"] >= window, what="the gateway re-sending")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))  # the outage itself: 60 s
        assert gateway.outbox.pending() > 0
        resent = gateway.stats()["batches_resent"]
        with BridgeThread(config) as bridge:
            wait_until(lambda: outbox_empty(gateway), what="outbox drained after the outage")
            # The copies are recognised, confirmed again and not written.
            wait_until(lambda: bridge.stats()["duplicates_received"] >= 1, timeout=15, what="copies recognised")
            bstats = bridge.stats()
    assert resent >= window
    expected = len(devices) * per_device
    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=30, expect=expected)
    time.sleep(1)  # anything extra would be there by now; read again to be sure
    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10, expect=expected + 1)
    assert len(records) == expected, f"{len(records) - expected} duplicate records; bridge {bstats}"
    assert by_device(records) == {d: list(range(per_device)) for d in devices}


# --- a 60 s Kafka blackhole under pipelined load ------------------------------------------


@pytest.mark.slow
def test_kafka_blackhole_under_pipelined_load_loses_nothing(tmp_path, cloud_and_pi, proxied_kafka):
    pi, cloud = cloud_and_pi
    proxy, bootstrap = proxied_kafka
    names = {"readings": "bh.readings", "status": "bh.status", "deadletter": "bh.deadletter"}
    asyncio.run(ensure_topics(bootstrap, list(names.values())))
    devices = [f"dev-{i:02d}" for i in range(10)]
    per_device = 300
    gateway = Gateway(gateway_config(tmp_path, pi, cloud, uplink_window=4, batch_size=40, confirm_timeout_s=20))
    bridge = BridgeThread(bridge_config(cloud, bootstrap, names, request_timeout_ms=3000, retry_initial_s=0.5, retry_max_s=2.0))
    with gateway, bridge:
        assert gateway.wait_connected(30)
        feed(gateway, devices, 100, chunk=20, pause=0.02)
        proxy.set_mode("blackhole")
        t0 = time.monotonic()
        feed(gateway, devices, 100, chunk=20, start=100, pause=0.1)
        wait_until(lambda: bridge.stats()["kafka_failures"] >= 1, what="the bridge noticing the blackhole")
        stuck = gateway.outbox.pending()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
        assert gateway.outbox.pending() >= stuck > 0  # nothing confirmed while Kafka was away
        proxy.set_mode("pass")
        feed(gateway, devices, 100, chunk=20, start=200, pause=0.02)
        wait_until(lambda: outbox_empty(gateway), timeout=120, what="outbox drained after the blackhole")
        stats = bridge.stats()
    assert stats["kafka_failures"] >= 1 and stats["retries"] >= 1, stats
    records = read_all(bootstrap, names["readings"], timeout_s=30, expect=len(devices) * per_device)
    assert_complete_in_order(records, devices, per_device)

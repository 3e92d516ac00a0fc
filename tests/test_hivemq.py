"""HiveMQ CE as the cloud broker, end to end: gateway -> HiveMQ -> bridges -> Kafka.

The Pi's broker stays mosquitto (the ``mosquitto`` fixture); only the cloud broker changes.
Everything is real: HiveMQ CE embedded in a JVM (``tern.harness.hivemq``), the gateway with
its SQLite outbox and persistent cloud session, ``tern-bridge run`` processes (so one can be
killed with SIGKILL), and Kafka (Tansu, or ``KAFKA_BOOTSTRAP``) read back at the end.

Two questions, each answered by what reaches Kafka:

* two bridges on a shared subscription split the batches; one is killed mid-stream; every
  reading still arrives, each device's in order, and the copies are counted;
* a HiveMQ restart keeps the gateway's persistent session and the batches queued for an
  offline bridge's session: after it, the gateway re-sends nothing and each reading arrives
  exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import read_all
from tern.edge.service import Gateway
from tern.harness.hivemq import HiveMQ
from tern.harness.stack import Mosquitto, ServiceError
import functools

import helpers
from helpers import BridgeProcess, bridge_config
from helpers.pipeline import assert_complete_in_order, by_device, feed, outbox_empty, pipeline_gateway_config as gateway_config

DEADLINE = 90.0
wait_until = functools.partial(helpers.wait_until, timeout=DEADLINE)

pytestmark = [pytest.mark.xdist_group("hivemq")]


@pytest.fixture
def hivemq(tmp_path: Path) -> Iterator[HiveMQ]:
    """A private HiveMQ CE on a free loopback port (the cloud broker), stopped afterwards."""
    broker = HiveMQ(tmp_path / "hivemq").start()
    try:
        yield broker
    finally:
        broker.stop()


def copies(records: list, devices: list[str]) -> dict[str, int]:
    """How many records beyond the first of each (device, seq): the duplicates written."""
    seen = Counter((rec.key, rec.value["seq"]) for rec in records)
    extra: Counter[str] = Counter()
    for (device, _seq), n in seen.items():
        extra[device] += n - 1
    return {device: extra.get(device, 0) for device in devices}


def test_two_bridges_on_a_hivemq_shared_subscription_one_killed(
        tmp_path, mosquitto: Mosquitto, hivemq: HiveMQ, kafka_bootstrap, kafka_topics, record_property):
    started = time.monotonic()
    group = f"g{uuid.uuid4().hex[:6]}"
    bridges = [
        BridgeProcess(tmp_path / f"b{i}", bridge_config(hivemq, kafka_bootstrap, kafka_topics,
                                                         name=f"{group}-{i}", share_group=group))
        for i in range(2)
    ]
    devices = [f"dev-{i:02d}" for i in range(8)]
    per_device = 400
    window = 4
    # The confirm timeout is far longer than HiveMQ needs to hand the dead bridge's batches on:
    # a re-send by the gateway would show that the broker did not (and is counted).
    gateway = Gateway(gateway_config(tmp_path, mosquitto, hivemq, uplink_window=window, batch_size=20,
                                     confirm_timeout_s=30))
    crash: dict[str, float] = {}
    try:
        for bridge in bridges:
            bridge.wait_running()
        with gateway:
            assert gateway.wait_connected(30)

            def crash_mid_stream(first: int) -> None:
                # Halfway it hangs (SIGSTOP): the broker keeps dealing it batches that it never
                # acknowledges while the feed goes on, until every lane of the gateway waits on
                # one of them. Then it dies (SIGKILL) holding them: the worst moment to die.
                if "hung" not in crash:
                    if first >= per_device // 2:
                        os.kill(bridges[0].process.pid, signal.SIGSTOP)
                        crash["hung"] = first
                    return
                if "at" in crash or (gateway.stats()["inflight_batches"] < window and first < per_device - 20):
                    return
                crash["held"] = gateway.stats()["inflight_batches"]
                crash["confirmed"] = gateway.stats()["batches_confirmed"]
                bridges[0].kill()
                crash["at"] = time.monotonic()
                wait_until(lambda: gateway.stats()["batches_confirmed"] >= crash["confirmed"] + crash["held"],
                           timeout=DEADLINE, what="the batches the dead bridge held confirmed by the other")
                crash["recovered_s"] = time.monotonic() - crash["at"]

            feed(gateway, devices, per_device, chunk=20, pause=0.05, during=crash_mid_stream)
            assert "at" in crash, f"the bridge was never killed: {crash}"
            wait_until(lambda: outbox_empty(gateway), what="outbox drained by the bridge left")
            stats = gateway.stats()
        assert stats["forwarded"] == len(devices) * per_device, stats
    finally:
        for bridge in bridges:
            bridge.stop()
    survivor = bridges[1].log()
    assert "Traceback" not in survivor, survivor[-3000:]
    found = re.search(r"stopped: .*'batches_confirmed': (\d+)", survivor)
    again = re.search(r"stopped: .*'duplicates_received': (\d+)", survivor)
    assert found and again, survivor[-3000:]
    # HiveMQ dealt the killed bridge a share: it confirmed batches the survivor never saw.
    survivor_confirmed = int(found.group(1)) - int(again.group(1))
    assert 0 < survivor_confirmed < stats["batches_confirmed"], (survivor_confirmed, stats)

    expected = len(devices) * per_device
    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=30, expect=expected)
    assert_complete_in_order(records, devices, per_device)
    duplicates = copies(records, devices)
    total_dupes = sum(duplicates.values())
    assert len(records) == expected + total_dupes
    summary = (f"HiveMQ shared subscription, 1 of 2 bridges hung then SIGKILLed holding {crash['held']:.0f} batches: "
               f"confirmed by the other {crash['recovered_s']:.1f} s later, {stats['batches_resent']} re-sent by the "
               f"gateway; {expected} readings sent, 0 missing, {total_dupes} duplicates {duplicates}; "
               f"HiveMQ start {hivemq.start_seconds[0]:.1f} s, test {time.monotonic() - started:.0f} s")
    print(summary)
    record_property("hivemq_shared_kill", summary)
    # HiveMQ handed the dead member's unacknowledged batches to the live one at once: the
    # gateway never had to re-send (mosquitto drops them with the member's clean session,
    # and the gateway's confirm timeout brings them back).
    assert stats["batches_resent"] == 0, summary
    assert crash["recovered_s"] < 30, summary


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_hivemq_restart_keeps_the_gateways_session_and_the_queued_batches(
        tmp_path, mosquitto: Mosquitto, hivemq: HiveMQ, kafka_bootstrap, kafka_topics, how, record_property):
    devices = [f"dev-{i:02d}" for i in range(6)]
    per_device = 100
    config = bridge_config(hivemq, kafka_bootstrap, kafka_topics)  # one bridge, persistent session
    # No re-send by timer within the test: whatever reaches Kafka after the restart was kept
    # by HiveMQ (or re-sent because the gateway saw its session lost, which is counted).
    gateway = Gateway(gateway_config(tmp_path, mosquitto, hivemq, uplink_window=2, batch_size=25,
                                     confirm_timeout_s=600))
    with gateway:
        assert gateway.wait_connected(30)
        with BridgeThread(config):  # the bridge's session and subscription now exist on HiveMQ
            feed(gateway, devices, 10)
            wait_until(lambda: outbox_empty(gateway), what="warm-up readings forwarded")
        sessions_before = gateway.uplink.session.new_sessions
        feed(gateway, devices, per_device - 10, start=10)
        # The broker has acknowledged a full window of batches it can only queue (the bridge
        # is away): they exist in HiveMQ's session for the bridge and nowhere else but the outbox.
        wait_until(lambda: gateway.stats()["inflight_batches"] == 2 and gateway.outbox.pending() > 0,
                   what="two batches acknowledged by HiveMQ and held for the offline bridge")
        # PUBACKed, not merely sent: an unacknowledged one paho would publish again on its own.
        # The uplink keeps no counter of this, so its in-flight table is asked directly.
        wait_until(lambda: all(b.info.is_published() for b in list(gateway.uplink._inflight.values())),
                   what="HiveMQ's PUBACK for the batches in flight")
        held = gateway.stats()["inflight_bseq"]

        t0 = time.monotonic()
        if how == "stop":
            hivemq.restart()
        else:
            hivemq.kill()
            hivemq.start()
        restart_s = time.monotonic() - t0
        wait_until(lambda: gateway.uplink.connected, timeout=30, what="the gateway back on HiveMQ")
        session_kept = gateway.uplink.session.session_present
        with BridgeThread(config) as bridge:
            wait_until(lambda: outbox_empty(gateway), what="outbox drained after the restart")
            bstats = bridge.stats()
        gstats = gateway.stats()
    expected = len(devices) * per_device
    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=30, expect=expected)
    assert by_device(records) == {d: list(range(per_device)) for d in devices}, \
        f"after a HiveMQ {how}: gateway {gstats}, bridge {bstats}"
    summary = (f"HiveMQ {how}+start ({restart_s:.1f} s, start {hivemq.start_seconds[-1]:.1f} s) with batch {held} "
               f"queued for the offline bridge: gateway session present after it: {session_kept}, "
               f"batches re-sent: {gstats['batches_resent']}, {expected} readings in Kafka, "
               f"{len(records) - expected} duplicates")
    print(summary)
    record_property(f"hivemq_restart_{how}", summary)
    # HiveMQ kept both sessions: the gateway's (no re-send was needed) and the bridge's
    # (the queued batches were delivered from it: nothing else could have brought them).
    assert session_kept is True, summary
    assert gateway.uplink.session.new_sessions == sessions_before, summary
    assert gstats["batches_resent"] == 0, summary
    assert len(records) == expected, summary


def test_a_hivemq_that_cannot_listen_fails_at_once_with_its_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = HiveMQ(tmp_path / "hivemq", port)
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match=rf"hivemq on 127.0.0.1:{port} exited with code 1 while starting") as info:
            broker.start(timeout=60)
    # The launcher ends the JVM when HiveMQ gives up, so the harness does not wait out its timeout.
    assert time.monotonic() - t0 < 45
    assert "Could not bind any listener" in str(info.value)
    assert not broker.running

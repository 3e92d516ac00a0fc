"""The gateway end to end on real parts: two private mosquittos (local, cloud), a real SQLite
outbox, paho "nodes", and a small paho stand-in for the bridge that speaks the batch/confirm
contract through :mod:`tern.core.codec` (it is the contract, not a mock of the gateway).

Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tern.edge.cli import main as cli_main
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.edge.uplink import lane_of
from tern.core import codec, topics
from tern.core.codec import Confirm, Reading
from tern.core.errors import ConfigError

from helpers import (
    BOOT, DEADLINE, GW, SITE, BridgeStub, Node, StatusNode, config, dead_letters, new_client, outbox_rows, per_device,
    started_gateway, status_rows, wait_until,
)


# --- the custody path ------------------------------------------------------------------


def test_readings_reach_the_cloud_in_order_and_rows_go_only_after_confirm(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, batch_size=8)
    nodes = [Node(local, "dev-a"), Node(local, "dev-b")]
    for node in nodes:
        cleanup(node)
    for seq in range(12):
        for node in nodes:
            node.send(seq)

    # Every reading is committed; a batch is on the cloud broker, but nothing is confirmed,
    # so every row is still in the outbox.
    wait_until(lambda: len(outbox_rows(outbox_path)) == 24, what="24 committed rows")
    wait_until(lambda: bridge.batches, what="a batch on the cloud broker")
    assert len(outbox_rows(outbox_path)) == 24
    first = bridge.batches[0]
    assert first.gateway == GW and 1 <= len(first.readings) <= 8
    assert all(r.site == SITE and r.received_ms > 0 for r in first.readings)
    # The batch is the head of the outbox for its devices (its lane), in arrival order.
    devices = {r.device for r in first.readings}
    head = [row for row in outbox_rows(outbox_path) if row[0] in devices]
    assert [r.identity for r in first.readings] == head[: len(first.readings)]

    bridge.start_confirming()
    wait_until(lambda: not outbox_rows(outbox_path), what="outbox drained after confirms")
    delivered = bridge.delivered()
    assert per_device(delivered) == {"dev-a": list(range(12)), "dev-b": list(range(12))}
    bseqs = [b.bseq for b in bridge.batches]
    assert bseqs == sorted(bseqs)
    wait_until(lambda: all(n.acked_seq() == 11 for n in nodes), what="node acks up to seq 11")
    stats = gw.stats()
    assert stats["pending"] == 0 and stats["forwarded"] == 24
    assert stats["batches_confirmed"] == len(bridge.confirmed) >= 3  # 24 rows, at most 8 per batch
    assert stats["dead_letters"] == 0 and stats["committed"] == 24
    assert stats["local_connected"] and stats["cloud_connected"] and not stats["backpressure"]
    gw.stop()
    assert gw.stats()["pending"] == 0 and gw.stats()["forwarded"] == 24  # still answers after stop


def test_unconfirmed_batch_stays_and_is_resent(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, confirm_timeout_s=0.5)
    node = Node(local, "dev-a")
    cleanup(node)
    for seq in range(5):
        node.send(seq)
    wait_until(lambda: len(outbox_rows(outbox_path)) == 5, what="5 committed rows")
    # No confirm: the batch is re-sent, same bseq and same rows, and every row stays.
    wait_until(lambda: len(bridge.batches) >= 2, what="the batch sent twice")
    first, again = bridge.batches[:2]
    assert first.bseq == again.bseq and first.readings == again.readings
    assert len(outbox_rows(outbox_path)) == 5
    assert gw.stats()["batches_resent"] >= 1

    # A confirm for some other batch number, or garbage, deletes nothing.
    stray = new_client()
    cleanup(stray)
    stray.connect(cloud.host, cloud.port)
    stray.loop_start()
    for payload in (codec.encode_confirm(Confirm(GW, 10**9, 5)), b"not json"):
        stray.publish(topics.confirm_topic(GW), payload, qos=1).wait_for_publish(DEADLINE)
    wait_until(lambda: gw.stats()["confirms_ignored"] >= 2, what="stray confirms ignored")
    assert len(outbox_rows(outbox_path)) == 5

    bridge.start_confirming()
    wait_until(lambda: not outbox_rows(outbox_path), what="outbox drained")
    assert per_device(bridge.delivered()) == {"dev-a": [0, 1, 2, 3, 4]}


def test_batches_in_flight_hold_one_lane_each_and_confirms_in_any_order_delete_exactly_theirs(brokers, outbox_path, cleanup):
    local, cloud = brokers
    window = 4
    # One device per lane, so every lane has a batch in flight.
    by_lane: dict[int, str] = {}
    for i in range(100):
        by_lane.setdefault(lane_of(f"dev-{i}", window), f"dev-{i}")
    devices = [by_lane[lane] for lane in range(window)]
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, uplink_window=window, confirm_timeout_s=60)
    nodes = [Node(local, device) for device in devices]
    for node in nodes:
        cleanup(node)
    for seq in range(3):
        for node in nodes:
            node.send(seq)
    wait_until(lambda: len(outbox_rows(outbox_path)) == 12, what="12 committed rows")
    wait_until(lambda: len({b.bseq for b in bridge.batches}) >= window, what=f"{window} batches in flight")
    first = {}
    for batch in bridge.batches:
        first.setdefault(batch.bseq, batch)
    inflight = sorted(first.values(), key=lambda b: b.bseq)[:window]
    assert gw.stats()["inflight_batches"] == window
    # A batch holds the devices of one lane only, and each lane one batch.
    lanes = [{lane_of(r.device, window) for r in b.readings} for b in inflight]
    assert all(len(lane) == 1 for lane in lanes) and len(set().union(*lanes)) == window

    # Confirm newest first: each confirm deletes exactly its own batch's rows.
    remaining = set(outbox_rows(outbox_path))
    for batch in reversed(inflight):
        with bridge._lock:
            bridge._confirm(batch)
        mine = {r.identity for r in batch.readings}
        wait_until(lambda: not mine & set(outbox_rows(outbox_path)), what=f"rows of batch {batch.bseq} deleted")
        remaining -= mine
        assert remaining <= set(outbox_rows(outbox_path))
    assert gw.stats()["batches_resent"] == 0  # the broker acknowledged each: no copies
    bridge.start_confirming()
    wait_until(lambda: not outbox_rows(outbox_path), what="outbox drained")
    assert per_device(bridge.delivered()) == {d: [0, 1, 2] for d in devices}


def test_a_graceful_stop_waits_for_every_batch_in_flight(brokers, outbox_path, cleanup):
    local, cloud = brokers
    window = 4
    by_lane: dict[int, str] = {}
    for i in range(100):
        by_lane.setdefault(lane_of(f"dev-{i}", window), f"dev-{i}")
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, uplink_window=window, confirm_timeout_s=60)
    nodes = [Node(local, by_lane[lane]) for lane in range(window)]
    for node in nodes:
        cleanup(node)
        node.send(0)
    wait_until(lambda: gw.stats()["inflight_batches"] == window, what=f"{window} batches in flight")
    stopper = threading.Thread(target=gw.stop, kwargs={"timeout": 15})
    stopper.start()
    # The stop is under way; the oldest batch's confirm comes in, and the others only once its
    # rows are gone (a stop that waited for one batch only would be over by then).
    wait_until(lambda: not gw.ingest.stats()["local_connected"], what="the stop under way (ingest stopped)")
    batches = sorted({b.bseq: b for b in bridge.batches}.values(), key=lambda b: b.bseq)
    with bridge._lock:
        bridge._confirm(batches[0])
    wait_until(lambda: len(outbox_rows(outbox_path)) == window - 1, what="the oldest batch deleted")
    for batch in batches[1:]:
        with bridge._lock:
            bridge._confirm(batch)
    stopper.join(20)
    assert not stopper.is_alive()
    # Every batch was confirmed before the uplink let go: nothing left to send again.
    assert outbox_rows(outbox_path) == []
    assert gw.stats()["batches_confirmed"] == window


@pytest.mark.parametrize("persistence", [True, False])
def test_a_batch_is_resent_after_a_broker_restart_only_if_the_session_was_lost(mosquitto_factory, outbox_path, cleanup, persistence):
    local = mosquitto_factory("local")
    cloud = mosquitto_factory("cloud", persistence=persistence)
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, confirm_timeout_s=60)
    node = Node(local, "dev-a")
    cleanup(node)
    node.send(0)
    wait_until(lambda: bridge.batches, what="a batch on the cloud broker")
    cloud.stop()
    wait_until(lambda: not gw.stats()["cloud_connected"], what="uplink noticing the restart")
    cloud.start()
    wait_until(lambda: gw.stats()["cloud_connected"], what="uplink back")
    if persistence:
        # The broker kept our session and the batch in it: nothing to re-send.
        time.sleep(2)
        assert gw.stats()["batches_resent"] == 0
    else:
        # A fresh session: what the broker had acknowledged may be gone, so it goes again
        # at once (long before the 60 s confirm timeout).
        wait_until(lambda: gw.stats()["batches_resent"] == 1, timeout=10, what="the batch re-sent")
    assert len(outbox_rows(outbox_path)) == 1


def test_cloud_outage_accumulates_then_flows_in_order(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, batch_size=10)
    node = Node(local, "dev-a")
    cleanup(node)
    for seq in range(5):
        node.send(seq)
    wait_until(lambda: len(bridge.delivered()) == 5 and not outbox_rows(outbox_path), what="first 5 forwarded")

    cloud.stop()
    wait_until(lambda: not gw.stats()["cloud_connected"], what="uplink noticing the outage")
    for seq in range(5, 40):
        node.send(seq)
    # Store and forward: everything is committed (and acked to the node) while the cloud is away.
    wait_until(lambda: len(outbox_rows(outbox_path)) == 35, what="35 rows stored during the outage")
    wait_until(lambda: node.acked_seq() == 39, what="node acks during the outage")
    assert gw.stats()["pending"] == 35

    cloud.start()
    wait_until(lambda: not outbox_rows(outbox_path), timeout=30, what="outbox drained after the cloud returned")
    assert per_device(bridge.delivered()) == {"dev-a": list(range(40))}


def test_bad_messages_become_dead_letters_and_the_gateway_keeps_working(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    node = Node(local, "dev-a")
    cleanup(node)
    good = codec.encode_reading(Reading("dev-a", BOOT, 0, 1, {"t": 1}))
    other = codec.encode_reading(Reading("dev-b", BOOT, 0, 1, {"t": 1}))
    bad = [
        (topics.telemetry_topic(SITE, "dev-a"), b"\x00\xffnot json"),
        (topics.telemetry_topic(SITE, "dev-a"), b'{"v": 1, "dev": "dev-a"}'),
        (topics.telemetry_topic(SITE, "dev-a"), other),  # another device's reading on dev-a's topic
        (topics.telemetry_topic(SITE, "dev-a"), b" " * (codec.MAX_NODE_PAYLOAD + 1) + good),  # oversized
        ("tern/bad site/dev-a/telemetry", good),  # a topic no valid id can produce
    ]
    for topic, payload in bad:
        node.publish_raw(topic, payload)
    node.send(1)
    wait_until(lambda: len(bridge.delivered()) == 1, what="the good reading forwarded")
    letters = dead_letters(outbox_path)
    assert [(t, p) for t, p, _ in letters] == [(t, p) for t, p in bad]
    errors = [e for _, _, e in letters]
    assert "not JSON" in errors[0]
    assert "'dev-b' published on the topic of 'dev-a'" in errors[2]
    assert "limit" in errors[3]
    assert "invalid site" in errors[4]
    # The stub has the reading before the gateway has its confirm: wait for the count.
    wait_until(lambda: gw.stats()["forwarded"] == 1, what="the good reading confirmed")
    assert gw.stats()["dead_letters"] == 5
    # Dead letters are PUBACKed: the broker will not re-deliver them to the next run.
    gw.stop()
    gw2 = started_gateway(local, cloud, outbox_path, cleanup)
    node.send(2)
    wait_until(lambda: len(bridge.delivered()) == 2, what="the next reading forwarded")
    assert len(dead_letters(outbox_path)) == 5


# --- node status ------------------------------------------------------------------------


def test_birth_and_will_reach_the_cloud_and_go_only_after_confirm(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    status_node = StatusNode(local, "dev-s")
    cleanup(status_node)

    # The birth is committed and travels, but stays in the outbox until confirmed.
    wait_until(lambda: status_rows(outbox_path) == [("dev-s", BOOT, "online")], what="the birth committed")
    wait_until(lambda: bridge.batches, what="a batch on the cloud broker")
    assert [(e.device, e.state) for e in bridge.batches[0].statuses] == [("dev-s", "online")]
    assert bridge.batches[0].readings == ()  # a batch of status events alone
    node = Node(local, "dev-r")
    cleanup(node)
    node.send(0)
    wait_until(lambda: len(outbox_rows(outbox_path)) == 1, what="a reading committed behind the birth")
    stats = gw.stats()
    assert stats["nodes_online"] == 1 and stats["nodes_offline"] == 0 and stats["status_pending"] == 1

    # The broker publishes the will when the node's connection drops without DISCONNECT.
    status_node.kill()
    wait_until(lambda: len(status_rows(outbox_path)) == 2, what="the will committed")
    assert status_rows(outbox_path) == [("dev-s", BOOT, "online"), ("dev-s", BOOT, "offline")]
    assert gw.stats()["nodes_online"] == 0 and gw.stats()["nodes_offline"] == 1

    bridge.start_confirming()
    wait_until(
        lambda: not status_rows(outbox_path) and not outbox_rows(outbox_path), what="statuses and rows drained"
    )
    delivered = bridge.delivered_statuses()
    assert [(e.device, e.boot, e.state) for e in delivered] == [("dev-s", BOOT, "online"), ("dev-s", BOOT, "offline")]
    assert delivered[0].fw == "0.1.0" and delivered[0].reset == "PWRON_RESET" and delivered[1].fw == ""
    assert all(e.site == SITE and e.received_ms > 0 for e in delivered)
    assert per_device(bridge.delivered()) == {"dev-r": [0]}
    stats = gw.stats()
    assert stats["status_pending"] == 0 and stats["status_forwarded"] == 2 and stats["status_committed"] == 2
    assert stats["pending"] == 0 and stats["dead_letters"] == 0

    # A restart re-subscribes, and the broker re-delivers the retained will: it is the
    # device's latest status already, so it is acked and not forwarded again.
    gw.stop()
    sent_before = len(bridge.batches)
    gw2 = started_gateway(local, cloud, outbox_path, cleanup)
    wait_until(lambda: gw2.stats()["status_duplicates"] == 1, what="the retained will seen again")
    assert not status_rows(outbox_path) and gw2.stats()["nodes_offline"] == 1
    assert all(not b.statuses for b in bridge.batches[sent_before:])


def test_bad_statuses_become_dead_letters_and_cleared_ones_are_acked(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    node = Node(local, "dev-a")
    cleanup(node)
    topic = topics.status_topic(SITE, "dev-a")
    bad = [
        (topic, b"not json"),
        (topic, codec.encode_status(codec.Status("dev-b", "online", BOOT))),  # another device's status
        (topic, b'{"v":1,"dev":"dev-a","state":"asleep","boot":"b007"}'),
        ("tern/bad site/dev-a/status", codec.encode_status(codec.Status("dev-a", "online", BOOT))),
    ]
    for t, payload in bad:
        node.publish_raw(t, payload)
    # An empty retained payload clears the retained status: acked, not a dead letter.
    node.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(DEADLINE)
    node.publish_raw(topic, codec.encode_status(codec.Status("dev-a", "online", BOOT)))
    wait_until(lambda: len(bridge.delivered_statuses()) == 1, what="the good status forwarded")
    letters = dead_letters(outbox_path)
    assert [(t, p) for t, p, _ in letters] == bad
    errors = [e for _, _, e in letters]
    assert "not JSON" in errors[0]
    assert "'dev-b' published on the topic of 'dev-a'" in errors[1]
    assert "'state' must be one of" in errors[2]
    assert "invalid site" in errors[3]
    stats = gw.stats()
    assert stats["dead_letters"] == 4 and stats["status_cleared"] == 1 and stats["nodes_online"] == 1
    assert stats["processed"] == 6


def test_node_ack_is_published_only_after_commit(brokers, outbox_path, cleanup):
    local, cloud = brokers
    # No bridge: nothing is forwarded, so an acked reading must be in the outbox.
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    seen_at_ack: list[tuple[int, bool]] = []

    def on_ack(ack: codec.NodeAck) -> None:
        rows = outbox_rows(outbox_path)
        seen_at_ack.append((ack.seq, ("dev-a", ack.boot, ack.seq) in rows))

    node = Node(local, "dev-a", on_ack=on_ack)
    cleanup(node)
    for seq in range(3):
        node.send(seq)
        wait_until(lambda: node.acked_seq() == seq, what=f"ack for seq {seq}")
    assert seen_at_ack == [(0, True), (1, True), (2, True)]
    assert all(a.boot == BOOT for a in node.acks)
    # A duplicate (the node re-sends because it missed an ack) is ignored but acked again.
    node.send(1)
    wait_until(lambda: len(node.acks) == 4, what="ack for the duplicate")
    assert node.acks[-1].seq == 1
    assert [r[2] for r in outbox_rows(outbox_path)] == [0, 1, 2]
    assert gw.stats()["duplicates"] == 1


def test_a_fast_node_gets_one_ack_per_interval_for_all_it_committed(brokers, outbox_path, cleanup, monkeypatch):
    local, cloud = brokers
    from tern.edge import ingest

    interval = 2.0
    monkeypatch.setattr(ingest, "NODE_ACK_EVERY_S", interval)
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    unsafe: list[int] = []
    node = Node(local, "dev-a", on_ack=lambda ack: None if ("dev-a", ack.boot, ack.seq) in outbox_rows(outbox_path)
                else unsafe.append(ack.seq))
    cleanup(node)
    started = time.monotonic()
    node.send(0)
    wait_until(lambda: node.acked_seq() == 0, what="the first ack, at once")
    # Five more readings, each committed in a group of its own before the next is sent.
    for seq in range(1, 6):
        node.send(seq)
        wait_until(lambda: len(outbox_rows(outbox_path)) == seq + 1, what=f"seq {seq} committed")
    if time.monotonic() < started + interval:
        # The first ack left after seq 0 was sent, so the next one cannot have left yet.
        assert [a.seq for a in node.acks] == [0]
    wait_until(lambda: node.acked_seq() == 5, what="one ack for all five")
    assert len(node.acks) < 6 and [a.seq for a in node.acks] == sorted(a.seq for a in node.acks)
    assert gw.stats()["groups"] == 6 and gw.stats()["node_acks"] == len(node.acks)
    assert unsafe == []  # every ack's reading was in the outbox when the node got it


def test_a_bundle_is_acked_at_once_even_right_after_another_ack(brokers, outbox_path, cleanup, monkeypatch):
    """The firmware replays its spill a few bundles at a time, each waiting for its ack."""
    local, cloud = brokers
    from tern.edge import ingest

    monkeypatch.setattr(ingest, "NODE_ACK_EVERY_S", 30.0)
    started_gateway(local, cloud, outbox_path, cleanup)
    node = Node(local, "dev-a")
    cleanup(node)
    node.send(0)
    wait_until(lambda: node.acked_seq() == 0, what="the first ack")
    bundle = [Reading("dev-a", BOOT, seq, 1_700_000_000_000 + seq, {"t": 20.5}) for seq in (1, 2, 3)]
    node.publish_raw(topics.telemetry_topic(SITE, "dev-a"), codec.encode_bundle(bundle))
    # Well before the 30 s a single reading's ack would wait.
    wait_until(lambda: node.acked_seq() == 3, what="the bundle's ack", timeout=20)
    assert [r[2] for r in outbox_rows(outbox_path)] == [0, 1, 2, 3]


def test_gateway_killed_between_commit_and_forward_loses_nothing(brokers, outbox_path, cleanup, tmp_path):
    local, cloud = brokers
    # Create the gateway's persistent session first: the broker queues for it while the
    # gateway process starts, exactly as it does across a gateway restart.
    session = new_client(f"tern-gw-{GW}-ingest", clean=False)
    subscribed = threading.Event()
    session.on_subscribe = lambda *a: subscribed.set()
    session.connect(local.host, local.port)
    session.loop_start()
    session.subscribe(topics.TELEMETRY_FILTER, qos=1)
    assert subscribed.wait(DEADLINE)
    session.disconnect()
    session.loop_stop()

    node = Node(local, "dev-a")
    cleanup(node)
    for seq in range(20):
        node.send(seq)
    # The gateway as a real process, with no bridge on the cloud broker: rows are
    # committed (and PUBACKed) but never confirmed. Then SIGKILL it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tern.edge.cli", "run", "--gateway-id", GW, "--local", local.address,
         "--cloud", cloud.address, "--outbox", str(outbox_path), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gateway.log", "wb"),
    )
    try:
        wait_until(lambda: len(outbox_rows(outbox_path)) == 20, what="20 rows committed by the gateway process")
        wait_until(lambda: node.acked_seq() == 19, what="node acks from the gateway process")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert len(outbox_rows(outbox_path)) == 20

    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw = Gateway(config(local, cloud, outbox_path))
    cleanup(gw)
    gw.start()
    for seq in range(20, 25):
        node.send(seq)
    wait_until(lambda: len(bridge.delivered()) >= 25 and not outbox_rows(outbox_path), what="everything forwarded")
    # At least once, in order: every reading arrives, none out of order per device.
    seqs = per_device(bridge.delivered())["dev-a"]
    assert sorted(set(seqs)) == list(range(25))
    assert seqs == sorted(seqs)


# --- back-pressure ---------------------------------------------------------------------


def test_full_outbox_stops_acking_and_resumes_when_room_frees(brokers, outbox_path, cleanup):
    local, cloud = brokers
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, max_rows=5, confirm_timeout_s=0.5)
    node = Node(local, "dev-a")
    cleanup(node)
    for seq in range(12):
        node.send(seq)
    wait_until(lambda: gw.stats()["backpressure"], what="back-pressure")
    wait_until(lambda: gw.stats()["held"] == 7, what="7 readings held un-acked")
    assert [r[2] for r in outbox_rows(outbox_path)] == [0, 1, 2, 3, 4]
    # The node is told only what is committed (its ack comes after the commit; poll for it).
    wait_until(lambda: node.acked_seq() == 4, what="node ack for seq 4")
    assert gw.stats()["backpressure_events"] == 1 and gw.stats()["held"] == 7
    assert node.acked_seq() == 4 and len(outbox_rows(outbox_path)) == 5

    bridge.start_confirming()
    wait_until(lambda: len(bridge.delivered()) == 12 and not outbox_rows(outbox_path), what="all 12 forwarded")
    assert per_device(bridge.delivered()) == {"dev-a": list(range(12))}
    assert not gw.stats()["backpressure"]
    wait_until(lambda: node.acked_seq() == 11, what="node acks after the outbox drained")


def test_unacked_readings_survive_a_gateway_restart_in_the_broker_session(brokers, outbox_path, cleanup):
    local, cloud = brokers
    gw = started_gateway(local, cloud, outbox_path, cleanup, max_rows=4)
    node = Node(local, "dev-a")
    cleanup(node)
    for seq in range(10):
        node.send(seq)
    wait_until(lambda: gw.stats()["held"] == 6, what="6 readings held un-acked")
    gw.stop()  # the 6 held readings were never PUBACKed: the broker keeps them for the session

    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw2 = Gateway(config(local, cloud, outbox_path, max_rows=100))
    cleanup(gw2)
    gw2.start()
    wait_until(lambda: len(bridge.delivered()) == 10 and not outbox_rows(outbox_path), what="all 10 forwarded")
    assert per_device(bridge.delivered()) == {"dev-a": list(range(10))}


def test_local_broker_restart_while_readings_are_held_loses_nothing(brokers, outbox_path, cleanup):
    """A Pi broker restart while the gateway holds un-acked readings (outbox full) loses
    nothing: they reach the cloud in order and none is left un-acked in the session."""
    local, cloud = brokers
    gw = started_gateway(local, cloud, outbox_path, cleanup, max_rows=4)
    node = Node(local, "dev-a")
    for seq in range(10):
        node.send(seq)
    node.close()
    wait_until(lambda: gw.stats()["held"] == 6, what="6 readings held un-acked")

    local.stop()  # persistence keeps the gateway's session and its 6 un-acked messages
    local.start()
    assert gw.wait_connected(DEADLINE), "gateway did not reconnect to the restarted broker"

    bridge = BridgeStub(cloud)  # room frees as batches are confirmed
    cleanup(bridge)
    wait_until(lambda: len({r.seq for r in bridge.delivered()}) == 10 and not outbox_rows(outbox_path), what="all 10 forwarded")
    seqs = [r.seq for r in bridge.delivered()]
    assert list(dict.fromkeys(seqs)) == list(range(10)), seqs
    # Every message was acked on the connection it came from: a new session sees none again.
    gw.stop()
    gw2 = started_gateway(local, cloud, outbox_path, cleanup, max_rows=100)
    # A marker: the broker delivers in order, so a re-delivered old reading would come first.
    marker = Node(local, "dev-a")
    cleanup(marker)
    marker.send(10)
    wait_until(lambda: marker.acked_seq() == 10, what="marker acked")
    assert gw2.stats()["processed"] == 1, gw2.stats()


# --- configuration and CLI -------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gateway_id": "gw/1"}, "invalid gateway id"),
        ({"cloud_broker": "127.0.0.1:99999"}, "cloud_broker"),
        ({"local_broker": "127.0.0.1:x"}, "local_broker"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_rows": -1}, "max_rows"),
        ({"confirm_timeout_s": 0}, "confirm_timeout_s"),
        ({"outbox_path": ""}, "outbox"),
        ({"uplink_window": 0}, "uplink_window"),
        ({"uplink_window": 65}, "uplink_window"),
        ({"batch_linger_ms": -1}, "batch_linger_ms"),
        ({"batch_max_bytes": 100}, "batch_max_bytes"),
        ({"batch_max_bytes": 2 << 20}, "batch_max_bytes"),
    ],
)
def test_bad_config_is_a_config_error(options, message, tmp_path):
    values = {"gateway_id": GW, "cloud_broker": "127.0.0.1:1884", "outbox_path": str(tmp_path / "o.db")}
    values.update(options)
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(**values)


def test_config_from_env(tmp_path):
    env = {
        "TERN_GATEWAY_ID": "gw9",
        "TERN_LOCAL_BROKER": "127.0.0.1:1999",
        "TERN_CLOUD_BROKER": "127.0.0.1",
        "TERN_OUTBOX": str(tmp_path / "o.db"),
    }
    cfg = GatewayConfig.from_env(env)
    assert (cfg.gateway_id, cfg.local_hostport, cfg.cloud_hostport) == ("gw9", ("127.0.0.1", 1999), ("127.0.0.1", 1883))
    assert cfg.ingest_client_id == "tern-gw-gw9-ingest" and cfg.uplink_client_id == "tern-gw-gw9-uplink"
    with pytest.raises(ConfigError, match="TERN_CLOUD_BROKER"):
        GatewayConfig.from_env({k: v for k, v in env.items() if k != "TERN_CLOUD_BROKER"})


def test_cli_config_error_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    for name in ("TERN_GATEWAY_ID", "TERN_LOCAL_BROKER", "TERN_CLOUD_BROKER", "TERN_OUTBOX"):
        monkeypatch.delenv(name, raising=False)
    code = cli_main(["run", "--gateway-id", "gw1", "--cloud", "nowhere:0", "--outbox", str(tmp_path / "o.db")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tern-gateway: error: cloud_broker") and err.count("\n") == 1
    assert cli_main(["outbox", "--outbox", str(tmp_path / "missing.db")]) == 2
    assert "no outbox at" in capsys.readouterr().err


def test_cli_outbox_table(tmp_path, capsys):
    from tern.edge.outbox import DeadLetter, Outbox

    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add(
            [Reading("dev-a", BOOT, s, 1, {"t": 1}, site=SITE) for s in range(3)]
            + [Reading("dev-b", BOOT, 7, 1, {"t": 1}, site=SITE)],
            [DeadLetter("tern/x", b"junk", "not JSON")],
        )
    assert cli_main(["outbox", "--outbox", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dev-a" in out and "dev-b" in out
    assert "pending: 4" in out and "dead letters: 1" in out

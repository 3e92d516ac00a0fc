"""Issue 28: one node cannot starve the site (edge/shares.py).

On real parts: two private mosquittos, the real gateway and outbox, paho nodes speaking the
node wire format, the real firmware on the MicroPython unix port, and Kafka for the end of the
outage. Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.core import codec, topics
from tern.core.codec import Reading
from tern.core.errors import ConfigError
from tern.edge import shares
from tern.edge.outbox import Outbox
from tern.edge.retention import RetentionPolicy
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto

from helpers import BOOT, SITE, BridgeStub, Node, StatusNode, config, new_client, outbox_rows, wait_until


def per_device_rows(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for device, _boot, _seq in outbox_rows(path):
        counts[device] = counts.get(device, 0) + 1
    return counts


class Runaway:
    """A node gone wrong: publishes ``count`` readings as fast as QoS 1 allows (never re-sends)."""

    def __init__(self, broker, device: str = "runaway") -> None:
        self.device = device
        self.acks: list[codec.NodeAck] = []
        self.client = new_client()
        self.client.max_inflight_messages_set(100)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(topics.ack_topic(SITE, device), qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, msg: self.acks.append(codec.decode_node_ack(msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(20), "runaway could not subscribe"

    def flood(self, count: int, timeout: float = 30.0) -> float:
        """Publish ``count`` readings; returns the seconds until the broker had them all."""
        started = time.monotonic()
        infos = []
        topic = topics.telemetry_topic(SITE, self.device)
        for seq in range(1, count + 1):
            reading = Reading(self.device, BOOT, seq, 1_700_000_000_000 + seq, {"n": seq})
            infos.append(self.client.publish(topic, codec.encode_reading(reading), qos=1))
        for info in infos:
            info.wait_for_publish(max(0.1, timeout - (time.monotonic() - started)))
            assert info.is_published(), "the broker did not take the flood in time"
        return time.monotonic() - started

    def acked_seq(self) -> int:
        return max((a.seq for a in self.acks), default=-1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def delivered_holds(bridge: BridgeStub) -> list[codec.HoldEvent]:
    """The hold events of every batch the stub received, once per bseq (a re-send carries the same)."""
    batches = {b.bseq: b for b in list(bridge.batches)}
    return [h for bseq in sorted(batches) for h in batches[bseq].holds]


def good_node(local, device: str, cleanup) -> Node:
    """A well-behaved node: online (its birth, as the firmware sends it), then readings."""
    cleanup(StatusNode(local, device))
    node = Node(local, device)
    cleanup(node)
    return node


class Site(NamedTuple):
    """A site with its cloud link down unless ``bridge`` (a stub) takes the batches."""

    local: Mosquitto
    cloud: Mosquitto
    outbox: Path
    gw: Gateway
    bridge: BridgeStub | None


@pytest.fixture
def start_site(mosquitto_factory, tmp_path: Path, cleanup) -> Callable[..., Site]:
    """``start_site(bridge_stub=False, **settings)``: the Pi's broker, the cloud broker, a stub
    bridge on it if asked, and a connected gateway with ``settings``; all stopped afterwards."""

    def start(bridge_stub: bool = False, **settings: Any) -> Site:
        # With the link down the stop waits for confirms that cannot come: not for long.
        settings.setdefault("stop_timeout_s", 3.0)
        local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
        bridge = None
        if bridge_stub:
            bridge = BridgeStub(cloud)
            cleanup(bridge)
        outbox = tmp_path / "gw" / "outbox.db"
        gw = Gateway(config(local, cloud, outbox, **settings))
        cleanup(gw)
        gw.start()
        assert gw.wait_connected(20)
        return Site(local, cloud, outbox, gw, bridge)

    return start


# --- the scenario ---------------------------------------------------------------------


def test_runaway_is_held_back_the_good_node_is_committed_and_all_of_it_reaches_kafka(
    start_site, kafka_bootstrap: str, kafka_topics: dict[str, str], cleanup, caplog, capsys, monkeypatch
) -> None:
    """The issue's scenario, cloud link down: the runaway is held back, the good node is not;
    then the gateway restarts and the bridge comes back. Every committed reading reaches Kafka,
    and the hold arrives as a tern.hold/1 record that the reader shows exactly once although
    it was sent in two batches (the first confirm never reached the gateway)."""
    from helpers import bridge_config
    from tern.cloud.bridge import BridgeThread
    from tern.cloud.cli import main as bridge_cli
    from tern.cloud.consume import read_all
    from tern.cloud.reader import read_tern

    local, cloud, outbox, gw, _ = start_site(max_rows=5000)
    bridge_settings = bridge_config(cloud, kafka_bootstrap, kafka_topics)
    with BridgeThread(bridge_settings):
        # The bridge ran before the outage: its persistent session queues what the gateway sends.
        good = good_node(local, "good", cleanup)
        wait_until(lambda: gw.stats()["nodes_online"] == 1 and gw.stats()["batches_confirmed"] >= 1,
                   what="the good node's birth in Kafka")
    runaway = Runaway(local)
    cleanup(runaway)
    caplog.set_level("WARNING", logger="tern.edge.ingest")
    flood_s = runaway.flood(20_000)
    wait_until(lambda: gw.stats()["held_back"] > 0, what="the runaway held back")
    wait_until(lambda: gw.stats()["processed"] >= 20_000, what="the whole flood through ingest", timeout=30)

    started = time.monotonic()
    for seq in range(100):
        good.send(seq)
    wait_until(lambda: good.acked_seq() == 99, what="the good node's 100 acked", timeout=15)
    good_acked_s = time.monotonic() - started
    rows = per_device_rows(outbox)
    assert rows["good"] == 100
    # Held where the last tenth of the bound begins (the good node's birth left before the
    # outage): that tenth is left to the others.
    held_at = 4500
    assert rows["runaway"] == held_at and sum(rows.values()) <= 5000
    # Custody: the runaway was told only what is committed, never beyond its hole.
    assert runaway.acked_seq() == held_at
    stats = gw.stats()
    held_back = stats["held_back_by_device"][f"{SITE}/runaway"]["held_back"]
    assert held_back == 20_000 - held_at
    assert stats["held_back_by_device"][f"{SITE}/runaway"]["held"] and "good" not in str(stats["held_back_by_device"])
    lines = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
    assert lines == ["node 'runaway' holds 4,500 of 5,000 rows: its readings are held back; others continue"], lines
    print(f"\nflood of 20,000 published in {flood_s:.1f} s; good node's 100 acked in {good_acked_s:.2f} s; rows {rows}")

    # The hold is on its way to the cloud (holds/1): one event with the counts (two if the
    # runaway's first batch left after the hold began), in the outbox with the hold itself,
    # handed to batches that are out on the cloud broker, unconfirmed.
    wait_until(lambda: gw.outbox.holds_unclaimed() == 0, what="the hold event handed to a batch")
    events = gw.outbox.hold_events()
    assert {(e["device"], e["reason"], e["lifted"]) for e in events} == {("runaway", shares.SHARE, 0)}
    assert sum(e["count"] for e in events) == held_back and min(e["first_seq"] for e in events) == held_at + 1
    assert all(e["bseq"] is not None for e in events) and len(events) <= 2, events
    expected = sorted(
        ({"schema": codec.KAFKA_HOLD_SCHEMA_ID, "site": e["site"], "device": e["device"], "gateway": gw.config.gateway_id,
          "boot": e["boot"], "reason": e["reason"], "first_seq": e["first_seq"], "count": e["count"],
          "held_since_ms": e["since_ms"], "updated_ms": e["at_ms"], "lifted": False} for e in events),
        key=lambda v: v["first_seq"])
    # The Pi restarts during the outage (its stop waits for confirms that cannot come)...
    gw.stop(timeout=3)
    # ...and the bridge returns before it: it writes the queued batches, the hold's among them,
    # and confirms them to a gateway that is not there to see it.
    with BridgeThread(bridge_settings) as bridge:
        wait_until(lambda: bridge.stats()["holds_written"] == len(events), what="the hold written once", timeout=30)
        gw2 = Gateway(gw.config)
        cleanup(gw2)
        gw2.start()
        assert gw2.wait_connected(20)
        # The restarted gateway still has the events (custody: never confirmed to it) and sends
        # them again in a new batch, which the bridge writes again: at least once.
        wait_until(lambda: gw2.stats()["pending"] == 0 and gw2.stats()["inflight_bseq"] is None
                   and not gw2.outbox.hold_events(), what="outbox drained, the hold confirmed", timeout=60)
        assert gw2.stats()["hold_events_forwarded"] == len(events)
        assert bridge.stats()["holds_written"] == 2 * len(events)
    records = read_all(kafka_bootstrap, kafka_topics["readings"], expect=100 + held_at)
    got = {(r.identity[0], r.identity[2]) for r in records}
    assert got == {("good", s) for s in range(100)} | {("runaway", s) for s in range(1, held_at + 1)}

    # In Kafka twice (the contract's at-least-once): the same record both times, keyed by device.
    status = read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=20)
    holds = [(r.key, codec.decode_kafka_hold_value(r.raw)) for r in status
             if orjson.loads(r.raw)["schema"] == codec.KAFKA_HOLD_SCHEMA_ID]
    assert all(key == "runaway" for key, _ in holds), holds
    unchanging = sorted(({k: v for k, v in value.items() if k != "bridge_ms"} for _, value in holds),
                        key=lambda v: v["first_seq"])
    assert unchanging == sorted(expected * 2, key=lambda v: v["first_seq"])
    # Exactly once to a reader that de-duplicates, as `tern-bridge consume --dedup` does.
    read = list(read_tern(kafka_bootstrap, kafka_topics["status"], from_beginning=True, dedup_window=1000, timeout_s=20))
    once = sorted(({k: v for k, v in r.value.items() if k != "bridge_ms"} for r in read if r.kind == "hold"),
                  key=lambda v: v["first_seq"])
    assert once == expected and sum(v["count"] for v in once) == held_back
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert bridge_cli(["consume", "--kafka", kafka_bootstrap, "--topic", kafka_topics["status"], "--from-beginning",
                       "--dedup"]) == 0
    out = capsys.readouterr().out
    assert out.count("readings held back (share), still held: not lost") == len(events), out
    assert all(f"{v['count']} readings held back" in out for v in expected), out
    print(f"hold events in Kafka twice, read once: {len(events)}, {held_back} readings of 'runaway' held back")


def test_under_drop_oldest_only_the_runaway_loses_readings(start_site, cleanup) -> None:
    local, _, outbox, gw, _ = start_site(max_rows=5000, telemetry_policy="drop_oldest")
    good = good_node(local, "good", cleanup)
    for seq in range(50):  # some of the good node's readings are older than the flood
        good.send(seq)
    runaway = Runaway(local)
    cleanup(runaway)
    runaway.flood(20_000)
    for seq in range(50, 100):
        good.send(seq)
    wait_until(lambda: good.acked_seq() == 99 and runaway.acked_seq() == 20_000, what="everything acked", timeout=30)
    rows = per_device_rows(outbox)
    assert rows["good"] == 100 and sum(rows.values()) + gw.stats()["status_pending"] <= 5000
    drops = {(d["device"], d["reason"]): d["count"] for d in gw.outbox.drop_counts()}
    assert drops == {("runaway", "max_rows"): 20_000 - rows["runaway"]}
    assert gw.stats()["held_back"] == 0  # drop_oldest holds nobody back for the bound


def test_ten_normal_nodes_are_acked_as_fast_with_a_runaway_beside_them(start_site, cleanup) -> None:
    """Link down, max_rows 5000: a runaway floods 20,000 while 10 nodes send 30 readings each
    at 10/s. Each normal reading is acked (node ack) within ack_bound_s of its publish.

    Starved, a normal node would get no ack at all while the link is down (the runaway's rows
    would fill the outbox); held back, the runaway costs them little (p50 36 ms, max 0.43 s in one run beside other tests). The
    bound is loose because a loaded 2-core run once took 1.1 s for one ack: a timing figure is
    the bench's job, this test's is that no node waits on the runaway."""
    ack_bound_s = 3.0
    local, _, outbox, gw, _ = start_site(max_rows=5000)
    sent_at: dict[tuple[str, int], float] = {}
    acked_at: dict[tuple[str, int], float] = {}
    lock = threading.Lock()

    def on_ack(device: str):
        def note(ack: codec.NodeAck) -> None:
            now = time.monotonic()
            with lock:
                for (d, seq), _t in list(sent_at.items()):
                    if d == device and seq <= ack.seq and (d, seq) not in acked_at:
                        acked_at[(d, seq)] = now
        return note

    nodes = []
    for i in range(10):
        device = f"normal-{i}"
        cleanup(StatusNode(local, device))
        node = Node(local, device, on_ack=on_ack(device))
        cleanup(node)
        nodes.append(node)
    wait_until(lambda: gw.stats()["nodes_online"] == 10, what="10 births")
    runaway = Runaway(local)
    cleanup(runaway)
    flood = threading.Thread(target=runaway.flood, args=(20_000, 60.0), daemon=True)
    flood.start()
    for seq in range(30):
        for node in nodes:
            with lock:
                sent_at[(node.device, seq)] = time.monotonic()
            node.send(seq)
        time.sleep(0.1)
    flood.join(60)
    wait_until(lambda: len(acked_at) == 300, what="300 normal readings acked", timeout=20)
    latencies = sorted(acked_at[k] - sent_at[k] for k in sent_at)
    p50, p99, worst = latencies[150], latencies[296], latencies[-1]
    print(f"\nnormal nodes' node-ack latency with a runaway: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {worst * 1000:.0f} ms; runaway rows {per_device_rows(outbox).get('runaway')}")
    assert worst < ack_bound_s, latencies[-10:]
    assert gw.stats()["held_back_by_device"][f"{SITE}/runaway"]["held_back"] > 0


def test_device_rate_limit_holds_back_the_fast_node_only(start_site, cleanup) -> None:
    local, _, outbox, gw, bridge = start_site(bridge_stub=True, device_rate_limit="50 readings/s")
    good = good_node(local, "good", cleanup)
    runaway = Runaway(local)
    cleanup(runaway)
    started = time.monotonic()
    runaway.flood(2000)
    for seq in range(20):
        good.send(seq)
    wait_until(lambda: good.acked_seq() == 19, what="the good node acked", timeout=10)
    elapsed = time.monotonic() - started
    committed = {r.seq for r in bridge.delivered() if r.device == "runaway"} | {
        s for d, _b, s in outbox_rows(outbox) if d == "runaway"}
    # One second's burst plus the rate over the flood (and some slack for the clock).
    assert 0 < len(committed) <= 50 + 50 * elapsed + 10, (len(committed), elapsed)
    assert runaway.acked_seq() == max(committed) and committed == set(range(1, max(committed) + 1))
    by_device = gw.stats()["held_back_by_device"]
    assert by_device[f"{SITE}/runaway"]["reason"] == shares.RATE and f"{SITE}/good" not in by_device
    health = gw.health.snapshot()
    assert health["ingest"]["held_back"] == gw.stats()["held_back"] > 0
    assert [d["held_back"] for d in health["devices"] if d["device"] == "runaway"] == [by_device[f"{SITE}/runaway"]["held_back"]]
    # Reported to the cloud (holds/1): the fast node's hold, for its rate, every reading held counted.
    wait_until(lambda: gw.outbox.holds_unclaimed() == 0 and gw.stats()["inflight_bseq"] is None
               and sum(h.count for h in delivered_holds(bridge)) == gw.stats()["held_back"],
               what="the hold events delivered and confirmed", timeout=15)
    holds = delivered_holds(bridge)
    assert {(h.device, h.reason, h.boot) for h in holds} == {("runaway", shares.RATE, BOOT)}
    assert all(h.count > 0 and not h.lifted and h.updated_ms >= h.held_since_ms for h in holds)


def test_a_birth_replayed_on_a_resubscribe_keeps_the_hold(start_site, cleanup) -> None:
    """The broker replays a held node's retained birth when the gateway subscribes again (here
    after a restart). That node did not reconnect and sends nothing again: the hold stays, so
    its next reading is not committed past the hole (the node ack would drop the hole)."""
    local, _, outbox, first, _ = start_site(device_rate_limit="20 readings/s")
    cleanup(StatusNode(local, "fast"))
    wait_until(lambda: first.stats()["nodes_online"] == 1, what="the birth")
    node = Runaway(local, "fast")
    cleanup(node)
    node.flood(200)
    wait_until(lambda: first.stats()["processed"] >= 201, what="the flood through ingest", timeout=30)

    def last_committed() -> int:
        return max((s for d, _b, s in outbox_rows(outbox) if d == "fast"), default=-1)

    # Node acks are coalesced (one per node per 100 ms): the last one follows the last commit.
    wait_until(lambda: node.acked_seq() == last_committed(), what="the node acked up to its last committed reading")
    hole = node.acked_seq()
    assert 0 < hole < 200 and first.stats()["holds_active"] == 1
    first.stop(timeout=3)
    gw = Gateway(first.config)
    cleanup(gw)
    gw.start()
    assert gw.wait_connected(20)
    wait_until(lambda: gw.stats()["status_duplicates"] >= 1, what="the retained birth replayed")
    assert gw.stats()["holds_active"] == 1
    reading = Reading("fast", BOOT, 201, 1_700_000_000_201, {"n": 201})
    node.client.publish(topics.telemetry_topic(SITE, "fast"), codec.encode_reading(reading), qos=1)
    wait_until(lambda: gw.stats()["held_back"] == 1, what="the next reading held back")
    assert last_committed() == hole and node.acked_seq() == hole


def test_real_firmware_held_back_sends_again_and_loses_nothing(start_site, tmp_path: Path, cleanup) -> None:
    """The real firmware above device_rate_limit: held back (acked to the broker, not committed,
    no node ack), then asked to send again by the repeated node ack: every reading arrives once
    in the cloud, and the node's ring dropped none."""
    from helpers import require_toolchain
    from tern.device import EmulatedNode

    require_toolchain()
    local, _, _, first, bridge = start_site(bridge_stub=True, device_rate_limit="20 readings/s")
    # The gateway restarts: its session on the Pi broker keeps the node's readings meanwhile, and
    # they reach it as one burst, above the rate however slowly a loaded machine runs the node.
    first.stop(timeout=3)
    total = 60  # within the ring (64 slots): above the rate, none may be lost
    node = EmulatedNode(tmp_path / "fw", device="fw-node", site=SITE, broker=local.address, interval_ms=10,
                        max_readings=total, extra_config={"ring_size": 64})
    cleanup(node)  # stop()ped at teardown, pass or fail: the MicroPython process never outlives the test
    node.flash()
    node.start()
    wait_until(lambda: node.sent == total, what="the node's readings sent to the Pi broker", timeout=30)
    gw = Gateway(first.config)
    cleanup(gw)
    gw.start()
    assert gw.wait_connected(20)
    try:
        wait_until(lambda: {r.seq for r in bridge.delivered() if r.device == "fw-node"} == set(range(1, total + 1)),
                   what="every reading of the firmware node delivered", timeout=30)
    except AssertionError:
        got = sorted({r.seq for r in bridge.delivered() if r.device == "fw-node"})
        raise AssertionError(f"delivered {len(got)}: {got[:5]}..{got[-5:]}; gateway {gw.stats()}; node log:\n"
                             + "\n".join(node.log_text().splitlines()[-40:])) from None
    wait_until(lambda: node.acked == total, what="the node acked to the end", timeout=10)
    stats = gw.stats()
    assert stats["held_back"] > 0 and stats["resend_hints"] > 0
    # The cloud was told (holds/1), and told that the hold lifted: the last event says so.
    wait_until(lambda: gw.outbox.holds_unclaimed() == 0 and gw.stats()["inflight_bseq"] is None
               and sum(h.count for h in delivered_holds(bridge)) == gw.stats()["held_back"],
               what="the hold events delivered and confirmed", timeout=15)
    holds = delivered_holds(bridge)
    assert {(h.device, h.reason) for h in holds} == {("fw-node", shares.RATE)} and any(h.lifted for h in holds), holds
    assert node.dropped == 0 and "rewind" in node.log_text()
    assert stats["committed"] == total


# --- settings --------------------------------------------------------------------------------


def test_bad_share_settings_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    from tern.edge.config import GatewayConfig

    base = dict(gateway_id="gw", cloud_broker="127.0.0.1:1883", outbox_path=tmp_path / "o.db", max_rows=1000)
    for key, value, says in (
        ("device_rate_limit", "20 kB/s", "readings/s"),
        ("device_rate_limit", "fast", "readings/s"),
        ("device_share_floor", 0, "device_share_floor"),
        ("device_share_floor", 2000, "device_share_floor"),
        ("device_share_cap", 5, "device_share_cap"),
    ):
        with pytest.raises(ConfigError, match=says):
            GatewayConfig(**base, **{key: value}, **({"device_share_floor": 10} if key == "device_share_cap" else {}))
    GatewayConfig(**base, device_rate_limit="50 readings/s", device_share_floor=10, device_share_cap=500)


# --- the model: the device holding the most is the one held back ------------------------------

DEVICES = ["a", "b", "c", "d"]


@settings(max_examples=300, deadline=None)
@given(
    adds=st.lists(st.tuples(st.sampled_from(DEVICES), st.integers(1, 3)), max_size=120),
    capacity=st.integers(1, 60),
    online=st.sets(st.sampled_from(DEVICES)),
    floor=st.integers(1, 5),
)
def test_model_any_interleaving_holds_back_the_device_holding_the_most(adds, capacity, online, floor) -> None:
    adm = shares.Admission(counts={}, used=0, capacity=capacity, floor=floor, online=frozenset(online))
    for device, rows in adds:
        before = dict(adm.counts)
        verdict = adm.admit(device, rows)
        if verdict == shares.SHARE:
            # Over its share, and so is whoever holds the most: they would be refused too.
            assert before.get(device, 0) + rows > adm.share(device)
            if any(before.values()):
                top = max(before, key=lambda d: before[d])
                assert before[top] >= before.get(device, 0)
                probe = dataclasses.replace(adm, counts=dict(before))
                assert probe.admit(top, rows) != shares.ADMIT
        elif verdict == shares.FULL:
            assert adm.used + rows > adm.capacity  # only when there is no room for anyone
        else:
            assert verdict == shares.ADMIT
        # (a bundle larger than the room may overshoot the bound once, as without shares)
        assert adm.used <= capacity + 2 and sum(adm.counts.values()) == adm.used


@settings(max_examples=300, deadline=None)
@given(
    start=st.dictionaries(st.sampled_from(DEVICES), st.integers(0, 40)),
    adds=st.lists(st.sampled_from(DEVICES), max_size=80),
    headroom=st.integers(1, 60),  # capacity beyond the rows held: near the bound and far from it
    cap=st.none() | st.integers(1, 30),
    drops_oldest=st.booleans(),
)
def test_model_rows_within_sure_room_are_admitted_as_admit_would(start, adds, headroom, cap, drops_oldest) -> None:
    # Ingest counts the readings within sure_room() in one step instead of asking admit():
    # admit() must say ADMIT to each of them, and the counts must come out the same.
    capacity = sum(start.values()) + headroom

    def snapshot() -> shares.Admission:
        return shares.Admission(counts=dict(start), used=sum(start.values()), capacity=capacity, floor=2, cap=cap,
                                drops_oldest=drops_oldest)

    asked, quick = snapshot(), snapshot()
    sure = quick.sure_room()
    within = adds[:sure]
    assert [asked.admit(device, 1) for device in within] == [shares.ADMIT] * len(within)
    quick.count_admitted(within)
    assert (quick.counts, quick.used, quick.admitted, quick.droppable) == (
        asked.counts, asked.used, asked.admitted, asked.droppable)
    if cap is not None:
        assert sure == 0  # a per-device cap is asked reading by reading


@settings(max_examples=100, deadline=None)
@given(adds=st.lists(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=6), max_size=25))
def test_model_drop_oldest_trims_only_the_device_holding_the_most(tmp_path_factory, adds) -> None:
    path = tmp_path_factory.mktemp("trim") / "o.db"
    seq: dict[str, int] = {}
    with Outbox(path, retention=RetentionPolicy(max_rows=12, telemetry="drop_oldest")) as box:
        for group in adds:
            readings = []
            for device in group:
                seq[device] = seq.get(device, 0) + 1
                readings.append(Reading(device, BOOT, seq[device], 1, {"n": 1}))
            drops_before = {d["device"]: d["count"] for d in box.drop_counts()}
            box.add(readings)
            after = box.device_rows()
            lost = {d["device"] for d in box.drop_counts() if d["count"] > drops_before.get(d["device"], 0)}
            for d in lost:
                for e in set(after) - lost:
                    assert after.get(d, 0) >= after[e] - 1, (group, after, lost)
            assert sum(after.values()) <= 12

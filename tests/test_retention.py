"""Retention: each bound (rows, bytes, age) and policy (block, drop_oldest) on a real SQLite outbox;
statuses never dropped; drop events in the envelope and, through the real bridge, in Kafka."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import read_all
from tern.core import codec
from tern.core.codec import Batch, DropEvent, Reading, StatusEvent
from tern.core.errors import CodecError
from tern.edge.config import GatewayConfig
from tern.edge.outbox import Outbox
from tern.edge.retention import RetentionError, RetentionPolicy
from tern.edge.service import Gateway

from helpers import BOOT, SITE, BridgeStub, Node, StatusNode, bridge_config, config, new_client, wait_until


def reading(seq: int, device: str = "dev-a", boot: str = "b001", size: int = 1) -> Reading:
    return Reading(device, boot, seq, 1_700_000_000_000 + seq, {"t": seq, "pad": "x" * size}, site="s1")


def status(device: str, state: str = "online") -> StatusEvent:
    return StatusEvent("s1", device, state, "b001")


def seqs(box: Outbox) -> list[int]:
    """Pending seqs in order, read without take() (which would mark them as in flight)."""
    return [row[0] for row in box.db.execute("SELECT seq FROM outbox ORDER BY id")]


def test_block_is_the_default_and_never_drops(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=5) as box:
        assert box.retention.telemetry == "block"
        box.add([reading(s) for s in range(1, 6)])
        assert box.room() == 0
        # A caller that ignores room() overshoots the bound rather than losing anything.
        result = box.add([reading(6)], statuses=[status("dev-s")])
        assert result.dropped == {} and box.pending() == 6 and box.status_pending() == 1
        assert box.drop_totals() == {"max_rows": 0, "max_bytes": 0, "max_age": 0}


def test_drop_oldest_at_the_row_bound_counts_and_reports_per_device(tmp_path: Path) -> None:
    policy = RetentionPolicy(max_rows=5, telemetry="drop_oldest")
    with Outbox(tmp_path / "o.db", retention=policy) as box:
        assert box.room() == 5
        box.add([reading(s) for s in range(1, 4)] + [reading(1, "dev-b")])
        assert box.room() == 5  # every pending reading may make room
        result = box.add([reading(4), reading(5), reading(2, "dev-b")])
        assert result.dropped == {"max_rows": 2}
        assert seqs(box) == [3, 1, 4, 5, 2]  # dev-a 1 and 2 went, oldest first
        # More: the three taken (in a batch in flight) are never dropped; the device holding
        # the most (dev-a) loses its oldest others, 5 and 6; dev-b's are kept (edge/shares.py).
        box.take(3)
        result = box.add([reading(6), reading(7)])
        assert result.dropped == {"max_rows": 2}
        assert seqs(box) == [3, 1, 4, 2, 7]
        # Nothing taken since: the next drop extends dev-a's open event (5..6 -> 5..7).
        assert box.add([reading(8)]).dropped == {"max_rows": 1}
        counts = {(d["device"], d["reason"]): d["count"] for d in box.drop_counts()}
        assert counts == {("dev-a", "max_rows"): 5}
        # Events not yet in a batch merge per (device, boot, reason) while nothing new is taken;
        # dev-a 1..2 and 5..7 stay apart (3 and 4, between them, are in flight).
        events = box.claim_drops(bseq=7)
        assert sorted((e.device, e.first_seq, e.last_seq, e.count, e.reason) for e in events) == [
            ("dev-a", 1, 2, 2, "max_rows"),
            ("dev-a", 5, 7, 3, "max_rows"),
        ]


def test_statuses_are_never_dropped_and_can_block_telemetry(tmp_path: Path) -> None:
    policy = RetentionPolicy(max_rows=4, telemetry="drop_oldest")
    with Outbox(tmp_path / "o.db", retention=policy) as box:
        box.add([reading(s) for s in range(1, 4)])
        result = box.add([], statuses=[status(f"dev-{i}") for i in range(6)])
        assert result.statuses == 6 and result.dropped == {"max_rows": 3}
        assert box.pending() == 0 and box.status_pending() == 6
        assert box.room() == 0  # nothing droppable: statuses block like the block policy
        assert len(box.take_statuses(10)) == 6


def test_claimed_drop_events_are_resent_whole_deleted_on_confirm_and_unclaimed_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    policy = RetentionPolicy(max_rows=2, telemetry="drop_oldest")
    with Outbox(path, retention=policy) as box:
        box.add([reading(s) for s in range(1, 5)])
        assert box.drops_unclaimed() == 1 and box.wait_for_rows(0.01)
        first = box.claim_drops(bseq=1)
        assert [(e.first_seq, e.last_seq, e.count) for e in first] == [(1, 2, 2)] and box.drops_unclaimed() == 0
        # More drops while batch 1 is in flight: a new event, batch 1's stays as sent.
        box.add([reading(5)])
        assert box.claim_drops(bseq=1) == first + box.claim_drops(bseq=1)[1:]
        assert [(e.first_seq, e.count) for e in box.claim_drops(bseq=1)] == [(1, 2), (3, 1)]
        box.add([reading(6)])
        assert box.drops_unclaimed() == 1
    with Outbox(path, retention=policy) as box:  # a restart: batch 1 never confirmed
        events = box.claim_drops(bseq=2)
        assert [(e.first_seq, e.last_seq, e.count) for e in events] == [(1, 2, 2), (3, 3, 1), (4, 4, 1)]
        box.delete([], drop_bseq=2)
        assert box.claim_drops(bseq=3) == [] and box.drops_unclaimed() == 0
        assert {d["reason"]: d["count"] for d in box.drop_counts()} == {"max_rows": 4}  # counts are kept


def test_byte_bound_blocks_or_drops_oldest(tmp_path: Path) -> None:
    limit = 256 * 1024
    with Outbox(tmp_path / "block.db", retention=RetentionPolicy(max_bytes=limit)) as box:
        seq = 0
        while box.room() > 0:
            room = box.room()
            box.add([reading(s, size=500) for s in range(seq + 1, seq + 1 + min(room, 50))])
            seq += min(room, 50)
        assert limit - 8192 < box.used_bytes() <= limit + 8192  # the estimate is good to a couple of pages
        assert box.pending() == seq and box.drop_totals()["max_bytes"] == 0
    policy = RetentionPolicy(max_bytes=limit, telemetry="drop_oldest")
    with Outbox(tmp_path / "drop.db", retention=policy) as box:
        for start in range(1, 2001, 100):
            box.add([reading(s, size=500) for s in range(start, start + 100)])
            assert box.used_bytes() <= limit
        kept = seqs(box)
        dropped = box.drop_totals()["max_bytes"]
        assert dropped > 1000 and len(kept) + dropped == 2000
        assert kept == list(range(2001 - len(kept), 2001))  # the newest survive, in order


def test_age_bound_expires_readings_under_either_policy(tmp_path: Path) -> None:
    for telemetry in ("block", "drop_oldest"):
        policy = RetentionPolicy(max_age_s=60, telemetry=telemetry)
        with Outbox(tmp_path / f"{telemetry}.db", retention=policy) as box:
            box.add([reading(1), reading(2)], statuses=[status("dev-s")], received_ms=1_000_000)
            box.add([reading(3)], received_ms=1_050_000)
            assert box.sweep(received_ms=1_055_000) == {}
            assert box.sweep(received_ms=1_061_000) == {"max_age": 2}
            assert seqs(box) == [3] and box.status_pending() == 1
            # A commit applies the bound too.
            assert box.add([reading(4)], received_ms=1_200_000).dropped == {"max_age": 1}
            assert [d["count"] for d in box.drop_counts()] == [3]


def test_bad_retention_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RetentionError, match="telemetry policy"):
        RetentionPolicy(telemetry="drop_newest")
    with pytest.raises(RetentionError, match="max_bytes"):
        RetentionPolicy(max_bytes=1000)
    base = {"gateway_id": "gw1", "cloud_broker": "127.0.0.1:1", "outbox_path": str(tmp_path / "o.db")}
    with pytest.raises(ValueError, match="telemetry_policy: expected one of block, drop_oldest"):
        GatewayConfig(**base, telemetry_policy="drop")
    with pytest.raises(ValueError, match="max_age_s"):
        GatewayConfig(**base, max_age_s=0)
    cfg = GatewayConfig(**base, max_bytes=1 << 20, max_age_s=3600, telemetry_policy="drop_oldest")
    assert RetentionPolicy.from_config(cfg) == RetentionPolicy(5_000_000, 1 << 20, 3600, "drop_oldest")


# --- the envelope extension and the Kafka record ----------------------------------------------


def drop_event(**changes) -> DropEvent:
    values = dict(site="s1", device="dev-a", boot="b001", reason="max_rows", first_seq=3, last_seq=9, count=7, dropped_ms=5)
    values.update(changes)
    return DropEvent(**values)


def test_drops_travel_in_the_envelope_under_a_named_extension() -> None:
    batch = Batch("gw1", 4, 10, (reading(1),), (), (drop_event(), drop_event(device="dev-b", count=2)))
    raw = codec.encode_batch(batch)
    assert codec.decode_batch(raw) == batch
    doc = json.loads(__import__("zlib").decompress(raw))
    assert doc["v"] == 1 and doc["ext"] == ["drops/1"]
    # Without drops the envelope is byte for byte what it was.
    plain = Batch("gw1", 4, 10, (reading(1),))
    assert "ext" not in json.loads(__import__("zlib").decompress(codec.encode_batch(plain)))

    def envelope(**doc_changes) -> bytes:
        d = dict(doc)
        d.update(doc_changes)
        return __import__("zlib").compress(json.dumps(d).encode())

    with pytest.raises(CodecError, match="unsupported extension 'drops/2'"):
        codec.decode_batch(envelope(ext=["drops/2"]))
    with pytest.raises(CodecError, match="without 'drops/1'"):
        codec.decode_batch(envelope(ext=[]))
    with pytest.raises(CodecError, match="do not fit"):
        codec.decode_batch(envelope(drops=[dict(doc["drops"][0], n=8)]))
    with pytest.raises(CodecError, match="'reason' must be one of"):
        codec.decode_batch(envelope(drops=[dict(doc["drops"][0], reason="bored")]))


def test_kafka_drop_record_matches_its_schema_and_keys_by_device() -> None:
    record = codec.kafka_drop_record(drop_event(), "gw1", "tern.status", 99)
    value = json.loads(record.value)
    schema = json.loads(resources.files("tern.core").joinpath("schemas/kafka-drop.schema.json").read_text())
    jsonschema.validate(value, schema)
    assert record.key == b"dev-a" and dict(record.headers)["reason"] == b"max_rows"
    assert codec.decode_kafka_drop_value(record.value)["count"] == 7
    with pytest.raises(CodecError, match="unknown schema"):
        codec.decode_kafka_drop_value(codec.kafka_status_record(status("dev-a"), "gw1", "t", 1).value)


# --- on real parts: drops reach Kafka --------------------------------------------------------


def test_dropped_readings_are_reported_in_kafka_and_statuses_survive(
    mosquitto_factory, tmp_path: Path, kafka_bootstrap: str, kafka_topics: dict[str, str], capsys, monkeypatch
) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    gw = Gateway(config(local, cloud, outbox, max_rows=10, batch_size=5, telemetry_policy="drop_oldest"))
    nodes = []
    try:
        gw.start()
        assert gw.wait_connected(20)
        # No bridge yet: the first batch waits for its confirm, everything else piles up.
        status_node = StatusNode(local, "dev-s")
        nodes.append(status_node)
        node = Node(local, "dev-a")
        nodes.append(node)
        for seq in range(1, 41):
            node.send(seq)
        wait_until(lambda: node.acked_seq() == 40, what="all 40 acked (drop_oldest never blocks)")
        wait_until(lambda: gw.stats()["nodes_online"] == 1, what="the birth committed")
        stats = gw.stats()
        assert stats["pending"] + stats["status_pending"] <= 10 and stats["status_pending"] == 1
        assert stats["dropped"] == 40 - stats["pending"] and not stats["backpressure"]
        status_node.kill()  # dies while the outbox is full: its will must still go
        wait_until(lambda: gw.stats()["status_pending"] == 2, what="the will committed")

        bridge = BridgeThread(
            bridge_config(cloud, kafka_bootstrap, kafka_topics, name="retention")
        )
        with bridge:
            wait_until(
                lambda: gw.stats()["pending"] == 0 and gw.stats()["status_pending"] == 0
                and gw.outbox.drops_unclaimed() == 0 and gw.stats()["inflight_bseq"] is None,
                what="outbox drained",
            )
            dropped_total = gw.stats()["dropped"]
    finally:
        for n in nodes:
            n.close()
        gw.stop()
    readings = read_all(kafka_bootstrap, kafka_topics["readings"], expect=40 - dropped_total)
    forwarded = sorted({r.identity[2] for r in readings})
    status_topic = read_all(kafka_bootstrap, kafka_topics["status"], expect=1)
    values = [json.loads(r.raw) for r in status_topic]
    drops = [v for v in values if v["schema"] == "tern.drop/1"]
    states = [(v["device"], v["state"]) for v in values if v["schema"] == "tern.status/1"]
    assert states == [("dev-s", "online"), ("dev-s", "offline")]
    dropped = set()
    for d in drops:
        codec.decode_kafka_drop_value(json.dumps(d).encode())
        assert (d["device"], d["boot"], d["reason"], d["site"]) == ("dev-a", BOOT, "max_rows", SITE)
        dropped |= set(range(d["first_seq"], d["last_seq"] + 1))
        assert d["count"] == d["last_seq"] - d["first_seq"] + 1
    # Every reading is accounted for exactly once: in Kafka, or reported dropped.
    assert sum(d["count"] for d in drops) == dropped_total == 40 - len(forwarded)
    assert not dropped & set(forwarded) and dropped | set(forwarded) == set(range(1, 41))
    assert [r.key for r in status_topic if json.loads(r.raw)["schema"] == "tern.drop/1"] == ["dev-a"] * len(drops)
    # `tern-bridge consume` shows them for what they are.
    from tern.cloud.cli import main as bridge_cli

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "200")  # one table row per record, unwrapped
    assert bridge_cli(["consume", "--kafka", kafka_bootstrap, "--topic", kafka_topics["status"], "--timeout", "15",
                       "--from-beginning"]) == 0
    out = capsys.readouterr().out
    assert "dropped (max_rows)" in out and "unknown schema" not in out


# --- priorities: a status event overtakes the backlog --------------------------------------


class BatchSpy:
    """A plain subscriber on the cloud broker's batch topic: every envelope, decoded, in order."""

    def __init__(self, broker, gateway: str) -> None:
        from tern.core import topics

        self.batches: list[Batch] = []
        subscribed = __import__("threading").Event()
        self.client = new_client()
        self.client.on_connect = lambda c, *a: c.subscribe(topics.batch_topic(gateway), qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, msg: self.batches.append(codec.decode_batch(msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(20), "spy could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_node_dying_behind_a_50000_reading_backlog_is_reported_within_one_batch(
    mosquitto_factory, tmp_path: Path, kafka_bootstrap: str, kafka_topics: dict[str, str]
) -> None:
    backlog = 50_000
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    with Outbox(outbox) as box:  # the outage: 50,000 readings waiting, oldest first
        for start in range(1, backlog + 1, 1000):
            box.add([reading(s, device=f"dev-{s % 10}") for s in range(start, start + 1000)])
        assert box.pending() == backlog
    status_node = StatusNode(local, "dev-dies")
    spy = BatchSpy(cloud, "gw1")
    bridge = BridgeThread(
        bridge_config(cloud, kafka_bootstrap, kafka_topics, name="priority")
    )
    try:
        # The drain held to 10,000 readings/s (statuses are never held back by the rate limit):
        # the backlog takes seconds to leave, so the will's overtaking does not hang on how fast
        # this machine drains in the instant between the kill and the will's commit.
        with bridge, Gateway(config(local, cloud, outbox, batch_size=200, uplink_rate_limit="10000 readings/s")) as gw:
            assert gw.wait_connected(20)
            wait_until(lambda: gw.stats()["status_forwarded"] >= 1, what="the birth forwarded")
            wait_until(lambda: gw.stats()["batches_confirmed"] >= 3, what="the backlog flowing")
            status_node.kill()  # the node dies now, deep in the backlog
            wait_until(lambda: gw.stats()["status_forwarded"] == 2, what="the will forwarded")
            # The rest of the backlog follows the will on the wire, before the gateway stops.
            wait_until(lambda: gw.stats()["pending"] == 0, timeout=60, what="the backlog drained")
        records = read_all(kafka_bootstrap, kafka_topics["status"], expect=2)
    finally:
        spy.close()
        status_node.close()
    assert [(json.loads(r.raw)["device"], json.loads(r.raw)["state"]) for r in records] == [
        ("dev-dies", "online"), ("dev-dies", "offline")
    ]
    # Which batch carried the will: the first one encoded after the gateway committed it. Status
    # events never wait behind the backlog or a busy lane: each batch takes the statuses due
    # just before it is encoded (under the outbox lock, which the commit holds while it stamps
    # the will's received_ms), and this device had nothing else in flight (its birth was
    # confirmed). One race is allowed: the uplink thread is single, so at most one batch can have
    # taken its statuses in the instant before the commit and read the clock for its sent_ms
    # just after the commit stamped the will (seen: the same millisecond; a few more if the thread
    # is preempted between the two, hence the bound below); that batch may precede the carrier,
    # no other may. bseqs are handed out in encoding order.
    will = next(e for b in spy.batches for e in b.statuses if e.state == "offline")
    after = sorted({b.bseq for b in spy.batches if b.sent_ms >= will.received_ms})
    carrier = next(b.bseq for b in spy.batches if will in b.statuses)
    assert carrier in after[:2], (carrier, after[:3])
    if carrier != after[0]:
        first = next(b for b in spy.batches if b.bseq == after[0])
        assert first.sent_ms - will.received_ms < 250, "a batch encoded well after the will did not carry it"
    # And it overtook the backlog: readings committed long before the will left after it,
    # counted on the wire (at 10,000 readings/s, most of the backlog).
    behind = {r.identity for b in spy.batches if b.bseq > carrier for r in b.readings}
    assert len(behind) >= backlog // 10, f"only {len(behind)} backlog readings left after the will: no overtaking shown"


# --- a full disk, and the MQTT sessions while acks are withheld -----------------------------


def bridge_for(cloud, kafka_bootstrap: str, kafka_topics: dict[str, str], name: str) -> BridgeThread:
    return BridgeThread(
        bridge_config(cloud, kafka_bootstrap, kafka_topics, name=name)
    )


def test_disk_full_stops_acking_logs_one_line_and_recovers_losing_nothing(
    mosquitto_factory, tmp_path: Path, kafka_bootstrap: str, kafka_topics: dict[str, str], caplog
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="tern.edge.ingest")
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    total = 400
    with Gateway(config(local, cloud, outbox)) as gw:
        assert gw.wait_connected(20)
        node = Node(local, "dev-a")
        try:
            for seq in range(1, 11):
                node.send(seq)
            wait_until(lambda: node.acked_seq() == 10, what="10 acked before the disk fills")
            # The disk fills: a few pages left, then every write that needs one fails with SQLITE_FULL.
            gw.outbox.limit_pages(gw.outbox.page_count() + 4)
            for seq in range(11, total + 1):
                node.send(seq)
            wait_until(lambda: gw.stats()["disk_full"], what="ingest noticing the full disk")
            wait_until(lambda: gw.stats()["disk_full_retries"] >= 4, what="4 retries on the full disk")
            acked_while_full = node.acked_seq()
            assert 10 <= acked_while_full < total and gw.stats()["held"] > 0
            time.sleep(0.1)
            assert node.acked_seq() == acked_while_full  # not acking
            full_lines = [r for r in caplog.records if "disk full" in r.getMessage()]
            assert len(full_lines) == 1, [r.getMessage() for r in full_lines]
            message = full_lines[0].getMessage()
            assert str(outbox) in message and "not acking" in message and "\n" not in message
            assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
            committed_rows = gw.stats()["pending"]

            gw.outbox.limit_pages(None)  # space returns
            wait_until(lambda: node.acked_seq() == total, what="every reading acked once space returned")
            assert not gw.stats()["disk_full"] and gw.stats()["disk_full_events"] == 1
            assert any("writable again" in r.getMessage() for r in caplog.records)
            assert committed_rows == acked_while_full  # what was acked was committed, nothing more
            with bridge_for(cloud, kafka_bootstrap, kafka_topics, "diskfull"):
                wait_until(lambda: gw.stats()["forwarded"] == total, what="everything forwarded")
        finally:
            node.close()
    records = read_all(kafka_bootstrap, kafka_topics["readings"], expect=total)
    assert sorted({r.identity[2] for r in records}) == list(range(1, total + 1))


@pytest.mark.slow
def test_pings_are_answered_while_acks_are_withheld(mosquitto_factory, tmp_path: Path) -> None:
    """Many keep-alive periods of a full disk, then of a full outbox (block): the brokers never
    drop the gateway's connections, and once acking resumes nothing is lost."""
    keepalive = 5  # mosquitto drops a client silent for 1.5 x this
    total = 100
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"

    def hold(seconds: float, condition: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert gw.stats()[condition] and gw.ingest.connected and gw.uplink.connected
            time.sleep(0.2)

    with Gateway(config(local, cloud, outbox, max_rows=60, keepalive_s=keepalive)) as gw:
        assert gw.wait_connected(20)
        generations = (gw.ingest.session.generation, gw.uplink.session.generation)
        # No room for a new page: the first page split (~30 of these rows) hits SQLITE_FULL.
        gw.outbox.limit_pages(gw.outbox.page_count())
        node = Node(local, "dev-a")
        try:
            for seq in range(1, total + 1):
                reading = Reading("dev-a", BOOT, seq, 1_700_000_000_000 + seq, {"n": seq, "pad": "x" * 60})
                node.publish_raw(f"tern/{SITE}/dev-a/telemetry", codec.encode_reading(reading))
                if seq == 10:  # a first group fits before the page split (groups wait to fill)
                    wait_until(lambda: node.acked_seq() == 10, what="the first readings acked")
            wait_until(lambda: gw.stats()["disk_full"], what="the full disk")
            hold(2 * keepalive, "disk_full")
            acked = node.acked_seq()
            assert 0 < acked < 60, acked
            gw.outbox.limit_pages(None)  # space returns; the outbox fills up to max_rows
            wait_until(lambda: gw.stats()["backpressure"] and not gw.stats()["disk_full"], what="the outbox full")
            hold(2 * keepalive, "backpressure")
            assert node.acked_seq() < total
            assert (gw.ingest.session.generation, gw.uplink.session.generation) == generations
            bridge = BridgeStub(cloud)
            try:
                wait_until(lambda: node.acked_seq() == total, what="acking resumed")
                wait_until(lambda: len({r.seq for r in bridge.delivered()}) == total, what="everything forwarded")
            finally:
                bridge.close()
            assert (gw.ingest.session.generation, gw.uplink.session.generation) == generations
        finally:
            node.close()
    local.stop()  # mosquitto flushes its log at exit
    cloud.stop()
    logs = local.log_path.read_text() + cloud.log_path.read_text()
    assert "exceeded timeout" not in logs, "a broker dropped a client for missed pings"
    for client_id in ("tern-gw-gw1-ingest", "tern-gw-gw1-uplink"):
        assert logs.count(f" as {client_id} ") == 1, f"{client_id} did not connect exactly once"


# --- the uplink rate limit ------------------------------------------------------------------


def test_token_bucket_holds_the_rate_over_time() -> None:
    import threading

    from tern.edge.ratelimit import RateLimitError, TokenBucket, parse_rate

    assert str(parse_rate("500 readings/s")) == "500 readings/s"
    assert parse_rate("20 kB/s").per_second == 20_000 and parse_rate("1.5 MB/s").unit == "bytes"
    for bad in ("fast", "0 readings/s", "-3 bytes/s", "10 packets/s", ""):
        with pytest.raises(RateLimitError):
            parse_rate(bad)
    now = [0.0]
    bucket = TokenBucket(parse_rate("100 readings/s"), clock=lambda: now[0])
    assert bucket.delay() == 0
    bucket.take(250)  # a batch bigger than the bucket goes, and puts it in debt
    assert bucket.delay() == pytest.approx(1.5)
    now[0] += 1.0
    assert bucket.delay() == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.delay() == 0
    stop = threading.Event()
    stop.set()
    bucket.take(1)
    assert bucket.acquire(1, stop) is False  # a stopping uplink does not wait


def test_uplink_rate_limit_paces_a_returning_backlog(mosquitto_factory, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uplink_rate_limit"):
        GatewayConfig(gateway_id="gw1", cloud_broker="127.0.0.1:1", outbox_path=str(tmp_path / "x.db"), uplink_rate_limit="lots")
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    with Outbox(outbox) as box:  # back from an outage with 600 readings
        box.add([reading(s) for s in range(1, 601)])
    bridge = BridgeStub(cloud)
    try:
        with Gateway(config(local, cloud, outbox, batch_size=50, uplink_rate_limit="200 readings/s")) as gw:
            started = time.monotonic()
            wait_until(lambda: gw.stats()["pending"] == 0, timeout=60, what="the backlog drained")
            elapsed = time.monotonic() - started
            stats = gw.stats()
    finally:
        bridge.close()
    # 600 readings at 200/s with one second's burst: at least (600 - 200 - 50) / 200 s.
    assert elapsed >= 1.7, f"drained in {elapsed:.2f} s: the limit did not hold"
    assert stats["rate_limit"] == "200 readings/s" and stats["rate_limited_s"] > 1.0
    assert stats["rate_limit_sent"] >= 600
    assert sorted(r.seq for r in bridge.delivered()) == list(range(1, 601))


def test_readings_expire_by_age_on_an_idle_gateway_and_the_drop_alone_makes_a_batch(mosquitto_factory, tmp_path: Path) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    bridge = BridgeStub(cloud, confirm=False)
    try:
        with Gateway(config(local, cloud, tmp_path / "gw" / "o.db", batch_size=2, max_age_s=1)) as gw:
            assert gw.wait_connected(20)
            node = Node(local, "dev-a")
            try:
                for seq in range(1, 7):
                    node.send(seq)
                wait_until(lambda: node.acked_seq() == 6, what="all acked")
                # Nothing more arrives; the readings not in the batch in flight expire.
                wait_until(lambda: gw.stats()["dropped"] > 0 and gw.stats()["pending"] <= 2, what="expiry while idle")
                bridge.start_confirming()
                wait_until(lambda: any(b.drops for b in bridge.batches) and gw.outbox.drops_unclaimed() == 0
                           and gw.stats()["pending"] == 0 and gw.stats()["inflight_bseq"] is None, what="the drops sent")
            finally:
                node.close()
    finally:
        bridge.close()
    delivered = {r.seq for r in bridge.delivered()}
    drops = [d for b in bridge.batches if b.bseq in bridge.confirmed for d in b.drops]
    assert {d.reason for d in drops} == {"max_age"} and all(d.device == "dev-a" for d in drops)
    dropped = {s for d in drops for s in range(d.first_seq, d.last_seq + 1)}
    assert delivered | dropped == set(range(1, 7)) and not delivered & dropped
    assert any(b.drops and not b.readings and not b.statuses for b in bridge.batches)  # a batch of drops alone


# --- every reading accounted for exactly once (property test) -------------------------------

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402


class RetentionMachine(RuleBasedStateMachine):
    """Ingest (respecting room), an uplink taking, confirming and claiming drops, restarts and
    statuses, under drop_oldest with a row bound and a byte-free policy: every reading ever
    committed is pending, forwarded, or inside exactly one confirmed-or-pending drop event."""

    MAX_ROWS = 12

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "o.db"
        self.policy = RetentionPolicy(max_rows=self.MAX_ROWS, telemetry="drop_oldest")
        self.box = Outbox(self.path, retention=self.policy)
        self.next_seq = {"dev-a": 1, "dev-b": 1}
        self.committed: set[tuple[str, int]] = set()
        self.forwarded: set[tuple[str, int]] = set()
        self.reported: list[DropEvent] = []  # drop events of confirmed batches
        self.inflight: tuple[list[int], list[tuple[str, int]], list[int], int] | None = None
        self.bseq = 0

    @rule(devices=st.lists(st.sampled_from(["dev-a", "dev-b"]), min_size=1, max_size=8), statuses=st.integers(0, 2))
    def ingest(self, devices: list[str], statuses: int) -> None:
        room = self.box.room()
        batch = []
        for device in devices[: max(0, room - statuses)]:
            batch.append(reading(self.next_seq[device], device))
            self.next_seq[device] += 1
        events = [status(f"dev-s{self.bseq}-{i}", "online" if i % 2 else "offline") for i in range(min(statuses, room))]
        result = self.box.add(batch, statuses=events)
        assert result.inserted == len(batch)
        self.committed |= {(r.device, r.seq) for r in batch}

    @precondition(lambda self: self.inflight is None)
    @rule(limit=st.integers(1, 6))
    def take(self, limit: int) -> None:
        rows = self.box.take(limit)
        statuses = self.box.take_statuses(3)
        self.bseq = self.box.next_bseq()
        self.box.claim_drops(self.bseq)
        self.inflight = ([r.id for r in rows], [(r.reading.device, r.reading.seq) for r in rows], [s.id for s in statuses], self.bseq)

    @precondition(lambda self: self.inflight is not None)
    @rule()
    def confirm(self) -> None:
        ids, identities, status_ids, bseq = self.inflight
        drops = self.box.claim_drops(bseq)  # what the (re-sent) batch carries
        assert self.box.delete(ids, status_ids, drop_bseq=bseq) == len(ids)
        self.forwarded |= set(identities)
        self.reported += drops
        self.inflight = None

    @rule()
    def restart(self) -> None:
        self.box.close()
        self.box = Outbox(self.path, retention=self.policy)
        self.inflight = None  # the batch was never confirmed: its rows and drops go again

    def pending_identities(self) -> set[tuple[str, int]]:
        return {(d, s) for d, s in self.box.db.execute("SELECT device, seq FROM outbox")}

    @invariant()
    def bound_holds(self) -> None:
        assert self.box.pending() + self.box.status_pending() <= self.MAX_ROWS

    @invariant()
    def every_reading_accounted_for_once(self) -> None:
        pending = self.pending_identities()
        open_events = [DropEvent(*row) for row in self.box.db.execute(
            "SELECT site, device, boot, reason, first_seq, last_seq, count, dropped_ms FROM drop_events")]
        dropped: list[tuple[str, int]] = []
        for event in self.reported + open_events:
            inside = [(event.device, s) for s in range(event.first_seq, event.last_seq + 1)]
            assert all(i in self.committed for i in inside), "a drop range covers a reading never committed"
            assert len(inside) == event.count
            dropped += inside
        assert len(dropped) == len(set(dropped)), "a reading reported dropped twice"
        assert not set(dropped) & self.forwarded and not set(dropped) & pending and not pending & self.forwarded
        assert pending | self.forwarded | set(dropped) == self.committed
        totals = sum(d["count"] for d in self.box.drop_counts())
        assert totals == len(dropped)

    def teardown(self) -> None:
        self.box.close()
        self.dir.cleanup()


RetentionMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_retention_accounting = RetentionMachine.TestCase

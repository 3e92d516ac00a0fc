"""The cloud bridge against a real mosquitto and a real Kafka-protocol broker (Tansu or $KAFKA_BOOTSTRAP).

The test plays the gateway: a paho client publishes batch envelopes on the cloud broker and
waits for the bridge's confirms; what the bridge wrote is read back from Kafka.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import threading
import time
from collections import defaultdict

import pytest

from tern.cloud.bridge import BridgeError, BridgeThread
from tern.cloud.cli import main as cli_main
from tern.cloud.config import BridgeConfig
from tern.cloud.consume import ConsumedRecord, read_all
from tern.core import codec, topics
from tern.core.errors import ConfigError
from tern.harness.stack import ensure_topics, free_port

import helpers
from helpers import make_batch

BOOT = helpers.BATCH_BOOT  # the boot of make_batch's readings

#: Bridges here give up connecting after 10 s.
bridge_config = functools.partial(helpers.bridge_config, connect_timeout_s=10)


# --- helpers ---------------------------------------------------------------------------


def assert_per_device_order(records: list[ConsumedRecord]) -> None:
    """Each device's records sit in one partition and its seqs never go backwards there
    (first occurrences; a retried batch may repeat records, which consumers de-duplicate)."""
    by_device: dict[str, list[ConsumedRecord]] = defaultdict(list)
    for rec in records:
        by_device[rec.key].append(rec)
    for device, recs in by_device.items():
        assert len({r.partition for r in recs}) == 1, f"{device} spread over partitions"
        seen: set[int] = set()
        first = []
        for rec in sorted(recs, key=lambda r: r.offset):
            if rec.value["seq"] not in seen:
                seen.add(rec.value["seq"])
                first.append(rec.value["seq"])
        assert first == sorted(first), f"{device} out of order: {first}"


def check_reading_record(rec: ConsumedRecord, gateway: str) -> None:
    assert rec.value is not None, rec.decode_error
    assert rec.key == rec.value["device"]
    assert rec.headers["device"] == rec.value["device"].encode()
    assert rec.headers["gateway"] == gateway.encode() == rec.value["gateway"].encode()
    assert rec.headers["boot"] == rec.value["boot"].encode() == BOOT.encode()
    assert rec.headers["seq"] == str(rec.value["seq"]).encode()


# --- the happy path ------------------------------------------------------------------


def test_batches_land_in_kafka_keyed_ordered_then_confirmed(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    devices = ["dev-a", "dev-b", "dev-c", "dev-d"]
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics)) as bridge:
        gw = gateway_factory(mosquitto, "gw1")

        # Confirm only after the records are in Kafka: the moment batch 1 is confirmed,
        # a reader sees all of its records.
        gw.publish(make_batch("gw1", 1, devices, per_device=5, first_seq=0))
        gw.wait_confirms([1], timeout=15)
        first = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10)
        assert len(first) == 20

        for bseq in range(2, 11):
            gw.publish(make_batch("gw1", bseq, devices, per_device=5, first_seq=(bseq - 1) * 5))
        gw.wait_confirms(range(1, 11), timeout=20)
        stats = bridge.stats()

    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10)
    # Nothing failed in this run, so nothing was retried: exactly once.
    assert len(records) == 200
    assert sorted(r.identity for r in records) == sorted((d, BOOT, s) for d in devices for s in range(50))
    for rec in records:
        check_reading_record(rec, "gw1")
    assert_per_device_order(records)
    assert all(c.count == 20 and c.gateway == "gw1" for cs in gw.confirms.values() for c in cs)
    assert stats["matched"] == stats["batches_received"] == 10
    assert stats["records_written"] == 200
    assert stats["batches_confirmed"] == 10
    assert stats["inflight"] == 0 and stats["deadlettered"] == 0


def test_a_resent_batch_is_confirmed_again_and_not_written_twice(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    """The gateway re-sends a batch whose confirm it has not seen: same bseq, same bytes. The
    bridge remembers what it wrote, confirms the copy again, writes nothing and counts it."""
    devices = ["dev-a", "dev-b"]
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics, max_inflight_records=50)) as bridge:
        gw = gateway_factory(mosquitto, "gw9")
        batches = [make_batch("gw9", bseq, devices, per_device=10, first_seq=(bseq - 1) * 10) for bseq in range(1, 6)]
        payloads = [codec.encode_batch(b) for b in batches]
        for payload in payloads:
            gw.publish_raw(topics.batch_topic("gw9"), payload)
        # Copies: some while the first is still being written, some after.
        for payload in payloads[:3]:
            gw.publish_raw(topics.batch_topic("gw9"), payload)
        gw.wait_confirms(range(1, 6), timeout=20)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum(len(c) for c in gw.confirms.values()) < 8:
            time.sleep(0.05)
        # The same bseq with other content (a gateway whose outbox was recreated) is not a copy.
        other = make_batch("gw9", 1, ["dev-c"], per_device=2, first_seq=0)
        gw.publish(other)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(gw.confirms[1]) < 3:
            time.sleep(0.05)
        stats = bridge.stats()
    assert [len(gw.confirms[b]) for b in range(1, 6)] == [3, 2, 2, 1, 1]
    assert stats["duplicates_received"] == 3 and stats["records_written"] == 100 + 2, stats
    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10, expect=102)
    assert sorted(r.identity for r in records) == sorted(
        [(d, BOOT, s) for d in devices for s in range(50)] + [("dev-c", BOOT, 0), ("dev-c", BOOT, 1)]
    )
    assert_per_device_order(records)


def test_status_events_land_in_the_status_topic_keyed_by_device(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    """Status events travel in the batch with the readings; the confirm means Kafka holds both."""
    births = [codec.StatusEvent("site1", dev, "online", BOOT, fw="0.1.0", reset="PWRON_RESET", received_ms=11)
              for dev in ("dev-a", "dev-b")]
    will = codec.StatusEvent("site1", "dev-a", "offline", BOOT, received_ms=12)
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics)) as bridge:
        gw = gateway_factory(mosquitto, "gw6")
        with_readings = make_batch("gw6", 1, ["dev-a"], per_device=2, first_seq=0)
        gw.publish(codec.Batch("gw6", 1, with_readings.sent_ms, with_readings.readings, tuple(births)))
        gw.wait_confirms([1], timeout=15)
        # Confirmed means in Kafka: both topics can be read at once, no waiting.
        statuses = read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=10)
        assert len(statuses) == 2
        gw.publish(codec.Batch("gw6", 2, 1, (), (will,)))  # a batch of a status event alone
        gw.wait_confirms([2], timeout=15)
        stats = bridge.stats()

    statuses = read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=10, expect=3)
    values = [codec.decode_kafka_status_value(r.raw) for r in statuses]
    assert sorted((v["device"], v["state"]) for v in values) == [("dev-a", "offline"), ("dev-a", "online"), ("dev-b", "online")]
    for rec, value in zip(statuses, values):
        assert rec.key == value["device"]
        assert rec.headers == {
            "device": value["device"].encode(),
            "gateway": b"gw6",
            "boot": BOOT.encode(),
            "state": value["state"].encode(),
        }
        assert value["gateway"] == "gw6" and value["site"] == "site1" and value["bridge_ms"] > 0
    # A device's statuses stay in order in one partition.
    dev_a = sorted((r for r in statuses if r.key == "dev-a"), key=lambda r: r.offset)
    assert len({r.partition for r in dev_a}) == 1
    assert [codec.decode_kafka_status_value(r.raw)["state"] for r in dev_a] == ["online", "offline"]
    assert codec.decode_kafka_status_value(dev_a[0].raw)["fw"] == "0.1.0"
    assert codec.decode_kafka_status_value(dev_a[1].raw)["gateway_rx_ms"] == 12
    # Readings went to the readings topic only, and n in the confirm counts readings.
    readings = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10, expect=2)
    assert sorted(r.identity for r in readings) == [("dev-a", BOOT, 0), ("dev-a", BOOT, 1)]
    assert [c.count for c in gw.confirms[1]] == [2] and [c.count for c in gw.confirms[2]] == [0]
    assert stats["records_written"] == 2 and stats["status_written"] == 3 and stats["batches_confirmed"] == 2


def test_hold_events_land_in_the_status_topic_as_holds_not_losses(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    """holds/1: each hold event becomes one tern.hold/1 record on the status topic, keyed by device,
    in the batch's one Kafka write; a re-sent copy is not written again."""
    holds = (codec.HoldEvent("site1", "runaway", BOOT, "share", 4500, 15_501, 100, 200),
             codec.HoldEvent("site1", "runaway", BOOT, "rate", 30, 0, 50, 250, lifted=True))
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics)) as bridge:
        gw = gateway_factory(mosquitto, "gw7")
        batch = make_batch("gw7", 1, ["good"], per_device=2, first_seq=0)
        batch = codec.Batch("gw7", 1, batch.sent_ms, batch.readings, holds=holds)
        payload = codec.encode_batch(batch)
        gw.publish_raw(topics.batch_topic("gw7"), payload)
        gw.wait_confirms([1], timeout=15)
        gw.publish_raw(topics.batch_topic("gw7"), payload)  # a re-send: confirmed again, not written again
        helpers.wait_until(lambda: len(gw.confirms[1]) == 2, what="the copy confirmed", timeout=15)
        stats = bridge.stats()
    records = read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=10)
    values = [codec.decode_kafka_hold_value(r.raw) for r in records]
    assert [(v["reason"], v["count"], v["lifted"], v["first_seq"], v["held_since_ms"], v["updated_ms"]) for v in values] == [
        ("share", 15_501, False, 4500, 100, 200), ("rate", 0, True, 30, 50, 250)]
    assert all(r.key == "runaway" and r.headers["reason"] == v["reason"].encode() for r, v in zip(records, values))
    assert {v["gateway"] for v in values} == {"gw7"} and stats["holds_written"] == 2
    assert sorted(r.identity for r in read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10)) == [
        ("good", BOOT, 0), ("good", BOOT, 1)]


# --- poison input --------------------------------------------------------------------


def test_poison_is_deadlettered_and_the_bridge_keeps_going(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    mismatched = codec.encode_batch(make_batch("other-gw", 7, ["dev-x"], 1, 0))
    poison = [
        (topics.batch_topic("gw2"), b"not zlib at all"),
        # a valid envelope, but from another gateway than the topic says
        (topics.batch_topic("gw2"), mismatched),
        # the topic's gateway id is not a valid id
        ("tern-gw/-bad-/batch", codec.encode_batch(make_batch("gw2", 8, ["dev-x"], 1, 0))),
        # over the 1 MiB envelope limit (and over Kafka's default record limit)
        (topics.batch_topic("gw2"), os.urandom(codec.MAX_BATCH_BYTES + 1)),
    ]
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics)) as bridge:
        gw = gateway_factory(mosquitto, "gw2")
        for topic, payload in poison:
            gw.publish_raw(topic, payload)
        gw.publish(make_batch("gw2", 1, ["dev-y"], per_device=3, first_seq=0))
        gw.wait_confirms([1], timeout=15)
        # Batches are written concurrently and a confirm leaves as soon as its own batch is in
        # Kafka: the dead-letter writes received before it may still be settling.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (bridge.stats()["deadlettered"] < 4 or bridge.stats()["inflight"]):
            time.sleep(0.05)
        stats = bridge.stats()

    dead = read_all(kafka_bootstrap, kafka_topics["deadletter"], timeout_s=10, expect=4)
    assert len(dead) == 4
    limit = BridgeConfig().deadletter_max_bytes
    assert sorted((r.headers["source_topic"], r.raw) for r in dead) == sorted((t.encode(), p[:limit]) for t, p in poison)
    big = next(r for r in dead if len(r.raw) == limit)
    assert big.headers["truncated"] == b"1"
    assert big.headers["original_bytes"] == str(codec.MAX_BATCH_BYTES + 1).encode()
    assert big.headers["original_sha256"] == hashlib.sha256(poison[-1][1]).hexdigest().encode()
    for rec in dead:
        assert rec.headers["error"]
        assert rec.headers["mqtt_qos"] == b"1"
        assert rec.headers["mqtt_retain"] == b"0"
        assert rec.headers["mqtt_dup"] in (b"0", b"1")
        assert int(rec.headers["mqtt_mid"]) > 0
        assert abs(int(rec.headers["received_ms"]) - time.time() * 1000) < 120_000
    assert b"other-gw" in next(r for r in dead if r.raw == mismatched).headers["error"]
    good = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10, expect=3)
    assert sorted(r.value["seq"] for r in good) == [0, 1, 2]
    assert set(gw.confirms) == {1}  # poison is never confirmed
    assert stats["deadlettered"] == 4 and stats["batches_confirmed"] == 1
    assert stats["inflight"] == 0  # poison was acknowledged (PUBACK) after the dead-letter write


# --- Kafka outages -------------------------------------------------------------------


def test_kafka_outage_holds_the_puback_and_confirm(mosquitto, proxied_kafka, gateway_factory):
    """Blackholed and refused Kafka: no confirm, no PUBACK; after the outage every record
    arrives exactly once (nothing reached Kafka during the outage, so the retry is the
    only copy; in general the bridge guarantees at-least-once)."""
    proxy, bootstrap = proxied_kafka
    names = {"readings": "out.readings", "status": "out.status", "deadletter": "out.deadletter"}
    asyncio.run(ensure_topics(bootstrap, list(names.values())))
    config = bridge_config(
        mosquitto, bootstrap, names, request_timeout_ms=2000, retry_initial_s=0.5, retry_max_s=1.0
    )
    gw = gateway_factory(mosquitto, "gw3")
    devs = ["dev-1", "dev-2"]

    bridge = BridgeThread(config).start()
    try:
        gw.publish(make_batch("gw3", 1, devs, 2, 0))
        gw.wait_confirms([1], timeout=15)

        # Hang-style outage: connections stay open, bytes vanish.
        proxy.set_mode("blackhole")
        gw.publish(make_batch("gw3", 2, devs, 2, 2))
        gw.assert_no_confirm(2, within=4)
        deadline = time.monotonic() + 10  # request_timeout_ms=2000: a failed attempt is due
        while bridge.stats()["kafka_failures"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = bridge.stats()
        assert stats["kafka_failures"] >= 1, stats
        assert stats["inflight"] == 1 and stats["oldest_unacked_age_s"] > 3, stats  # held, not acknowledged
        proxy.set_mode("pass")
        gw.wait_confirms([2], timeout=20)

        # Refused connections.
        proxy.set_mode("refuse")
        gw.publish(make_batch("gw3", 3, devs, 2, 4))
        gw.assert_no_confirm(3, within=3)
        proxy.set_mode("pass")
        gw.wait_confirms([3], timeout=20)

        # Outage, then the bridge stops: the batch was never PUBACKed, so the broker
        # redelivers it to the next bridge with the same name.
        proxy.set_mode("blackhole")
        gw.publish(make_batch("gw3", 4, devs, 2, 6))
        gw.assert_no_confirm(4, within=3)
        t0 = time.monotonic()
        bridge.stop(timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        bridge.stop(timeout=10)
    assert 4 not in gw.confirms
    proxy.set_mode("pass")
    with BridgeThread(config) as second:
        gw.wait_confirms([4], timeout=20)
        assert second.stats()["matched"] >= 1

    records = read_all(bootstrap, names["readings"], timeout_s=10)
    counts = defaultdict(int)
    for rec in records:
        counts[rec.identity] += 1
    assert counts == {(d, BOOT, s): 1 for d in devs for s in range(8)}, counts
    assert_per_device_order(records)


def test_bridge_startup_fails_cleanly_without_kafka(mosquitto):
    dead_port = free_port()
    config = BridgeConfig(name="nokafka", mqtt_broker=mosquitto.address, kafka_bootstrap=f"127.0.0.1:{dead_port}", connect_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="Kafka"):
        BridgeThread(config).start()
    assert time.monotonic() - t0 < 10


def test_bridge_startup_fails_cleanly_without_mqtt(kafka_bootstrap, kafka_topics):
    config = BridgeConfig(
        name="nomqtt",
        mqtt_broker=f"127.0.0.1:{free_port()}",
        kafka_bootstrap=kafka_bootstrap,
        readings_topic=kafka_topics["readings"],
        status_topic=kafka_topics["status"],
        deadletter_topic=kafka_topics["deadletter"],
        connect_timeout_s=2,
    )
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="MQTT"):
        BridgeThread(config).start()
    assert time.monotonic() - t0 < 10


# --- restart mid-stream --------------------------------------------------------------


def test_bridge_restart_mid_stream_loses_nothing(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    """Stop the bridge while batches flow and keep publishing; the next bridge with the same
    name gets the unacknowledged and the queued batches from its persistent session."""
    devices = [f"dev-{i}" for i in range(5)]
    total = 60
    config = bridge_config(mosquitto, kafka_bootstrap, kafka_topics)
    gw = gateway_factory(mosquitto, "gw4")
    publisher_error: list[BaseException] = []

    def publish_all() -> None:
        try:
            for bseq in range(1, total + 1):
                gw.publish(make_batch("gw4", bseq, devices, per_device=4, first_seq=(bseq - 1) * 4))
                time.sleep(0.01)  # a steady stream, so the stop lands mid-stream
        except BaseException as exc:  # reported to the test thread
            publisher_error.append(exc)

    first = BridgeThread(config).start()
    publisher = threading.Thread(target=publish_all)
    try:
        publisher.start()
        gw.wait_confirms([5], timeout=15)
    finally:
        first.stop(timeout=10)
    stopped_at = first.stats()["batches_confirmed"]  # exact: confirms still on the wire are counted
    publisher.join(30)
    assert not publisher.is_alive() and not publisher_error, publisher_error
    assert stopped_at < total, "the stop did not land mid-stream"

    with BridgeThread(config) as second:
        gw.wait_confirms(range(1, total + 1), timeout=30)
        second_stats = second.stats()

    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=15)
    identities = [r.identity for r in records]
    expected = {(d, BOOT, s) for d in devices for s in range(total * 4)}
    assert set(identities) == expected  # at-least-once: nothing missing
    duplicates = len(identities) - len(expected)
    assert duplicates >= 0
    for rec in records:
        check_reading_record(rec, "gw4")
    assert_per_device_order(records)
    assert second_stats["matched"] >= total - stopped_at


def test_bridge_rides_out_a_broker_restart(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    """The cloud broker restarts while batches are in the bridge's hands: the bridge
    reconnects, resubscribes, gets the unacknowledged batches again and confirms them all."""
    devices = ["dev-r1", "dev-r2"]
    gw = gateway_factory(mosquitto, "gw5", persistent=True)
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics)) as bridge:
        for bseq in range(1, 31):
            gw.publish(make_batch("gw5", bseq, devices, per_device=3, first_seq=(bseq - 1) * 3))
        mosquitto.stop()  # graceful: mosquitto persists sessions and queued messages
        mosquitto.start()
        for bseq in range(31, 41):
            deadline = time.monotonic() + 15
            while True:  # the gateway's client reconnects on its own; retry until it has
                try:
                    gw.publish(make_batch("gw5", bseq, devices, per_device=3, first_seq=(bseq - 1) * 3))
                    break
                except (AssertionError, RuntimeError, ValueError):
                    assert time.monotonic() < deadline, "gateway could not publish after the broker restart"
                    time.sleep(0.2)
        gw.wait_confirms(range(1, 41), timeout=30)
        stats = bridge.stats()
    assert stats["mqtt_connects"] >= 2, stats
    records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=15)
    assert {r.identity for r in records} == {(d, BOOT, s) for d in devices for s in range(120)}
    assert_per_device_order(records)


# --- configuration and CLI -------------------------------------------------------------


def test_config_validation_and_env():
    with pytest.raises(ConfigError, match="mqtt_broker"):
        BridgeConfig(mqtt_broker="127.0.0.1:99999")
    with pytest.raises(ConfigError, match="kafka_bootstrap"):
        BridgeConfig(kafka_bootstrap="a:1,b:notaport")
    with pytest.raises(ConfigError, match="readings_topic"):
        BridgeConfig(readings_topic="bad topic")
    with pytest.raises(ConfigError, match="name"):
        BridgeConfig(name="has/slash")
    with pytest.raises(ConfigError, match="status_topic"):
        BridgeConfig(status_topic="bad topic")
    with pytest.raises(ConfigError, match="status_topic must differ"):
        BridgeConfig(status_topic=topics.KAFKA_READINGS)
    assert BridgeConfig().status_topic == topics.KAFKA_STATUS == "tern.status"
    assert BridgeConfig.from_env({"TERN_KAFKA_STATUS_TOPIC": "x.status"}).status_topic == "x.status"
    config = BridgeConfig.from_env(
        {"TERN_CLOUD_BROKER": "127.0.0.1:1884", "KAFKA_BOOTSTRAP": "127.0.0.1:9093", "TERN_KAFKA_TOPIC": "x.readings"},
        name="n1",
    )
    assert (config.mqtt_address, config.kafka_servers, config.readings_topic) == (("127.0.0.1", 1884), ["127.0.0.1:9093"], "x.readings")
    assert config.client_id == "tern-bridge-n1" and config.enable_idempotence is False
    # Scale-out and pipelining settings.
    assert BridgeConfig().batch_filter == topics.BATCH_FILTER == "tern-gw/+/batch"
    shared = BridgeConfig.from_env({"TERN_BRIDGE_SHARE_GROUP": "bridges"})
    assert shared.share_group == "bridges" and shared.batch_filter == "$share/bridges/tern-gw/+/batch"
    for bad in ("a/b", "+", "#", "", "-x"):
        with pytest.raises(ConfigError, match="share_group"):
            BridgeConfig(share_group=bad)
    with pytest.raises(ConfigError, match="max_inflight_records"):
        BridgeConfig(max_inflight_records=0)
    with pytest.raises(ConfigError, match="dedup_window"):
        BridgeConfig(dedup_window=-1)


@pytest.mark.parametrize("name", ["gzip", "lz4", "zstd", "snappy"])
def test_compression_without_its_library_is_a_config_error(name):
    """aiokafka would raise a RuntimeError at producer creation; we say so at config time."""
    from aiokafka import codec

    if getattr(codec, f"has_{name}")():
        assert BridgeConfig(compression=name).compression == name
    else:
        with pytest.raises(ConfigError, match=f"compression: {name} needs its Python library"):
            BridgeConfig(compression=name)


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert cli_main(["run", "--mqtt", "127.0.0.1:notaport", "--kafka", "127.0.0.1:9092"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mqtt_broker" in err and "Traceback" not in err
    assert cli_main(["run", "--mqtt", "127.0.0.1:1883", "--status-topic", "no good"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "status_topic" in err
    # The pipelining knobs, by flag and by environment, checked like the rest.
    assert cli_main(["run", "--mqtt", "127.0.0.1:1883", "--max-inflight-records", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_inflight_records" in err


def test_pipelining_knobs_come_from_the_environment_and_flags_win() -> None:
    env = {"TERN_BRIDGE_MAX_INFLIGHT_RECORDS": "500", "TERN_BRIDGE_DEDUP_WINDOW": "0", "TERN_BRIDGE_METRICS_PORT": "9109"}
    config = BridgeConfig.from_env(env)
    assert (config.max_inflight_records, config.dedup_window, config.metrics_port) == (500, 0, 9109)
    assert BridgeConfig.from_env(env, max_inflight_records=800).max_inflight_records == 800
    with pytest.raises(ConfigError, match="dedup_window"):
        BridgeConfig.from_env({"TERN_BRIDGE_DEDUP_WINDOW": "lots"})


def test_cli_consume_shows_readings_and_node_status(kafka_bootstrap, kafka_topics, capsys):
    """`tern-bridge consume` prints a status record as a state, not as an undecodable value."""
    from aiokafka import AIOKafkaProducer

    reading = codec.Reading("dev-c", BOOT, 7, 1, {"t": 1.5}, site="s1", received_ms=2)
    event = codec.StatusEvent(site="s1", device="dev-c", state="offline", boot=BOOT, received_ms=3)
    records = [
        codec.kafka_record(reading, "gw9", kafka_topics["status"], 4),
        codec.kafka_status_record(event, "gw9", kafka_topics["status"], 5),
    ]

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for record in records:
                await producer.send_and_wait(record.topic, record.value, key=record.key, headers=list(record.headers))
        finally:
            await producer.stop()

    asyncio.run(produce())
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", kafka_topics["status"], "--from-beginning", "--timeout", "15"]) == 0
    out = capsys.readouterr().out
    assert "2 records" in out
    assert "t=1.5" in out and "offline" in out
    assert "unknown" not in out  # the old output: "unknown schema" (may wrap at 80 columns)


def test_command_session_timeout_from_flag_env_and_config() -> None:
    """The router's consumer-group session timeout: BridgeConfig, TERN_BRIDGE_COMMAND_SESSION_TIMEOUT,
    ``tern-bridge run --command-session-timeout``; it reaches the router's settings."""
    from tern.cloud.cli import _parser
    from tern.cloud.command_router import CommandSettings
    from tern.core.errors import ConfigError

    assert BridgeConfig().command_session_timeout_s == 10.0
    config = BridgeConfig.from_env({"TERN_BRIDGE_COMMAND_SESSION_TIMEOUT": "7.5"})
    assert CommandSettings.from_config(config).session_timeout_s == 7.5
    assert BridgeConfig.from_env({"TERN_BRIDGE_COMMAND_SESSION_TIMEOUT": "7.5"},
                                 command_session_timeout_s=6.0).command_session_timeout_s == 6.0
    args = _parser().parse_args(["run", "--command-session-timeout", "8"])
    assert args.command_session_timeout == 8.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="command_session_timeout_s"):
            BridgeConfig.from_env({"TERN_BRIDGE_COMMAND_SESSION_TIMEOUT": bad})

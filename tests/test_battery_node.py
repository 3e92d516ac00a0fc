"""Battery nodes: deep sleep that keeps seq, boot and unsent readings, and backlogs replayed
in bundles. Real firmware on the MicroPython unix port, real mosquitto, gateway, bridge and
Kafka (the firmware_pipeline fixture of conftest.py), plus the shared codec's bundle format.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from tern.harness.faultproxy import FaultProxy
from tern.core import codec
from tern.core.errors import CodecError
from tern.device.emulate import EmulatedNode
from tern.harness.observe import KafkaTail, wait_until

from helpers import kafka_seqs, kafka_statuses

SITE = "site-rst"


def _schema(name: str) -> dict:
    return json.loads(resources.files("tern.core").joinpath(f"schemas/{name}.schema.json").read_text())


def _readings(n: int, boot: str = "0a0b0c0d") -> list[codec.Reading]:
    return [codec.Reading("bat-1", boot, s, 1_700_000_000_000 + s, {"temp_c": 20.5, "batt_mv": 3300 - s}) for s in range(1, n + 1)]


def test_bundle_round_trips_and_matches_its_schema() -> None:
    raw = codec.encode_bundle(_readings(8))
    jsonschema.validate(json.loads(raw), _schema("node-bundle"))
    back = codec.decode_readings(raw, site="s", topic_device="bat-1")
    assert [r.seq for r in back] == list(range(1, 9)) and all(r.site == "s" and r.boot == "0a0b0c0d" for r in back)
    # A v1 payload is a bundle of one.
    single = codec.decode_readings(codec.encode_reading(_readings(1)[0]))
    assert len(single) == 1 and single[0].seq == 1


@pytest.mark.parametrize(
    "doc, why",
    [
        ({"v": 2, "dev": "bat-1", "boot": "0a0b", "items": []}, "1-32"),
        ({"v": 2, "dev": "bat-1", "boot": "0a0b", "items": [{"seq": 2, "ts": 1, "r": {"a": 1}}, {"seq": 2, "ts": 1, "r": {"a": 1}}]}, "follow"),
        ({"v": 2, "dev": "bat-1", "boot": "0a0b", "items": [{"seq": 1, "ts": 1, "r": {"a": 1}}] * 33}, "1-32"),
        ({"v": 2, "dev": "bat-1", "boot": "XX", "items": [{"seq": 1, "ts": 1, "r": {"a": 1}}]}, "boot"),
        ({"v": 2, "dev": "bat-1", "boot": "0a0b", "items": [{"seq": 1, "r": {"a": 1}}]}, "ts"),
        ({"v": 2, "dev": "other", "boot": "0a0b", "items": [{"seq": 1, "ts": 1, "r": {"a": 1}}]}, "topic"),
        ({"v": 3, "dev": "bat-1", "boot": "0a0b", "seq": 1, "ts": 1, "r": {"a": 1}}, "version"),
    ],
)
def test_bad_bundles_are_refused_with_a_reason(doc: dict, why: str) -> None:
    with pytest.raises(CodecError, match=why):
        codec.decode_readings(json.dumps(doc).encode(), topic_device="bat-1")


def test_status_drop_counts_round_trip() -> None:
    status = codec.Status("bat-1", "online", "0a0b0c0d", "0.1.0", "WDT_RESET", (("deadbeef", 12),))
    raw = codec.encode_status(status)
    jsonschema.validate(json.loads(raw), _schema("node-status"))
    assert codec.decode_status(raw) == status
    with pytest.raises(CodecError, match="dropped"):
        codec.decode_status(b'{"v":1,"dev":"bat-1","state":"online","boot":"0a0b","dropped":{"0a0b":-1}}')
    event = codec.StatusEvent.from_status(status, "s", 5)
    record = codec.kafka_status_record(event, "gw", "t", 6)
    value = codec.decode_kafka_status_value(record.value)
    jsonschema.validate(value, _schema("kafka-status"))
    assert value["dropped"] == {"deadbeef": 12}
    batch = codec.decode_batch(codec.encode_batch(codec.Batch("gw", 1, 2, statuses=(event,))))
    assert batch.statuses == (event,)


def test_deep_sleep_keeps_seq_boot_and_unsent_readings_over_sleep_cycles(firmware_pipeline) -> None:
    proxy: FaultProxy = firmware_pipeline["proxy"]
    tail: KafkaTail = firmware_pipeline["tail"]
    total = 8
    node = EmulatedNode(
        firmware_pipeline["tmp"] / "bat-1", device="bat-1", site=SITE, broker=proxy.address, max_readings=total,
        extra_config={"sleep_ms": 300, "ack_wait_ms": 5000},
    )
    try:
        node.start()
        assert node.wait_for(lambda n: n.wakes >= 3, 60), node.log_text()
        # Two wakes without the gateway: their readings must wait on flash.
        proxy.set_mode("refuse")
        w = node.wakes
        assert node.wait_for(lambda n: n.wakes >= w + 2, 60), node.log_text()
        proxy.set_mode("pass")
        assert node.wait_for(lambda n: n.wait_done(0), 60), node.log_text()
        text = node.log_text()
        boots = {line.split()[2] for line in text.splitlines() if line.startswith("TERN boot ")}
        assert len(boots) == 1, boots  # one boot id over every wake
        boot = boots.pop()
        assert set(node.reset_causes) == {"DEEPSLEEP_RESET"} and node.resets == 0
        assert node.wakes >= total - 1, node.wakes  # one reading per wake: power-on, then wakes
        assert wait_until(lambda: len(kafka_seqs(tail, "bat-1", boot)) >= total, 60), kafka_seqs(tail, "bat-1", boot)
        every = [identity[2] for identity, _, _ in tail.records() if identity[0] == "bat-1"]
        # Nothing lost, nothing repeated, in order: Kafka's per-device seqs strictly increase.
        assert every == list(range(1, total + 1)), every
        assert {identity[1] for identity, _, _ in tail.records() if identity[0] == "bat-1"} == {boot}
        assert "TERN replayed" in text, "the offline wakes' readings came back from flash"
        births = [v for v in kafka_statuses(firmware_pipeline["kafka"], firmware_pipeline["status_topic"], "bat-1") if v["state"] == "online"]
        assert births and all(v["boot"] == boot for v in births)
        assert births[-1]["reset"] == "DEEPSLEEP_RESET"
    finally:
        node.kill()


@pytest.mark.slow
def test_wifi_outage_of_60_s_replays_in_bundles_with_nothing_lost(firmware_pipeline) -> None:
    proxy: FaultProxy = firmware_pipeline["proxy"]
    tail: KafkaTail = firmware_pipeline["tail"]
    node = EmulatedNode(
        firmware_pipeline["tmp"] / "out-1", device="out-1", site=SITE, broker=proxy.address, interval_ms=200, max_readings=0,
        extra_config={"keepalive": 10, "backoff_max_ms": 5000},
    )
    try:
        node.start()
        assert node.wait_for(lambda n: n.acked >= 5, 30), node.log_text()
        boot = node.boot
        # The radio link goes silent: bytes vanish both ways, as when the access point dies.
        proxy.set_mode("blackhole")
        assert node.wait_for(lambda n: any(line.startswith("TERN disconnected") for line in n.tail), 40), node.log_text()
        end = time.monotonic() + 60  # the outage lasts 60 s; the node must live through it
        while time.monotonic() < end:
            assert node.running, node.log_text()
            time.sleep(0.5)
        proxy.set_mode("pass")
        assert node.wait_for(lambda n: n.connects >= 2, 30), node.log_text()
        seq_at_return = node.stats.get("seq", 0)
        # (fewer than 300: each reconnect attempt into the silent link blocks the loop for
        # up to timeout_ms, and a node that fell behind does not burst)
        assert seq_at_return >= 120, node.stats
        assert wait_until(lambda: kafka_seqs(tail, "out-1", boot)[-1:] >= [seq_at_return], 60)
        got = kafka_seqs(tail, "out-1", boot)
        assert got == list(range(1, len(got) + 1)), "nothing lost, in order"
        # The backlog went in bundles of up to bundle_max (8) readings per message.
        assert node.replayed >= 100 and node.replay_messages * 8 >= node.replayed
        assert node.replay_messages <= node.replayed / 4, (node.replay_messages, node.replayed)
    finally:
        node.kill()


def test_outbox_forwards_a_drop_report_once(tmp_path: Path) -> None:
    """A retained birth is re-delivered on every resubscribe: its drop report is stored once,
    while a new report for the same boot and state is news."""
    from tern.edge.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox.db")
    try:
        told = codec.StatusEvent("s", "bat-1", "online", "0a0b0c0d", "0.1.0", "SOFT_RESET", 0, (("deadbeef", 3),))
        assert outbox.add([], [], statuses=[told]).statuses == 1
        assert outbox.add([], [], statuses=[told]).statuses == 0  # the retained copy again
        again = codec.StatusEvent("s", "bat-1", "online", "0a0b0c0d", "0.1.0", "SOFT_RESET", 0, (("0a0b0c0d", 5),))
        assert outbox.add([], [], statuses=[again]).statuses == 1
        rows = outbox.take_statuses(10)
        assert [r.event.dropped for r in rows] == [(("deadbeef", 3),), (("0a0b0c0d", 5),)]
    finally:
        outbox.close()

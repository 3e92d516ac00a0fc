"""Dead letters to the cloud (the ``deadletters/1`` envelope extension) on real parts: payloads
that break the contract are published to a private Pi mosquitto, refused by a real gateway, carried
in its batches over a private cloud mosquitto to a real bridge, and read back from Kafka's
dead-letter topic. Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import ConsumedRecord, read_all
from tern.core import codec, topics
from tern.core.codec import Reading

from helpers import BOOT, DEADLINE, GW, SITE, bridge_config, dead_letters, publish_acked, started_gateway, wait_until

LONG = "x" * 65_000
GOOD = codec.encode_reading(Reading("dev-a", BOOT, 0, 1, {"t": 1}))
OVERSIZED = bytes(range(256)) * 40  # 10,240 bytes: over the node limit and over the 2 KiB carried

#: (topic, payload, what the reason says) for each kind of junk a node (or anyone) can publish.
JUNK = [
    (topics.telemetry_topic(SITE, "dev-a"), b"\x00\xffnot json", "not JSON"),
    (topics.telemetry_topic(SITE, "dev-a"), codec.encode_reading(Reading("dev-b", BOOT, 0, 1, {"t": 1})),
     "'dev-b' published on the topic of 'dev-a'"),
    (topics.telemetry_topic(SITE, "dev-a"), OVERSIZED, "limit"),
    (f"tern/{SITE}/{LONG}/telemetry", GOOD, "device"),  # a 65,000-character device id
]


def gateway_letters(bootstrap: str, topic: str, expect: int) -> list[ConsumedRecord]:
    """The gateway dead letters on ``topic`` (those naming a gateway), once at least ``expect`` are there."""
    records = read_all(bootstrap, topic, timeout_s=30, expect=expect)
    return [r for r in records if "gateway" in r.headers]


def test_junk_from_the_nodes_lands_in_the_dead_letter_topic_with_gateway_topic_and_reason(
        brokers, outbox_path: Path, cleanup, kafka_bootstrap: str, kafka_topics: dict[str, str]) -> None:
    local, cloud = brokers
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    # (the cleanup fixture closes only what has close(): the bridge is a context manager here)
    with BridgeThread(bridge_config(cloud, kafka_bootstrap, kafka_topics)) as bridge:
        publish_acked(local, [(t, p) for t, p, _ in JUNK])

        records = gateway_letters(kafka_bootstrap, kafka_topics["deadletter"], len(JUNK))
        assert len(records) == len(JUNK)
        by_id = {int(r.headers["deadletter_id"]): r for r in records}
        stored = dead_letters(outbox_path)
        assert [(t, p) for t, p, _ in stored] == [(t, p) for t, p, _ in JUNK]  # the Pi keeps them, whole
        for number, (topic, payload, reason) in enumerate(JUNK, start=1):
            rec = by_id[number]
            h = rec.headers
            assert h["gateway"] == GW.encode()
            assert reason in h["error"].decode(), (reason, h["error"][:200])
            assert h["source_topic"] == topic[:256].encode() and rec.key == topic[:256]
            assert int(h["source_topic_chars"]) == len(topic)
            assert h["topic_truncated"] == (b"1" if len(topic) > 256 else b"0")
            assert int(h["received_ms"]) > 0
            # Cut to 2 KiB, and the whole's size and hash say what was cut.
            assert rec.raw == payload[:2048]
            assert int(h["original_bytes"]) == len(payload)
            assert h["original_sha256"] == hashlib.sha256(payload).hexdigest().encode()
            assert h["truncated"] == (b"1" if len(payload) > 2048 else b"0")
        assert by_id[3].headers["truncated"] == b"1" and len(by_id[3].raw) == 2048  # the oversized one
        assert len(by_id[4].key) == 256  # the 65,000-character topic, cut

        # Confirmed: marked forwarded on the Pi, kept there, and counted on both sides.
        wait_until(lambda: gw.stats()["deadletters_forwarded"] == len(JUNK), what="the dead letters confirmed")
        stats = gw.stats()
        assert stats["dead_letters"] == len(JUNK) and stats["dead_letters_unsent"] == 0
        assert bridge.stats()["gateway_deadletters_written"] == len(JUNK)
        assert bridge.stats()["deadlettered"] == 0  # the batches themselves were fine


def test_after_a_bridge_outage_each_dead_letter_arrives_once(
        brokers, outbox_path: Path, cleanup, kafka_bootstrap: str, kafka_topics: dict[str, str]) -> None:
    local, cloud = brokers
    config = bridge_config(cloud, kafka_bootstrap, kafka_topics)  # one name: the restart resumes its session
    gw = started_gateway(local, cloud, outbox_path, cleanup)
    with BridgeThread(config):
        publish_acked(local, [(topics.telemetry_topic(SITE, "dev-a"), b"junk-%d" % i) for i in range(3)])
        wait_until(lambda: gw.stats()["deadletters_forwarded"] == 3, what="the first three confirmed")

    # The bridge is down: new junk is committed, claimed by a batch that waits on the cloud broker
    # (and is re-sent after the 2 s confirm timeout), and stays unsent on the Pi.
    publish_acked(local, [(topics.telemetry_topic(SITE, f"dev-{i}"), b"{broken %d" % i) for i in range(60)])
    wait_until(lambda: gw.stats()["dead_letters"] == 63, what="the junk committed during the outage")
    wait_until(lambda: gw.stats()["batches_resent"] >= 1, timeout=DEADLINE, what="a batch re-sent")
    assert gw.stats()["dead_letters_unsent"] == 60 and gw.stats()["deadletters_forwarded"] == 3

    with BridgeThread(config) as second:
        # 60 letters: two batches (at most 50 each).
        wait_until(lambda: gw.stats()["deadletters_forwarded"] == 63, timeout=30, what="all confirmed after the restart")
        # Each once in Kafka, though the batch was re-sent: the copy was confirmed, not written.
        assert second.stats()["gateway_deadletters_written"] == 60
    assert gw.stats()["dead_letters_unsent"] == 0
    records = gateway_letters(kafka_bootstrap, kafka_topics["deadletter"], 63)
    ids = [int(r.headers["deadletter_id"]) for r in records]
    assert sorted(ids) == list(range(1, 64)), f"duplicates or gaps: {sorted(ids)}"
    payloads = {int(r.headers["deadletter_id"]): r.raw for r in records}
    assert payloads[1] == b"junk-0" and payloads[63] == b"{broken 59"

"""The gateway's ingest on the raw receive path (tern.core.mqtt_client), on real mosquittos:
a burst of QoS 0 and QoS 1 readings committed in order with their node acks, a payload bigger
than a socket read (it crosses reads, so paho reads it) dead-lettered, and a reading the
gateway never acked re-delivered (dup) to its next run and committed once.

The other custody tests (acks only after commit, restarts, dead letters of every kind) run
the same ingest in tests/test_gateway.py.
"""

from __future__ import annotations

from tern.core import codec, topics
from tern.core.codec import Reading
from tern.core.mqtt_client import READ_CHUNK

from tern.edge.outbox.dead_letters import DEAD_LETTER_PAYLOAD_MAX
from tern.edge.service import Gateway

from helpers import (
    DEADLINE, SITE, BridgeStub, Node, config, dead_letters, new_client, outbox_rows, started_gateway, wait_until,
)
from helpers.gateway import BOOT


def reading(seq: int) -> bytes:
    return codec.encode_reading(Reading("dev-a", BOOT, seq, 1_700_000_000_000 + seq, {"t": 20.5, "n": seq}))


def node_payload(seq: int) -> bytes:
    """What :meth:`helpers.Node.send` publishes for ``seq``."""
    return codec.encode_reading(Reading("dev-a", BOOT, seq, 1_700_000_000_000 + seq, {"t": 20.5, "n": seq}))


def test_a_burst_is_committed_in_order_and_an_oversized_payload_is_a_dead_letter(brokers, outbox_path, cleanup):
    local, cloud = brokers
    cleanup(BridgeStub(cloud, confirm=False))  # rows stay in the outbox, in the order committed
    gw = started_gateway(local, cloud, outbox_path, cleanup, stop_timeout_s=0.5)
    node = Node(local, "dev-a")
    cleanup(node)
    publisher = new_client()
    publisher.max_inflight_messages_set(0)  # no window: QoS 0 would overtake queued QoS 1 ones
    publisher.connect(local.host, local.port)
    publisher.loop_start()
    cleanup(publisher)
    topic = topics.telemetry_topic(SITE, "dev-a")
    oversized = b"{" + b" " * (READ_CHUNK + 100) + b"}"
    for seq in range(1000):
        publisher.publish(topic, reading(seq), qos=0 if seq % 10 == 0 else 1)
        if seq == 500:
            publisher.publish(topic, oversized, qos=1)
    wait_until(lambda: len(outbox_rows(outbox_path)) == 1000, what="1,000 committed rows")
    assert [seq for _, _, seq in outbox_rows(outbox_path)] == list(range(1000))
    letters = dead_letters(outbox_path)
    # Kept as far as a dead letter keeps a payload, and said in full.
    assert [(t, p) for t, p, _ in letters] == [(topic, oversized[:DEAD_LETTER_PAYLOAD_MAX])]
    assert f"{len(oversized)} bytes, over the" in letters[0][2]
    wait_until(lambda: node.acked_seq() == 999, what="the node acked up to its last reading")
    stats = gw.ingest.stats()
    assert stats["committed"] == 1000 and stats["dead_lettered"] == 1
    assert gw.ingest.client.raw_parsed > 500, gw.ingest.client.raw_parsed


def test_a_reading_received_but_not_acked_comes_back_to_the_next_run_and_is_committed_once(
        brokers, outbox_path, cleanup):
    """A full outbox: the gateway receives the reading but may not commit (nor ack) it. Stopped
    and started with room, it gets the reading again (the broker re-delivers it, dup set) and
    commits it once."""
    local, cloud = brokers
    cleanup(BridgeStub(cloud, confirm=False))
    gw = started_gateway(local, cloud, outbox_path, cleanup, max_rows=1, stop_timeout_s=0.5)
    node = Node(local, "dev-a")
    cleanup(node)
    node.send(1)
    wait_until(lambda: len(outbox_rows(outbox_path)) == 1, what="the first reading committed")
    node.send(2)
    wait_until(lambda: gw.ingest.stats()["backpressure"], what="the full outbox holding the second")
    gw.stop()
    seen: list[tuple] = []
    gw2 = Gateway(config(local, cloud, outbox_path, max_rows=10, stop_timeout_s=0.5))
    cleanup(gw2)
    take = gw2.ingest._on_publish

    def watch(*values) -> None:  # sees what the raw path hands over, then hands it on
        seen.append(values)
        take(*values)

    gw2.ingest.client.set_raw_handler(watch)
    gw2.start()
    assert gw2.wait_connected(DEADLINE)
    wait_until(lambda: [s for _, _, s in outbox_rows(outbox_path)] == [1, 2], what="the second reading committed")
    again = [v for v in seen if v[0] == topics.telemetry_topic(SITE, "dev-a")]
    assert [(v[1], v[3], v[4]) for v in again] == [(node_payload(2), 1, True)]
    assert gw2.ingest.stats()["committed"] == 1

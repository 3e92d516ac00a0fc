"""tern.core.mqtt_client: buffered reads and grouped PUBACKs on a real mosquitto, and the paho
internals they rest on (a paho upgrade that changes them must fail here, not in the field)."""

from __future__ import annotations

import importlib.metadata
import inspect
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tern.core.mqtt_client import READ_CHUNK, BufferedClient
from tern.core.mqtt_session import PersistentSession
from tests.helpers.waiting import wait_until

TOPIC = "tern/test/burst"


def test_the_paho_internals_the_buffered_client_overrides_are_still_there() -> None:
    version = importlib.metadata.version("paho-mqtt")
    assert version.startswith("2.2."), f"tern.core.mqtt_client was checked against paho-mqtt 2.2, not {version}"
    # Every read of a packet goes through _sock_recv, and loop_read parses with _packet_read.
    assert "self._sock_recv(" in inspect.getsource(mqtt.Client._packet_read)
    assert "self._packet_read()" in inspect.getsource(mqtt.Client.loop_read)
    assert "self._sock.recv(" in inspect.getsource(mqtt.Client._sock_recv)
    # A PUBLISH reaches on_message through _handle_on_message; manual_ack leaves the PUBACK to us.
    assert "self._handle_on_message(message)" in inspect.getsource(mqtt.Client._handle_publish)
    assert "self._manual_ack" in inspect.getsource(mqtt.Client.ack)
    assert list(inspect.signature(mqtt.Client._packet_queue).parameters) == ["self", "command", "packet", "mid", "qos", "info"]
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="probe")
    for attribute in ("_sock", "_manual_ack", "_in_callback_mutex", "_userdata", "_out_packet"):
        assert hasattr(client, attribute), attribute


def test_a_burst_arrives_whole_and_in_order_with_few_socket_reads_and_grouped_acks_hold(mosquitto) -> None:
    """Small and large messages (one bigger than the read buffer) in one burst: every one
    arrives intact and in order, many per socket read; PUBACKs sent as groups by
    PersistentSession.ack_many are taken by the broker (nothing is re-delivered on reconnect),
    and those of a connection that is gone are not sent."""
    big = bytes(range(256)) * (READ_CHUNK // 256 + 300)
    payloads = [b"%05d" % i + (big if i in (300, 301, 900) else b"x" * 100) for i in range(1000)]
    received: list[tuple[bytes, int, int, int]] = []
    lock = threading.Condition()
    holder: dict[str, PersistentSession] = {}

    def on_message(msg: mqtt.MQTTMessage) -> None:
        with lock:
            received.append((bytes(msg.payload), msg.mid, msg.qos, holder["s"].generation))

    def session() -> PersistentSession:
        s = PersistentSession("tern-test-buffered", mosquitto.host, mosquitto.port, [(TOPIC, 1)], on_message,
                              manual_ack=True, name="test")
        holder["s"] = s
        s.start()
        assert s.wait_connected(10)
        return s

    first = session()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tern-test-burst-pub", protocol=mqtt.MQTTv311)
    publisher.max_inflight_messages_set(100)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        for payload in payloads:
            publisher.publish(TOPIC, payload, qos=1)
        acked = 0

        def ack_what_came() -> int:
            nonlocal acked
            with lock:
                group = received[acked:]
            first.ack_many([(mid, qos, generation) for _, mid, qos, generation in group])
            acked += len(group)
            return acked >= len(payloads)

        # The broker's in-flight window (100) lets the rest through only as acks come back.
        wait_until(ack_what_came, 30, "every message received and acked in groups")
        assert [p for p, *_ in received] == payloads
        reads = first.client.socket_reads
        assert 0 < reads < len(payloads) / 4, f"{reads} socket reads for {len(payloads)} messages"

        # The broker handles a connection's packets in order: once it has answered a publish
        # sent after the acks, it has taken the acks too.
        first.client.publish("tern/test/fence", b"", qos=1).wait_for_publish(10)

        # Acks for a connection that is gone are refused, atomically with the generation.
        assert first.ack_many([(received[-1][1], 1, first.generation - 1)]) == 0
        first.stop()
        assert first.ack_many([(received[-1][1], 1, received[-1][3])]) == 0

        # Same client id, persistent session: nothing unacked is left, so the first message
        # after reconnecting is the one published now.
        with lock:
            received.clear()
        second = session()
        try:
            publisher.publish(TOPIC, b"after", qos=1)
            wait_until(lambda: received, 10, "the message published after the reconnect")
            assert [p for p, *_ in received] == [b"after"]
        finally:
            second.stop()
    finally:
        publisher.disconnect()
        publisher.loop_stop()

"""tern.core.mqtt_client: buffered reads and grouped PUBACKs on a real mosquitto, and the paho
internals they rest on (a paho upgrade that changes them must fail here, not in the field)."""

from __future__ import annotations

import importlib.metadata
import inspect
import socket
import struct
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from tern.core.mqtt_client import READ_CHUNK, BufferedClient, MalformedPublish, Publish, parse_publish
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
    # The raw path: paho's reader leaves its state in _in_packet ("command" 0 between packets),
    # returns MQTT_ERR_AGAIN for "nothing yet", and a message keeps its topic bytes in _topic.
    read = inspect.getsource(mqtt.Client._packet_read)
    assert "self._in_packet['command'] == 0" in read and "MQTT_ERR_AGAIN" in read
    assert "self._loop_rc_handle(rc)" in inspect.getsource(mqtt.Client.loop_read)
    assert "self._last_bytes_received = time_func()" in read and mqtt.time_func is not None
    assert "self._send_puback(message.mid)" in inspect.getsource(mqtt.Client._handle_publish)
    assert mqtt.MQTTMessage(1, b"a/b")._topic == b"a/b"
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="probe")
    for attribute in ("_sock", "_manual_ack", "_in_callback_mutex", "_userdata", "_out_packet", "_in_packet",
                      "_msgtime_mutex"):
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


# --- the raw receive path -----------------------------------------------------------------------


def test_parse_publish_reads_qos_0_and_1_and_refuses_what_mqtt_forbids() -> None:
    assert parse_publish(0x30, b"\x00\x03a/bhello") == Publish("a/b", b"hello", 0, 0, False, False)
    assert parse_publish(0x3B, b"\x00\x01t\x12\x34") == Publish("t", b"", 0x1234, 1, True, True)
    # A topic that is not UTF-8 (a broker refuses one) stays readable rather than raising.
    assert parse_publish(0x30, b"\x00\x02\xff/x").topic == "\ufffd/"
    for header, body, why in [
        (0x30, b"\x00", "no topic length"),
        (0x30, b"\x00\x05a/b", "shorter than its topic"),
        (0x32, b"\x00\x01t\x00", "shorter than its topic and packet id"),
        (0x30, b"\x00\x00payload", "empty topic"),
        (0x34, b"\x00\x01t\x00\x01", "QoS 2"),
        (0x36, b"\x00\x01t\x00\x01", "QoS 3"),
    ]:
        with pytest.raises(MalformedPublish, match=why):
            parse_publish(header, body)


def test_the_raw_path_hands_over_qos_0_and_1_in_order_and_unacked_ones_come_back_as_dup(mosquitto) -> None:
    """A retained message, then a burst of 1,000 QoS 0 and QoS 1 messages (two bigger than the
    read buffer) reach the raw handler as plain values, in order, nearly all parsed without
    paho; PUBACKs from ack_many are taken, and the ones held back are re-delivered with dup set
    after a reconnect. on_message is never called."""
    big = bytes(range(256)) * (READ_CHUNK // 256 + 10)
    sent = [(b"%04d" % i + (big if i in (400, 401) else b"y" * 80), 0 if i % 3 == 0 else 1) for i in range(1000)]
    got: list[tuple] = []
    via_paho: list[mqtt.MQTTMessage] = []
    lock = threading.Lock()
    holder: dict[str, PersistentSession] = {}

    def on_raw(topic: str, payload: bytes, mid: int, qos: int, dup: bool, retain: bool) -> None:
        with lock:
            got.append((topic, payload, mid, qos, dup, retain, holder["s"].generation))

    def session() -> PersistentSession:
        s = PersistentSession("tern-test-raw", mosquitto.host, mosquitto.port, [("tern/test/#", 1)], via_paho.append,
                              manual_ack=True, name="test")
        s.client.set_raw_handler(on_raw)
        holder["s"] = s
        s.start()
        assert s.wait_connected(10)
        return s

    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tern-test-raw-pub", protocol=mqtt.MQTTv311)
    # No window: paho would hold QoS 1 messages back behind it and let QoS 0 ones overtake them.
    publisher.max_inflight_messages_set(0)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        publisher.publish("tern/test/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
        first = session()
        wait_until(lambda: got, 10, "the retained message")
        assert got[0][:6] == ("tern/test/retained", b"kept", got[0][2], 1, False, True) and got[0][2] > 0
        first.ack_many([(got[0][2], 1, got[0][6])])
        with lock:
            got.clear()
        for payload, qos in sent:
            publisher.publish(TOPIC, payload, qos=qos)
        # 667 QoS 1 messages fit the broker's in-flight window (1000): no ack is needed to get them all.
        wait_until(lambda: len(got) == len(sent), 30, "the burst")
        assert [(m[1], m[3]) for m in got] == sent
        assert all(m[0] == TOPIC and not m[4] and not m[5] and (m[2] > 0) == (m[3] == 1) for m in got)
        assert first.client.raw_parsed > len(sent) // 2, first.client.raw_parsed  # a packet split across reads goes to paho
        held = [m for m in got[-8:] if m[3] == 1]
        first.ack_many([(m[2], m[3], m[6]) for m in got[:-8]])
        first.client.publish("tern/test/fence", b"", qos=1).wait_for_publish(10)
        first.stop()

        with lock:
            got.clear()
        second = session()
        try:
            wait_until(lambda: len([m for m in got if m[0] == TOPIC]) >= len(held), 10, "the re-deliveries")
            again = [m for m in got if m[0] == TOPIC]
            assert [(m[1], m[4]) for m in again] == [(m[1], True) for m in held]
            second.ack_many([(m[2], m[3], m[6]) for m in got])
        finally:
            second.stop()
        assert via_paho == []
    finally:
        publisher.publish("tern/test/retained", b"", qos=1, retain=True).wait_for_publish(10)
        publisher.disconnect()
        publisher.loop_stop()


def test_a_malformed_publish_drops_the_connection_with_a_clear_error_not_a_crash() -> None:
    """A broker that sends a PUBLISH whose topic runs past the packet (no real broker does: a
    loopback socket plays one) gets a protocol error: the connection closes, nothing raises,
    the handler never sees it, and what came before it was handed over."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    got: list[tuple] = []
    logs: list[str] = []
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="tern-test-malformed", protocol=mqtt.MQTTv311)
    client.set_raw_handler(lambda *values: got.append(values))
    client.on_log = lambda c, u, level, text: logs.append(text)
    try:
        client.connect("127.0.0.1", server.getsockname()[1])
        peer, _ = server.accept()
        with peer:
            peer.settimeout(10)
            assert peer.recv(1024)[0] == 0x10  # CONNECT
            good = b"\x00\x03a/b" + b"ok"
            bad = b"\x00\x09a/b"  # says 9 bytes of topic, holds 3
            peer.sendall(b"\x20\x02\x00\x00" + b"\x30" + bytes([len(good)]) + good + b"\x30" + bytes([len(bad)]) + bad)
            rcs = [client.loop(0.5) for _ in range(3)]
        assert MQTTErrorCode.MQTT_ERR_PROTOCOL in rcs or MQTTErrorCode.MQTT_ERR_CONN_LOST in rcs, rcs
        assert got == [("a/b", b"ok", 0, 0, False, False)]
        assert any("malformed" in line and "shorter than its topic" in line for line in logs), logs
        assert client.socket() is None
    finally:
        server.close()


def test_without_manual_ack_the_raw_path_acks_each_qos_1_message_itself(mosquitto) -> None:
    """As paho does: once the handler returns, the PUBACK goes; a reconnect of the persistent
    session then brings nothing back."""
    got: list[bytes] = []
    via_paho: list[mqtt.MQTTMessage] = []

    def session() -> PersistentSession:
        s = PersistentSession("tern-test-raw-autoack", mosquitto.host, mosquitto.port, [(TOPIC, 1)], via_paho.append,
                              name="test")
        s.client.set_raw_handler(lambda topic, payload, *rest: got.append(payload))
        s.start()
        assert s.wait_connected(10)
        return s

    first = session()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tern-test-autoack-pub", protocol=mqtt.MQTTv311)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        for i in range(50):
            publisher.publish(TOPIC, b"%d" % i, qos=1)
        wait_until(lambda: len(got) == 50, 10, "50 messages")
        first.client.publish("tern/test/fence", b"", qos=1).wait_for_publish(10)  # the acks went before it
        first.stop()
        got.clear()
        second = session()
        try:
            publisher.publish(TOPIC, b"after", qos=1).wait_for_publish(10)
            wait_until(lambda: got, 10, "the message published after the reconnect")
            assert got == [b"after"] and via_paho == []
        finally:
            second.stop()
    finally:
        publisher.disconnect()
        publisher.loop_stop()

"""A paho client that reads the socket in large chunks and PUBACKs a group in one write.

paho 2.2 reads each incoming packet with three or four ``recv()`` calls (one byte of command,
one per remaining-length byte, then the body) and, with nothing of its own in flight, handles
one packet per ``select()``. At a few thousand QoS 1 messages a second that is most of a
subscriber's CPU (``make bench``, ``gateway.ingest``, issue 27). :class:`BufferedClient`
changes only where the bytes come from and how many packets one wake-up handles:

* :meth:`BufferedClient._sock_recv` serves paho's small reads from a buffer of up to
  :data:`READ_CHUNK` bytes filled by one ``recv()``. paho's packet parser, its error handling
  and its TLS handling (``SSLWantRead`` and friends, raised from the real read) are unchanged;
* :meth:`BufferedClient.loop_read` goes on handling packets while whole ones wait in the
  buffer (at most :data:`MAX_PACKETS_PER_READ`, so writes, acks and keep-alive still get
  their turn), since ``select()`` cannot see bytes that already left the socket;
* :meth:`BufferedClient.ack_many` queues the PUBACKs of a group as one write (one wake-up of
  the network thread, one ``send()``) instead of one per message;
* incoming messages go straight to ``on_message`` while no per-topic callback is registered
  (paho otherwise walks its topic matcher for every message);
* opt-in, :meth:`BufferedClient.set_raw_handler`: whole QoS 0 and QoS 1 PUBLISH packets in the
  buffer are parsed here (as :func:`parse_publish` reads them, inlined in the read loop) and
  handed over as plain values (topic, payload, packet id, qos, dup, retain) instead of a paho
  ``MQTTMessage``. paho's own handling of a PUBLISH (its generic reader, ``decode_publish``,
  an ``MQTTMessage`` with its property setters, a log call) was 60 % of the gateway ingest's
  network thread, ~17 µs per message, and the message object another 20 % (issue 27).
  Everything else (CONNACK, SUBACK, PINGRESP, PUBACK, QoS 2), a PUBLISH not yet whole in the
  buffer and a malformed one still go through paho or end the connection as paho would, and
  what paho delivers reaches the same handler with the same values. A malformed PUBLISH is
  a protocol error that closes the connection, with a log line saying what is wrong.

These override private methods of paho, so the paho version is pinned in ``pyproject.toml``
and ``tests/test_mqtt_client.py`` fails if the internals they rely on change.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterable, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

#: Bytes one socket read may bring in (a QoS 1 reading is ~150 bytes: a few hundred per read).
READ_CHUNK = 65536
#: Packets one read event may handle from the buffer before the loop writes and checks keep-alive.
MAX_PACKETS_PER_READ = 1000
_PUBACK = struct.Struct("!BBH")
_PUBLISH = mqtt.PUBLISH  # 0x30

#: The raw path's consumer: ``(topic, payload, mid, qos, dup, retain)`` per message, on paho's
#: network thread (keep it short). ``mid`` is 0 for QoS 0.
RawHandler = Callable[[str, bytes, int, int, bool, bool], None]


class Publish(NamedTuple):
    """One PUBLISH packet as :func:`parse_publish` reads it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    retain: bool


class MalformedPublish(ValueError):
    """A PUBLISH packet that breaks MQTT 3.1.1 (the connection is dropped, as paho does)."""


def parse_publish(header: int, body: bytes) -> Publish:
    """Read a QoS 0/1 PUBLISH: ``header`` its first byte, ``body`` what follows the remaining length.

    Raises :class:`MalformedPublish` for a body too short for its topic (and packet id), an
    empty topic, or a QoS other than 0 and 1. A topic that is not UTF-8 (a broker must refuse
    one, MQTT-1.5.3-1) is read with replacement characters rather than refused: the consumer
    then rejects it by its own rules with the topic still readable.
    """
    qos = (header >> 1) & 3
    if qos > 1:
        raise MalformedPublish(f"PUBLISH with QoS {qos} on the raw path")
    size = len(body)
    if size < 2:
        raise MalformedPublish(f"PUBLISH body of {size} bytes has no topic length")
    topic_end = 2 + ((body[0] << 8) | body[1])
    if topic_end == 2:
        raise MalformedPublish("PUBLISH with an empty topic")
    start = topic_end + 2 if qos else topic_end
    if start > size:
        raise MalformedPublish(f"PUBLISH body of {size} bytes is shorter than its topic and packet id ({start})")
    mid = (body[topic_end] << 8) | body[topic_end + 1] if qos else 0
    return Publish(body[2:topic_end].decode("utf-8", "replace"), body[start:], mid, qos,
                   bool(header & 0x08), bool(header & 0x01))


def as_message(topic: str, payload: bytes, mid: int, qos: int, dup: bool = False, retain: bool = False) -> mqtt.MQTTMessage:
    """A paho ``MQTTMessage`` holding what the raw path handed over (for consumers that take one)."""
    message = mqtt.MQTTMessage(mid, topic.encode("utf-8"))
    message.payload, message.qos, message.dup, message.retain = payload, qos, dup, retain
    return message


class BufferedClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with buffered socket reads and grouped PUBACKs (same API)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The buffer belongs to one socket: a reconnect starts from nothing.
        self._read_sock: Any = None
        self._read_buf = b""
        self._read_pos = 0
        self._topic_callbacks = False
        self._raw: RawHandler | None = None
        #: Socket reads made (each serves many packets under load): for tests and profiles.
        self.socket_reads = 0
        #: PUBLISH packets parsed by the raw path (the rest of the handler's calls came from paho).
        self.raw_parsed = 0

    def set_raw_handler(self, handler: RawHandler | None) -> None:
        """Hand every incoming PUBLISH to ``handler`` as plain values instead of to ``on_message``.

        Set it before connecting. With ``manual_ack`` the consumer PUBACKs (:meth:`ack_many`);
        without, a QoS 1 message is PUBACKed once the handler returns, as paho does. None goes
        back to paho's ``on_message``.
        """
        self._raw = handler

    # --- reads ---------------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._read_sock is not self._sock:
            self._read_sock, self._read_buf, self._read_pos = self._sock, b"", 0
        buf, pos = self._read_buf, self._read_pos
        if pos >= len(buf):
            # paho's own read: it raises what paho expects (BlockingIOError for "nothing yet",
            # also on TLS want-read/want-write) and returns b"" on a closed connection.
            buf = super()._sock_recv(READ_CHUNK)
            self.socket_reads += 1
            if not buf:
                return buf
            self._read_buf, pos = buf, 0
        end = pos + bufsize
        self._read_pos = end
        return buf[pos:end]

    def buffered(self) -> int:
        """Bytes read from the current socket and not yet parsed."""
        if self._read_sock is None or self._read_sock is not self._sock:
            return 0
        return max(0, len(self._read_buf) - self._read_pos)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """paho's ``loop_read``, then on while whole packets wait in the buffer (bounded).

        With a raw handler, whole QoS 0/1 PUBLISH packets are parsed here and paho reads only
        the others (:meth:`_loop_read_raw`).
        """
        if self._raw is not None:
            return self._loop_read_raw()
        rc = super().loop_read(max_packets)
        handled = 0
        # Each pass parses at least one buffered byte (a partial packet ends in one socket
        # read that finds nothing yet): the loop ends when the buffer does, or at the bound.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered() and handled < MAX_PACKETS_PER_READ:
            rc = super().loop_read(1)
            handled += 1
        return rc

    def _loop_read_raw(self) -> MQTTErrorCode:
        """One socket read, then every packet it brought (at most :data:`MAX_PACKETS_PER_READ`):
        whole QoS 0/1 PUBLISH packets by :meth:`_read_raw`, the rest by paho's packet reader."""
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        handled = 0
        filled = False
        while handled < MAX_PACKETS_PER_READ:
            if self._in_packet["command"] == 0:  # paho is between packets
                if not self.buffered():
                    if filled:
                        break  # back to select(): writes and keep-alive get their turn
                    filled = True
                    rc = self._fill()
                    if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                        return MQTTErrorCode.MQTT_ERR_SUCCESS
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        return self._loop_rc_handle(rc)
                taken, rc = self._read_raw(MAX_PACKETS_PER_READ - handled)
                handled += taken
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
                if not self.buffered() or handled >= MAX_PACKETS_PER_READ:
                    continue
            # Another kind of packet, or a PUBLISH not whole yet: paho's reader (it reads from
            # the buffer, and from the socket once the buffer is done).
            filled = True
            rc = self._packet_read()
            handled += 1
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN and not self.buffered():
                # Nothing more on the socket yet. (paho also says "again" after 100 reads
                # of one big packet: whatever is buffered then, select() would not see.)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _fill(self) -> MQTTErrorCode:
        """One ``recv()`` into the empty buffer, with paho's meaning of what it raises."""
        try:
            data = super()._sock_recv(READ_CHUNK)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:  # a timeout, a reset, a closed socket
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        self.socket_reads += 1
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        self._read_sock, self._read_buf, self._read_pos = self._sock, data, 0
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _read_raw(self, limit: int) -> tuple[int, MQTTErrorCode]:
        """Hand the whole QoS 0/1 PUBLISH packets at the head of the buffer to the raw handler.

        Stops at the first other packet, at a packet not whole yet (paho reads both), or after
        ``limit``; (packets handled, paho's result code: a malformed PUBLISH is a protocol
        error that drops the connection, as in paho).
        """
        buf, pos, handler = self._read_buf, self._read_pos, self._raw
        end = len(buf)
        taken = 0
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        with self._in_callback_mutex:
            while taken < limit and pos < end:
                header = buf[pos]
                if header & 0xF0 != _PUBLISH or header & 0x06 > 0x02:
                    break
                # Remaining length: 1 to 4 bytes of 7 bits, least significant first.
                length, shift, i = 0, 0, pos + 1
                while i < end and shift < 28:
                    byte = buf[i]
                    length |= (byte & 0x7F) << shift
                    i += 1
                    shift += 7
                    if not byte & 0x80:
                        break
                else:
                    break  # not whole yet, or a length of 5 bytes: paho's reader decides
                body_end = i + length
                if body_end > end:
                    break
                # parse_publish, inlined: this loop is the subscriber's hot path.
                qos = (header >> 1) & 3
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1]) if length >= 2 else body_end + 1
                start = topic_end + 2 if qos else topic_end
                if start > body_end or topic_end == i + 2:
                    self._read_pos = body_end
                    try:
                        parse_publish(header, buf[i:body_end])
                    except MalformedPublish as exc:  # always: it names what is wrong
                        self._easy_log(mqtt.MQTT_LOG_ERR, "Received malformed packet: %s", exc)
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                    break
                mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
                pos = self._read_pos = body_end
                taken += 1
                try:
                    handler(buf[i + 2:topic_end].decode("utf-8", "replace"), buf[start:body_end], mid, qos,
                            bool(header & 0x08), bool(header & 0x01))
                except Exception as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in raw message handler: %s", err)
                    if not self.suppress_exceptions:
                        raise
                if qos and not self._manual_ack:
                    rc = self._send_puback(mid)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
        if taken:
            self.raw_parsed += taken
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return taken, self._loop_rc_handle(rc)
        return taken, rc

    # --- dispatch ------------------------------------------------------------------------

    def message_callback_add(self, sub: str, callback: Callable[..., None]) -> None:
        """paho's; from now on messages go through its topic matcher."""
        self._topic_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        raw = self._raw
        if raw is not None:
            # A message paho read (split across reads, QoS 2, the first of a wake-up): the
            # consumer gets the same plain values as from the raw path.
            callback: Callable[..., None] = raw
            args: tuple = (message._topic.decode("utf-8", "replace"), bytes(message.payload), message.mid,
                           message.qos, bool(message.dup), bool(message.retain))
            what = "raw message handler"
        elif self._topic_callbacks:
            super()._handle_on_message(message)
            return
        elif self.on_message is None:
            return
        else:
            callback, args, what = self.on_message, (self, self._userdata, message), "on_message"
        with self._in_callback_mutex:
            try:
                callback(*args)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in %s: %s", what, err)
                if not self.suppress_exceptions:
                    raise

    # --- acks ----------------------------------------------------------------------------

    def ack_many(self, messages: Iterable[tuple[int, int]]) -> MQTTErrorCode:
        """PUBACK ``(mid, qos)`` pairs, in the given order, in one queued write (``manual_ack``).

        QoS 0 needs no ack; a QoS 2 message takes paho's own ``ack`` (PUBCOMP), in its place
        in the order.
        """
        if not self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        run: list[bytes] = []
        for mid, qos in messages:
            if qos == 1:
                run.append(_PUBACK.pack(mqtt.PUBACK, 2, mid))
            elif qos == 2:
                rc = self._queue_pubacks(run) or rc
                run = []
                rc = self.ack(mid, qos) or rc
        return self._queue_pubacks(run) or rc

    def _queue_pubacks(self, packets: list[bytes]) -> MQTTErrorCode:
        if not packets:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        # One "packet" holding them all: paho writes it as bytes and tracks nothing for a PUBACK.
        return self._packet_queue(mqtt.PUBACK, b"".join(packets), 0, 0)

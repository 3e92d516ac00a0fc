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
  (paho otherwise walks its topic matcher for every message).

These override private methods of paho, so the paho version is pinned in ``pyproject.toml``
and ``tests/test_mqtt_client.py`` fails if the internals they rely on change.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

#: Bytes one socket read may bring in (a QoS 1 reading is ~150 bytes: a few hundred per read).
READ_CHUNK = 65536
#: Packets one read event may handle from the buffer before the loop writes and checks keep-alive.
MAX_PACKETS_PER_READ = 1000
_PUBACK = struct.Struct("!BBH")


class BufferedClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with buffered socket reads and grouped PUBACKs (same API)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The buffer belongs to one socket: a reconnect starts from nothing.
        self._read_sock: Any = None
        self._read_buf = b""
        self._read_pos = 0
        self._topic_callbacks = False
        #: Socket reads made (each serves many packets under load): for tests and profiles.
        self.socket_reads = 0

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
        """paho's ``loop_read``, then on while whole packets wait in the buffer (bounded)."""
        rc = super().loop_read(max_packets)
        handled = 0
        # Each pass parses at least one buffered byte (a partial packet ends in one socket
        # read that finds nothing yet): the loop ends when the buffer does, or at the bound.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered() and handled < MAX_PACKETS_PER_READ:
            rc = super().loop_read(1)
            handled += 1
        return rc

    # --- dispatch ------------------------------------------------------------------------

    def message_callback_add(self, sub: str, callback: Callable[..., None]) -> None:
        """paho's; from now on messages go through its topic matcher."""
        self._topic_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        if self._topic_callbacks:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
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

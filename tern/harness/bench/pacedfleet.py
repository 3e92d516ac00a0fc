"""A paced node fleet for the latency stage: one MQTT connection per device, sent from one loop.

The latency stage needs readings leaving at a steady rate, each stamped with its send time.
Fed line by line through pipes, the ``mosquitto_pub`` fleet (:mod:`.pubfleet`) cost the bench
about 70 µs of CPU per reading (a hundred processes, each woken for every line) and the pacing
loop about 20 more: at half of the live capacity, ~12,000 readings/s, the load generator alone
took a whole core of the two, and the rounds measured a machine out of CPU (the plain
subscriber's own p99 went past two seconds). Here one loop in the bench process writes each
reading as a ready-made QoS 1 PUBLISH packet on its device's connection: a few µs per reading.

Each device still publishes in order on a TCP connection of its own (MQTT 3.1.1, clean
session), as a node does, and the broker acknowledges every reading; the PUBACKs wait in the
sockets' receive buffers (4 bytes each) and are counted at the end, so a round only counts
when the broker took every reading. The packets are spelled out here rather than sent through
an MQTT library: paho's publish path costs ~40 µs per message, which is what this replaces.
"""

from __future__ import annotations

import socket
import struct
import time

from tern.core import codec, topics
from tern.harness.bench.common import BenchError
from tern.harness.bench.nodes import fleet_reading

#: Stands for the send time in the pre-encoded payloads: 13 digits, as every ms timestamp
#: until the year 2286, so the real stamp replaces it in place.
_TS_MARK = 1_111_111_111_111
#: Seconds the loop sleeps at most between sends (readings due meanwhile leave together).
_TICK_S = 0.001


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _connect_packet(client_id: str, keepalive_s: int = 60) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive_s) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


class PacedFleet:
    """``devices`` connections to one broker; :meth:`publish_paced` sends the fleet's readings."""

    def __init__(self, host: str, port: int, devices: int, timeout_s: float = 10.0) -> None:
        self.devices = devices
        self._socks: list[socket.socket] = []
        tag = time.time_ns() % 10**6
        try:
            for index in range(devices):
                sock = socket.create_connection((host, port), timeout=timeout_s)
                self._socks.append(sock)
                # Each reading leaves when written, not when Nagle's algorithm lets it.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(_connect_packet(f"bench-paced-{index:04d}-{tag}"))
                connack = _recv_exactly(sock, 4, timeout_s)
                if connack[0] != 0x20 or connack[3] != 0:
                    raise BenchError(f"paced fleet: broker refused connection {index} (CONNACK {connack.hex()})")
        except BaseException:
            self.close()
            raise

    def publish_paced(self, rate: float, seconds: float) -> int:
        """Publish ``rate`` readings/s for ``seconds`` (device ``i % devices`` sends the
        ``i``-th), each stamped ``ts`` = its send time (ms); returns how many, once the broker
        has acknowledged every one (BenchError if it does not within 30 s)."""
        count = int(rate * seconds)
        packets = [self._packet(i) for i in range(count)]  # before the clock: the nodes' memory
        devices, socks = self.devices, self._socks
        start = time.perf_counter()
        index = 0
        while index < count:
            due = min(count, int((time.perf_counter() - start) * rate) + 1)
            if index >= due:
                time.sleep(max(0.0, min(_TICK_S, (index - (time.perf_counter() - start) * rate) / rate)))
                continue
            stamp = b"%d" % (time.time_ns() // 1_000_000)
            for i in range(index, due):
                head, tail = packets[i]
                socks[i % devices].sendall(head + stamp + tail)
            index = due
        self._await_acks([count // devices + (1 if d < count % devices else 0) for d in range(devices)])
        return count

    def _packet(self, index: int) -> tuple[bytes, bytes]:
        """The ``index``-th reading's PUBLISH packet, split where its send time goes."""
        reading = fleet_reading(index, self.devices, ts_ms=_TS_MARK)
        payload = codec.encode_reading(reading)
        topic = _utf8(topics.telemetry_topic(reading.site, reading.device))
        packet_id = struct.pack("!H", index // self.devices % 65535 + 1)
        body = topic + packet_id + payload
        packet = b"\x32" + _remaining_length(len(body)) + body
        head, sep, tail = packet.partition(b'"ts":%d' % _TS_MARK)
        if not sep:
            raise BenchError("paced fleet: the reading's payload has no ts to stamp")
        return head + b'"ts":', tail

    def _await_acks(self, expected: list[int], deadline_s: float = 30.0) -> None:
        """Read each connection's PUBACKs until it has one per reading sent on it."""
        deadline = time.monotonic() + deadline_s
        for index, (sock, want) in enumerate(zip(self._socks, expected)):
            got = bytearray()
            while len(got) < 4 * want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"paced fleet: connection {index} has {len(got) // 4} of {want} PUBACKs "
                                     f"after {deadline_s:.0f} s")
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    raise BenchError(f"paced fleet: broker closed connection {index} "
                                     f"after {len(got) // 4} of {want} PUBACKs")
                got += chunk
            if len(got) != 4 * want or got[::4] != b"\x40" * want:
                raise BenchError(f"paced fleet: connection {index} got something other than {want} PUBACKs")

    def close(self) -> None:
        """Disconnect every connection."""
        for sock in self._socks:
            try:
                sock.sendall(b"\xe0\x00")
            except OSError:
                pass
            sock.close()
        self._socks.clear()


def _recv_exactly(sock: socket.socket, n: int, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError("paced fleet: broker closed the connection")
        data += chunk
    return data

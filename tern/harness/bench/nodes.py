"""Many node connections: paho clients publishing per-reading JSON, as a fleet of nodes does.

Device ``k`` always publishes on connection ``k % connections``, so each device's readings
leave in order on one connection, like a real node's.
"""

from __future__ import annotations

import time
from typing import Sequence

from tern.core import codec, topics
from tern.core.codec import Reading
from tern.harness.bench.common import BOOT, SITE, BenchError, MqttPeer

def device_name(k: int) -> str:
    """The name of the fleet's ``k``-th device."""
    return f"bench-node-{k:04d}"


def fleet_reading(index: int, devices: int, ts_ms: int | None = None) -> Reading:
    """The ``index``-th reading of a fleet of ``devices`` (round robin; seq from 1 per device)."""
    values = {"adc_mv": 1200 + index % 400, "temp_c": 21.5 + (index % 50) / 16, "rh": 40.25, "sensor_err": 0}
    ts = 1_795_456_737_123 + index if ts_ms is None else ts_ms
    return Reading(device=device_name(index % devices), boot=BOOT, seq=index // devices + 1, ts_ms=ts,
                   values=values, site=SITE)


def fleet_messages(count: int, devices: int, first: int = 0) -> list[tuple[int, str, bytes]]:
    """(device index, topic, payload) of ``count`` readings of the fleet from its ``first``-th, in publish order."""
    out = []
    for i in range(first, first + count):
        r = fleet_reading(i, devices)
        out.append((i % devices, topics.telemetry_topic(r.site, r.device), codec.encode_reading(r)))
    return out


class NodeFleet:
    """``connections`` paho clients on one broker; close() disconnects them all."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.peers: list[MqttPeer] = []
        self._infos: list = []
        try:
            for _ in range(connections):
                self.peers.append(MqttPeer(host, port, "bench-node"))
        except BaseException:
            self.close()
            raise

    def publish(self, device: int, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 on the device's connection."""
        info = self.peers[device % len(self.peers)].client.publish(topic, payload, qos=1)
        if info.rc != 0:
            raise BenchError(f"publish to {topic} failed (rc {info.rc})")
        self._infos.append(info)

    def wait_published(self, deadline_s: float) -> None:
        """Block until the broker has acknowledged (PUBACK) every message published so far."""
        deadline = time.monotonic() + deadline_s
        for info in self._infos:
            while not info.is_published():
                if time.monotonic() > deadline:
                    raise BenchError(f"publishers: broker did not acknowledge every message within {deadline_s:.0f} s")
                time.sleep(0.005)
        self._infos.clear()

    def publish_all(self, messages: Sequence[tuple[int, str, bytes]]) -> None:
        """Queue every message (paho sends them as each connection's window allows)."""
        for device, topic, payload in messages:
            self.publish(device, topic, payload)

    def close(self) -> None:
        """Disconnect every client."""
        for peer in self.peers:
            try:
                peer.close()
            except Exception:  # closing after a failed start: nothing more to do
                pass

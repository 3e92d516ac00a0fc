"""Stage ``ota``: a release rolled out to the nodes of one gateway (issue 26).

Real parts: the Pi's and the cloud's mosquitto, a gateway (in-process, the default chunk pace
``ota_chunks_per_s``), emulated nodes running the firmware (``.mpy``, 100K heap) that publish a
reading every 50 ms and get ``ota_update`` on the gateway's cloud command topic, as the
bridge's router hands it over. Three rows:

- ``ota.update_time``: seconds from the commands to the last of N nodes running the release and
  acknowledged on it (N = ``Sizes.ota_nodes``), vs N times the seconds one node alone takes
  (one node after the other, same gateway, same release).
- ``ota.uplink_bytes``: the bytes of the release that crossed the uplink to the gateway (the
  bundle, once per gateway), vs N times the bundle (each node sent the release over the uplink).
- ``ota.heap_downloading``: the smallest free heap (``TERN stats``' ``mem_free``, after
  ``gc.collect()``) the nodes report at the boot that downloads, vs the smallest they report
  at the boot before it, idle on the flashed firmware.
"""

from __future__ import annotations

import re
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tern.core import commands, ota_wire, topics
from tern.core.commands import Command
from tern.harness.bench.common import BenchError, Measurement
from tern.harness.bench.lab import Lab

RELEASE = "0.9.0"
INTERVAL_MS = 50
GATEWAY = "gw-bench-ota"
SITE = "bench-ota"
STATS = re.compile(r"^TERN stats .*\bmem_free=(\d+)", re.M)


def bench_ota(lab: Lab) -> list[Measurement]:
    """The three ``ota.*`` rows."""
    from tern.device.emulate import EmulatedNode, firmware_dir
    from tern.device.release import build_release, make_keys
    from tern.edge.config import GatewayConfig
    from tern.edge.service import Gateway
    from tern.cloud.release_cli import send_release

    count = lab.sizes.ota_nodes
    deadline = lab.sizes.deadline_s
    work = lab.folder("ota")
    with ExitStack() as stack:
        pi, cloud = lab.mosquitto(stack, "ota-pi"), lab.mosquitto(stack, "ota-cloud")
        make_keys(work / "fleet.key", work / "fleet.pub", height=2)
        build_release(firmware_dir(), RELEASE, work / "rel", work / "fleet.key")
        gateway = Gateway(GatewayConfig(gateway_id=GATEWAY, local_broker=pi.address, cloud_broker=cloud.address,
                                        outbox_path=work / "gw" / "outbox.db", ota_key=str(work / "fleet.pub"),
                                        reconnect_max_s=1.0, stop_timeout_s=0.5,
                                        # No bridge confirms its batches here: nothing to send again.
                                        confirm_timeout_s=3600))
        stack.callback(gateway.stop)
        gateway.start()
        if not gateway.wait_connected(deadline):
            raise BenchError("ota: the gateway did not connect to its brokers")
        send_release(work / "rel", [GATEWAY], cloud.host, cloud.port)
        _wait(lambda: RELEASE in gateway.releases.versions(), deadline, "the release stored on the gateway")
        files = {p.name: p.read_bytes() for p in (work / "rel").iterdir()}
        bundle = len(ota_wire.encode_bundle(files))

        def fleet(prefix: str, n: int) -> list:
            nodes = []
            for i in range(n):
                node = EmulatedNode(work / f"{prefix}-{i}", device=f"{prefix}-{i}", site=SITE, broker=pi.address,
                                    interval_ms=INTERVAL_MS, ota_key=work / "fleet.pub")
                stack.callback(node.kill)
                nodes.append(node.start())
            return nodes

        alone = _update(fleet("ota-one", 1), cloud, deadline)
        many_nodes = fleet("ota-many", count)
        many = _update(many_nodes, cloud, deadline)
        chunk_bytes = gateway.stats()["ota_chunk_bytes"]
        idle = min(_heap(n, downloading=False) for n in many_nodes)
        downloading = min(_heap(n, downloading=True) for n in many_nodes)
    return [
        Measurement("ota.update_time", "ota", "s", many, alone * count,
                    f"seconds to update {count} nodes at once (commands to the last acked reading on {RELEASE})",
                    f"{count} x one node alone ({alone:.1f} s)", count,
                    details={"one_node_s": round(alone, 2), "chunk_bytes_served": chunk_bytes}),
        Measurement("ota.uplink_bytes", "ota", "bytes", bundle, bundle * count,
                    "release bytes over the uplink to one gateway (the bundle, once)",
                    f"the release sent to each of {count} nodes over the uplink", count,
                    details={"bundle_bytes": bundle, "chunk_bytes_on_the_pi": chunk_bytes}),
        Measurement("ota.heap_downloading", "ota", "bytes", downloading, idle,
                    "least free heap a node reports while downloading (100K heap, .mpy)",
                    "least free heap at the boot before, idle", count),
    ]


def _wait(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise BenchError(f"ota: {what}: not within {timeout:.0f} s")
        time.sleep(interval)


def _send(cloud, nodes: list) -> None:
    """``ota_update`` for each node, QoS 1 on the gateway's command topic (as the bridge's router)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ota-{uuid.uuid4().hex[:6]}")
    client.connect(cloud.host, cloud.port)
    client.loop_start()
    try:
        infos = [client.publish(topics.gateway_command_topic(GATEWAY),
                                commands.encode_command(Command(f"u-{uuid.uuid4().hex[:8]}", node.device, "ota_update",
                                                                {"version": RELEASE})), qos=1)
                 for node in nodes]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def _on_release(node) -> bool:
    """Running the release, with a reading acknowledged on it (the boot proved itself)."""
    text = node.log_text()
    at = text.rfind(f" {node.device} {RELEASE}\n")
    return at >= 0 and "TERN acked " in text[at:]


def _update(nodes: list, cloud, deadline: float) -> float:
    """Seconds from the commands to every node of ``nodes`` on the release."""
    for node in nodes:
        if not node.wait_connected(deadline):
            raise BenchError(f"ota: {node.device} did not connect: {node.tail}")
    # An idle boot to compare the download's heap with: a few stats lines first.
    _wait(lambda: all(len(STATS.findall(n.log_text())) >= 3 for n in nodes), deadline, "idle stats lines")
    began = time.monotonic()
    _send(cloud, nodes)
    _wait(lambda: all(_on_release(n) for n in nodes), deadline, f"{len(nodes)} node(s) on {RELEASE}", 0.02)
    return time.monotonic() - began


def _heap(node, *, downloading: bool) -> int:
    """The least ``mem_free`` of the node's boot that downloaded (it asks for chunks: ``ota
    want``), or of the boot before it."""
    boots = node.log_text().split("TERN boot ")
    at = next((i for i, b in enumerate(boots) if "TERN ota want " in b), None)
    if at is None or at < 1:
        raise BenchError(f"ota: {node.device} logged no download boot")
    found = [int(m) for m in STATS.findall(boots[at if downloading else at - 1])]
    if not found:
        raise BenchError(f"ota: {node.device}: no stats line in its {'download' if downloading else 'idle'} boot")
    return min(found)

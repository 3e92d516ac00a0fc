"""Over-the-air transport from outside: what a release costs in requests, what a node's console
says it asked for, sent per boot and ran, a command or bundle published where the bridge would,
and what a rollout left in Kafka."""

from __future__ import annotations

import math
import re
from pathlib import Path

from tern.cloud.consume import read_all
from tern.cloud.reader import decode_record
from tern.core import commands, ota_wire, topics
from tern.core.commands import Command
from tern.device import EmulatedNode
from tern.device.emulate import firmware_dir
from tern.device.release import build_release, make_keys
from tern.harness.stack import Mosquitto

from .observe import publish_acked


def requests_for(folder: Path) -> int:
    """Chunk requests a fresh download of the release in ``folder`` takes: one per chunk, plus
    one for the manifest's and the signature's end (an empty chunk gives their size)."""
    manifest = ota_wire.parse_manifest((folder / ota_wire.MANIFEST).read_bytes())
    sizes = [(folder / name).stat().st_size for name in manifest.names()]
    chunks = [max(1, math.ceil(n / manifest.chunk)) for n in sizes]
    exact = sum(1 for n in sizes[:2] if n % manifest.chunk == 0)   # their end needs one more ask
    return sum(chunks) + exact


def wants(node: EmulatedNode) -> list[tuple[int, int]]:
    """Every (file index, offset) the node asked for, across its boots, in order."""
    return [(int(i), int(o)) for i, o in re.findall(r"^TERN ota want (\d+) (\d+)$", node.log_text(), re.M)]


def sent_per_boot(node: EmulatedNode) -> dict[str, int]:
    """The highest seq each boot published (its ``TERN sent`` lines), by boot id."""
    out: dict[str, int] = {}
    boot = None
    for line in node.log_text().splitlines():
        if line.startswith("TERN boot "):
            boot = line.split()[2]
        elif line.startswith("TERN sent ") and boot is not None:
            out[boot] = max(out.get(boot, 0), int(line.split()[2]))
    return out


def fleet_keys(folder: Path, height: int = 3, other: bool = False) -> dict[str, Path]:
    """A fleet key pair in ``folder`` (``key``, ``pub``) and, with ``other``, a second one
    (``other``, ``other_pub``) for signatures the fleet must refuse."""
    make_keys(folder / "fleet.key", folder / "fleet.pub", height=height)
    keys = {"key": folder / "fleet.key", "pub": folder / "fleet.pub"}
    if other:
        make_keys(folder / "other.key", folder / "other.pub", height=height)
        keys.update(other=folder / "other.key", other_pub=folder / "other.pub")
    return keys


def firmware_release(keys: dict[str, Path], folder: Path, version: str) -> Path:
    """The firmware in this tree built and signed as release ``version``, in ``folder/version``."""
    out = folder / version
    build_release(firmware_dir(), version, out, keys["key"])
    return out


def publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    """Publish one QoS 1 message and wait for the broker's PUBACK."""
    publish_acked(broker, [(topic, payload)])


def send_command(cloud: Mosquitto, gateway: str, command: Command) -> None:
    """A command on the gateway's command topic, as the bridge's router hands it over."""
    publish(cloud, topics.gateway_command_topic(gateway), commands.encode_command(command))


def command_lines(node: EmulatedNode, name: str) -> int:
    """How many commands called ``name`` the node ran, across its boots (``TERN cmd <id> <name> ...``)."""
    return len(re.findall(rf"^TERN cmd \S+ {re.escape(name)} ", node.log_text(), re.M))


def kafka_values(bootstrap: str, topic: str, kind: str) -> list[dict]:
    """The values of the records of ``kind`` (the reader's: ``status``, ``ota``, ...) in ``topic``,
    in partition and offset order (so each device's in the order they were written)."""
    records = sorted(read_all(bootstrap, topic, timeout_s=5), key=lambda r: (r.partition, r.offset))
    decoded = [decode_record(r.topic, r.partition, r.offset, None, r.raw, (), 0) for r in records]
    return [d.value for d in decoded if d.kind == kind and d.value is not None]

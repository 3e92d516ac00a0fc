"""A pipelined site driven through the gateway's own outbox API: readings fed in chunks, a
gateway config for it, and Kafka read back per device (none missing, in order)."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Callable

from tern.cloud.consume import ConsumedRecord
from tern.core import codec
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto

BOOT = "b1e55ed0"
SITE = "site-p"


def readings(devices: list[str], first_seq: int, per_device: int) -> list[codec.Reading]:
    """``per_device`` readings per device, interleaved as a busy site sends them."""
    now = int(time.time() * 1000)
    return [
        codec.Reading(device=dev, boot=BOOT, seq=seq, ts_ms=now, values={"t": 20.0 + seq / 100, "n": seq}, site=SITE)
        for seq in range(first_seq, first_seq + per_device)
        for dev in devices
    ]


def feed(gateway: Gateway, devices: list[str], per_device: int, chunk: int = 25, start: int = 0,
         pause: float = 0.0, during: Callable[[int], None] | None = None) -> None:
    """Commit readings to the gateway's outbox in chunks of ``chunk`` per device."""
    for first in range(start, start + per_device, chunk):
        gateway.outbox.add(readings(devices, first, min(chunk, start + per_device - first)))
        if during is not None:
            during(first)
        if pause:
            time.sleep(pause)


def pipeline_gateway_config(tmp: Path, local: Mosquitto, cloud: Mosquitto, **options) -> GatewayConfig:
    options.setdefault("reconnect_max_s", 1.0)
    return GatewayConfig(
        gateway_id=f"gw-{uuid.uuid4().hex[:6]}",
        local_broker=local.address,
        cloud_broker=cloud.address,
        outbox_path=tmp / "outbox.db",
        **options,
    )


def by_device(records: list[ConsumedRecord]) -> dict[str, list[int]]:
    """Each device's seqs in Kafka offset order (a device is in one partition)."""
    out: dict[str, list[ConsumedRecord]] = defaultdict(list)
    for rec in records:
        assert rec.value is not None, rec.decode_error
        out[rec.key].append(rec)
    for device, recs in out.items():
        assert len({r.partition for r in recs}) == 1, f"{device} spread over partitions"
    return {device: [r.value["seq"] for r in sorted(recs, key=lambda r: r.offset)] for device, recs in out.items()}


def assert_complete_in_order(records: list[ConsumedRecord], devices: list[str], per_device: int) -> None:
    """Every reading is there, and each device's first occurrences are in seq order (a batch
    written again after a lost confirm may repeat records; consumers de-duplicate)."""
    seqs = by_device(records)
    assert sorted(seqs) == sorted(devices)
    for device, got in seqs.items():
        first: list[int] = []
        seen: set[int] = set()
        for seq in got:
            if seq not in seen:
                seen.add(seq)
                first.append(seq)
        assert first == list(range(per_device)), f"{device}: missing or out of order: {first[:20]}..."


def outbox_empty(gateway: Gateway) -> bool:
    """True once the gateway's outbox holds no reading."""
    return gateway.outbox.pending() == 0

"""SD-card wear as a number: bytes the gateway writes to disk per reading (issue 27).

A gateway in a process of its own takes ``wear_readings`` readings from paho node connections
(per-reading JSON at QoS 1, as the firmware sends them) in two parts:

- **ingest**: its cloud side has no bridge (nothing is confirmed): the bytes written from the
  first publish until every reading is committed (``pending`` counts them all) are what the
  outbox costs per reading stored;
- **drain**: then the bridge's stand-in confirms on the cloud broker: the bytes written until
  the outbox is empty again are what sending and deleting them costs.

Bytes are the kernel's ``write_bytes`` of the gateway process (``/proc/PID/io``): pages it
dirtied in the page cache, i.e. what writeback sends to the block device (WAL frames, the
checkpoints into the database file), before the file system's own journal and the card's
flash translation layer, which only add to it. The baseline is the reading's own size: the
bytes of its payload as the node sends it. The ratio is the write amplification.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from tern.harness.bench.common import BenchError, ConfirmingStandIn, Measurement
from tern.harness.bench.drain import gateway_config
from tern.harness.bench.growth import INGEST_CONNECTIONS, INGEST_DEVICES
from tern.harness.bench.lab import Lab
from tern.harness.bench.live import require_connected
from tern.harness.bench.nodes import NodeFleet, fleet_messages
from tern.harness.bench.proc import Child


def wear_round(lab: Lab) -> dict[str, Any]:
    """Bytes written by the gateway for ``wear_readings`` readings: ingest, then drain."""
    count = lab.sizes.wear_readings
    messages = fleet_messages(count, INGEST_DEVICES)
    payload = sum(len(m[2]) for m in messages)
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        gateway = Child("gateway", gateway_config(lab, local, cloud, lab.folder("wear-gw") / "outbox.db", "wear"))
        stack.callback(gateway.stop)
        require_connected(gateway)
        before = gateway.io()
        if "write_bytes" not in before:
            raise BenchError("wear: this kernel keeps no /proc/PID/io write_bytes for the gateway process")
        fleet = NodeFleet(local.host, local.port, INGEST_CONNECTIONS)
        stack.callback(fleet.close)
        start = time.time()
        fleet.publish_all(messages)
        gateway.wait_for(lambda s: s.get("committed", 0) >= count and s.get("pending", 0) >= count,
                         lab.sizes.deadline_s, f"wear: {count} readings committed")
        ingested = gateway.io()
        standin = ConfirmingStandIn(cloud.host, cloud.port, gateway.ready_info["settings"]["gateway_id"])
        stack.callback(standin.close)
        gateway.wait_for(lambda s: s.get("pending", 1) == 0 and s.get("forwarded", 0) >= count,
                         lab.sizes.deadline_s, f"wear: {count} readings confirmed and deleted")
        drained = gateway.io()
        seconds = time.time() - start
    return {"count": count, "payload_bytes": payload, "seconds": round(seconds, 3),
            "ingest_write_bytes": ingested["write_bytes"] - before["write_bytes"],
            "ingest_wchar": ingested.get("wchar", 0) - before.get("wchar", 0),
            "drain_write_bytes": drained["write_bytes"] - ingested["write_bytes"],
            "drain_wchar": drained.get("wchar", 0) - ingested.get("wchar", 0)}


def bench_wear(lab: Lab) -> list[Measurement]:
    """Bytes written to disk per reading, at ingest and at drain, against the payload's size."""
    r = wear_round(lab)
    count = r["count"]
    per_payload = r["payload_bytes"] / count
    source = f"{count:,} readings from {INGEST_CONNECTIONS} paho node connections, gateway's /proc/PID/io write_bytes"
    return [
        Measurement(name="wear.ingest_bytes", benchmark="wear", unit="bytes/reading",
                    figure=r["ingest_write_bytes"] / count, baseline=per_payload,
                    what=f"bytes written to disk per reading stored (outbox WAL + checkpoints): {source}, until all committed",
                    baseline_what="the reading's payload as the node sends it (per-reading JSON)", count=count, details=r),
        Measurement(name="wear.drain_bytes", benchmark="wear", unit="bytes/reading",
                    figure=r["drain_write_bytes"] / count, baseline=per_payload,
                    what=f"bytes written to disk per reading sent and deleted after its confirm: {source}",
                    baseline_what="the reading's payload as the node sends it", count=count, details=r),
    ]

"""Scale-out: 1, 2 and 3 bridge processes on one shared subscription, draining three gateways.

Each round starts ``k`` bridge processes in one share group (``$share/<group>/...``, the
bridge's ``share_group`` setting) and three gateway processes, each on its own copy of a
``scale_readings`` backlog; timed from the first gateway's start until every outbox is empty,
then every reading is read back (per gateway, each device in order).

On the 2-core machines of this project, ``k`` bridges, three gateways, four brokers and Kafka
share two cores, so the figure shows whether the share group splits the work without loss,
not how far it scales on real hardware.

Several bridges write the same partitions at once here, which Tansu does not keep: it loses a
few acknowledged records under concurrent producers (``python -m tern.harness.tansu_probe``,
docs/kafka.md; 400 of 150,000 in this stage once). So the stage runs on the run's 3-node
Apache Kafka cluster (started here, warmed up, and left running for the ``apache`` stage after
it, which stops it), and is skipped, with that reason, where no cluster is started (``--quick``).

Skipped, with the reason shown, while :class:`tern.cloud.config.BridgeConfig` has no
``share_group`` field.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from contextlib import ExitStack
from typing import Any

from tern.harness.bench.common import Measurement, skipped
from tern.harness.bench.drain import bridge_config, copy_outbox, fill_outbox, gateway_config
from tern.harness.bench.kafka_check import check_topic
from tern.harness.bench.lab import Lab
from tern.harness.bench.proc import Child

log = logging.getLogger(__name__)

GATEWAYS = 3
SHARE_KEY = "share_group"


def share_key() -> str | None:
    """The BridgeConfig field naming the shared-subscription group (``share_group``, or the
    first field with ``share`` in its name), or None when the bridge has none."""
    from tern.cloud.config import BridgeConfig

    names = [f.name for f in dataclasses.fields(BridgeConfig)]
    if SHARE_KEY in names:
        return SHARE_KEY
    return next((n for n in names if "share" in n), None)


def scale_round(lab: Lab, bridges: int, key: str) -> dict[str, Any]:
    """One drain of three gateways' backlogs through ``bridges`` bridge processes in group ``key``."""
    count = lab.sizes.scale_readings
    total = count * GATEWAYS
    if "scale_template" not in lab.cache:
        path = lab.folder("scale-template") / "outbox.db"
        fill_outbox(path, count)
        lab.cache["scale_template"] = path
    readings, status, deadletter = lab.kafka_topics(f"scale{bridges}", f"scale{bridges}-status", f"scale{bridges}-dl")
    group = f"bench-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        cloud = lab.mosquitto(stack, "cloud")
        children = []
        for i in range(bridges):
            child = Child("bridge", bridge_config(lab, cloud, f"scale{i}", readings, status, deadletter, **{key: group}))
            stack.callback(child.stop)
            children.append(child)
        gateways = []
        for i in range(GATEWAYS):
            local = lab.mosquitto(stack, f"local{i}")
            outbox = copy_outbox(lab.cache["scale_template"], lab.folder(f"scale-gw{i}"))  # type: ignore[arg-type]
            gateway = Child("gateway", gateway_config(lab, local, cloud, outbox, f"scale{i}"))
            stack.callback(gateway.stop)
            gateways.append(gateway)
        ends = [g.wait_for(lambda s: s.get("pending", 1) == 0,
                           lab.sizes.deadline_s, f"scale-out drain ({bridges} bridges)") for g in gateways]
        start = min(g.ready_t for g in gateways)
        # The bridges' stats lines trail the confirms by up to one period: let them catch up.
        deadline = time.monotonic() + 5
        while sum(c.get("records_written") for c in children) < total and time.monotonic() < deadline:
            time.sleep(0.01)
        split = [c.get("records_written") for c in children]
    check = check_topic(lab.kafka(), readings, total, lab.sizes.deadline_s)
    check.require(total, f"scale-out with {bridges} bridges")
    seconds = max(max(ends) - start, 1e-6)
    if bridges > 1 and sum(1 for n in split if n) < 2:
        # Not an error of the data (all of it is in Kafka), but the group did not split the work.
        log.warning("scale-out: %d bridges, records written per bridge %s", bridges, split)
    return {"rate": total / seconds, "seconds": round(seconds, 3), "records_per_bridge": split, "share_key": key,
            **check.as_json()}


def bench_scaleout(lab: Lab) -> list[Measurement]:
    """Drain rate with 2 and 3 bridges on a shared subscription vs 1 bridge."""
    what = "3 gateways' backlogs -> cloud mosquitto -> {k} bridge processes on $share/<group> -> Kafka"
    base_what = "the same with 1 bridge process"
    key = share_key()
    if key is None:
        reason = ("BridgeConfig has no share_group setting yet (issue 13's shared subscription is not in this "
                  "tree), so several bridges would each take every batch")
        return [skipped(f"scaleout.{k}_bridges", "scaleout", "readings/s", what.format(k=k), base_what, reason)
                for k in (2, 3)]
    from tern.harness.bench.apache import warm_up, why_not

    reason = why_not(lab, "scaleout")
    if reason:
        reason = ("several bridges write the same partitions at once, and Tansu loses acknowledged records "
                  f"under concurrent producers (docs/kafka.md), so this stage needs Apache Kafka; {reason}")
        return [skipped(f"scaleout.{k}_bridges", "scaleout", "readings/s", what.format(k=k), base_what, reason)
                for k in (2, 3)]
    with lab.on_apache():
        warm_up(lab)  # a cold JVM would slow the first (1-bridge) round: the baseline
        results = {k: scale_round(lab, k, key) for k in (1, 2, 3)}
        kind = lab.current_kind
    count = lab.sizes.scale_readings * GATEWAYS
    details = {str(k): v for k, v in results.items()}
    details["kafka"] = kind
    return [Measurement(name=f"scaleout.{k}_bridges", benchmark="scaleout", unit="readings/s",
                        figure=results[k]["rate"], baseline=results[1]["rate"], what=what.format(k=k),
                        baseline_what=base_what, count=count, details=details if k == 3 else {},
                        rounds=[results[k]["rate"]], baseline_rounds=[results[1]["rate"]])
            for k in (2, 3)]


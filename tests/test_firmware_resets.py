"""Unacked readings outlive resets: the real firmware (MicroPython unix port) → Pi mosquitto →
gateway (SQLite outbox) → cloud mosquitto → bridge → Kafka (Tansu), all real.

A fault proxy sits between the node and the Pi broker, so the node loses the gateway while
everything behind it keeps running. What the node could not deliver goes to its flash spill
(append-only segment files in its flash folder); these tests check what Kafka ends up with.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from tern.harness.faultproxy import FaultProxy
from tern.core import codec
from tern.device.emulate import EmulatedNode
from tern.harness.observe import KafkaTail, wait_until

from helpers import kafka_seqs, kafka_statuses

SITE = "site-rst"


def spilled_seqs(flash: Path, boot: str) -> list[int]:
    """What the node's flash spill holds for ``boot`` (read while the node is frozen)."""
    out = []
    for seg in sorted(flash.glob("spill.[0-9]*"), key=lambda p: int(p.suffix[1:])):
        for line in seg.read_bytes().splitlines(keepends=True):
            if not line.endswith(b"\n"):
                continue  # being written (the firmware skips a torn line too)
            b, seq, _ = line.split(b" ", 2)
            if b.decode() == boot:
                out.append(int(seq))
    return out


def test_watchdog_reset_delivers_unacked_readings_under_their_old_boot(firmware_pipeline) -> None:
    proxy: FaultProxy = firmware_pipeline["proxy"]
    tail: KafkaTail = firmware_pipeline["tail"]
    node = EmulatedNode(
        firmware_pipeline["tmp"] / "wdt-1", device="wdt-1", site=SITE, broker=proxy.address, interval_ms=100, max_readings=80,
        extra_config={"wdt_ms": 2000, "keepalive": 10},
    )
    try:
        node.start()
        assert node.wait_for(lambda n: n.acked >= 5, 30), node.log_text()
        boot1 = node.boot
        proxy.set_mode("refuse")  # the gateway is gone: what follows is unacked
        assert node.wait_for(lambda n: any(line.startswith("TERN disconnected") for line in n.tail), 20), node.log_text()
        assert node.wait_for(lambda n: len(spilled_seqs(n.workdir, boot1)) >= 15, 30), node.log_text()

        # The node hangs (a stuck driver, say) past its watchdog: frozen, nothing runs.
        os.kill(node.process.pid, signal.SIGSTOP)
        frozen = spilled_seqs(node.workdir, boot1)
        time.sleep(2.5)  # the hang itself: longer than wdt_ms
        proxy.set_mode("pass")
        os.kill(node.process.pid, signal.SIGCONT)
        assert node.wait_for(lambda n: n.boots >= 2 and n.boot != boot1, 20), node.log_text()
        assert list(node.reset_causes) == ["WDT_RESET"], node.log_text()
        last1 = frozen[-1]
        assert frozen == list(range(frozen[0], last1 + 1))

        boot2 = node.boot
        # Every reading of the old boot reaches Kafka under its old (boot, seq), and before
        # any reading of the new boot (one partition per device: Kafka order is delivery order).
        assert wait_until(lambda: kafka_seqs(tail, "wdt-1", boot1) == list(range(1, last1 + 1)), 60), (
            kafka_seqs(tail, "wdt-1", boot1), last1, node.log_text())
        assert wait_until(lambda: kafka_seqs(tail, "wdt-1", boot2) == list(range(1, 81)), 60), kafka_seqs(tail, "wdt-1", boot2)
        order = [identity[1] for identity, _, _ in tail.records() if identity[0] == "wdt-1"]
        last_old = max(i for i, b in enumerate(order) if b == boot1)
        first_new = order.index(boot2)
        assert last_old < first_new, "the old boot's backlog must come before the new boot's readings"
        assert node.replayed >= len(frozen) and node.replay_messages < node.replayed, "a backlog goes in bundles"

        births = [v for v in kafka_statuses(firmware_pipeline["kafka"], firmware_pipeline["status_topic"], "wdt-1") if v["boot"] == boot2]
        assert births and births[0]["reset"] == "WDT_RESET" and "dropped" not in births[0]
        assert wait_until(lambda: not list(node.workdir.glob("spill.[0-9]*")), 10), "acked spill segments are deleted"
    finally:
        node.kill()


def test_offline_reset_keeps_readings_and_an_overflow_reports_its_drops_to_kafka(firmware_pipeline) -> None:
    proxy: FaultProxy = firmware_pipeline["proxy"]
    tail: KafkaTail = firmware_pipeline["tail"]
    # A tiny spill (4 segments of 4 readings) so a 4 s outage at 10 readings/s overflows it.
    node = EmulatedNode(
        firmware_pipeline["tmp"] / "off-1", device="off-1", site=SITE, broker=proxy.address, interval_ms=100, max_readings=300,
        extra_config={"offline_reset_s": 4, "ring_size": 8, "spill_max": 16, "spill_seg": 4, "keepalive": 10,
                      "backoff_min_ms": 100, "backoff_max_ms": 1000},
    )
    try:
        node.start()
        assert node.wait_for(lambda n: n.acked >= 5, 30), node.log_text()
        boot1 = node.boot
        proxy.set_mode("refuse")
        assert node.wait_for(lambda n: any("offline too long" in line for line in n.tail), 30), node.log_text()
        proxy.set_mode("pass")
        assert node.wait_for(lambda n: n.boot != boot1 and n.connects >= 1, 30), node.log_text()
        assert list(node.reset_causes) == ["SOFT_RESET"]
        boot2 = node.boot
        text = node.log_text()
        last1 = int(re.search(r"TERN error offline too long, resetting at seq (\d+)", text).group(1))
        dropped = sum(int(n) for n in re.findall(r"TERN spill_dropped (\d+)", text))
        assert dropped > 0, text

        # The reset cause and the drop counts reach Kafka in the new boot's birth.
        def birth() -> dict | None:
            for v in kafka_statuses(firmware_pipeline["kafka"], firmware_pipeline["status_topic"], "off-1"):
                if v["boot"] == boot2 and v["state"] == "online":
                    return v
            return None

        assert wait_until(lambda: birth() is not None, 60)
        told = birth()
        assert told["reset"] == "SOFT_RESET"
        assert set(told["dropped"]) <= {boot1, boot2} and sum(told["dropped"].values()) == dropped, (told, dropped)
        lost1 = told["dropped"][boot1]

        # What survived: every live reading before the outage and the newest of the offline
        # ones; the oldest offline ones went first, as many as reported. (On a slow machine the
        # new boot's own offline readings may push out all of the old boot's.) A reading the
        # gateway committed just before the cut, whose node ack the cut connection never
        # delivered (acks are coalesced, up to 100 ms), is counted dropped by the node and still
        # arrives: the report may over-count by such readings, a loss it never hides.
        # The spill replays oldest first, on one partition: once a reading of the new boot is
        # in Kafka, every surviving one of the old boot is there too. (Counting alone could stop
        # early: an over-counted reading makes the count reach last1 - lost1 one reading sooner.)
        def settled() -> bool:
            return bool(kafka_seqs(tail, "off-1", boot2)) and len(kafka_seqs(tail, "off-1", boot1)) >= last1 - lost1

        assert wait_until(settled, 60), (len(kafka_seqs(tail, "off-1", boot1)), last1, lost1, told)
        got = kafka_seqs(tail, "off-1", boot1)
        extra = len(got) - (last1 - lost1)
        assert 0 <= extra <= 3, (extra, got, last1, lost1)
        assert got == sorted(got) and got[0] == 1 and got[-1] <= last1
        gaps = [(a, b) for a, b in zip(got, got[1:]) if b != a + 1]
        if got[-1] == last1:
            assert len(gaps) == 1 and gaps[0][1] - gaps[0][0] - 1 == lost1 - extra, (gaps, extra)
        else:  # every offline reading of the old boot went: one run from 1
            assert not gaps and got[-1] == last1 - lost1 + extra, got
        # The new boot: whatever it lost before it connected went first, then nothing.
        first2 = told["dropped"].get(boot2, 0) + 1
        assert wait_until(lambda: len(kafka_seqs(tail, "off-1", boot2)) >= 20, 60)
        got2 = kafka_seqs(tail, "off-1", boot2)
        assert got2 == list(range(first2, first2 + len(got2))), got2
    finally:
        node.kill()


def test_power_cut_keeps_the_offline_readings_on_flash(firmware_pipeline) -> None:
    proxy: FaultProxy = firmware_pipeline["proxy"]
    tail: KafkaTail = firmware_pipeline["tail"]
    node = EmulatedNode(
        firmware_pipeline["tmp"] / "pwr-1", device="pwr-1", site=SITE, broker=proxy.address, interval_ms=100, max_readings=40,
        extra_config={"keepalive": 10},
    )
    try:
        node.start()
        assert node.wait_for(lambda n: n.acked >= 3, 30), node.log_text()
        boot1 = node.boot
        proxy.set_mode("refuse")
        assert node.wait_for(lambda n: len(spilled_seqs(n.workdir, boot1)) >= 10, 30), node.log_text()
        node.kill()  # the battery falls out: no code runs, RTC memory is gone
        on_flash = spilled_seqs(node.workdir, boot1)
        proxy.set_mode("pass")
        node.start()  # power on: same flash folder
        assert node.wait_for(lambda n: n.boot != boot1 and n.connects >= 1, 30), node.log_text()
        assert wait_until(lambda: set(on_flash) <= set(kafka_seqs(tail, "pwr-1", boot1)), 60), (on_flash, node.log_text())
        got = kafka_seqs(tail, "pwr-1", boot1)
        assert got == list(range(1, on_flash[-1] + 1)), got
        births = [v for v in kafka_statuses(firmware_pipeline["kafka"], firmware_pipeline["status_topic"], "pwr-1") if v["boot"] == node.boot]
        assert births and births[0]["reset"] == "PWRON_RESET"
    finally:
        node.kill()


def test_crash_puts_the_ram_ring_on_flash_and_the_next_boot_resends_it(tmp_path: Path, mosquitto) -> None:
    """No gateway, so nothing is acked: the readings sit in the RAM ring when the firmware
    crashes; main.py resets the board, and the new boot sends them under the old boot."""
    import paho.mqtt.client as mqtt

    fault = tmp_path / "fault"
    seen: list[codec.Reading] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, msg: seen.extend(codec.decode_readings(msg.payload, topic_device="crash-1"))
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe("tern/+/crash-1/telemetry", 1)
    client.loop_start()
    node = EmulatedNode(
        tmp_path / "crash-1", device="crash-1", site=SITE, broker=mosquitto.address, interval_ms=100, max_readings=12,
        extra_config={"wdt_ms": 30000}, env={"TERN_EMU_FAULT": str(fault)},
    )
    try:
        node.start()
        assert node.wait_for(lambda n: n.sent >= 12, 30), node.log_text()
        boot1 = node.boot
        assert node.stats.get("ring", 0) >= 10 or node.wait_for(lambda n: n.stats.get("ring", 0) >= 10, 5), node.stats
        fault.write_text("crash")
        assert node.wait_for(lambda n: n.boot != boot1 and n.boots >= 2, 30), node.log_text()
        assert list(node.reset_causes) == ["SOFT_RESET"] and "TERN error crash: RuntimeError" in node.log_text()
        # The new boot replays boot1's 12 readings (in bundles), before any reading of its own.
        def replayed() -> list[int]:
            first = next(i for i, r in enumerate(seen) if r.seq == 12 and r.boot == boot1)
            return [r.seq for r in seen[first + 1:] if r.boot == boot1]

        assert wait_until(lambda: replayed() == list(range(1, 13)), 20), (replayed(), node.log_text())
        boot2 = node.boot
        assert wait_until(lambda: any(r.boot == boot2 for r in seen), 20), node.log_text()
        order = [r.boot for r in seen]
        assert max(i for i, b in enumerate(order) if b == boot1) < order.index(boot2)
    finally:
        node.kill()
        client.loop_stop()
        client.disconnect()

"""Stage 6, firmware: free heap of the real firmware over 3,000 acked publishes on a 100K heap
(an ESP32 without PSRAM) vs ``umqtt.simple`` alone on the same heap, and the same run over TLS
vs over plain MQTT."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from tern.harness.bench.common import (
    FIRMWARE_READINGS,
    QUICK,
    SITE,
    BenchError,
    Measurement,
)
from tern.harness.bench.lab import Lab
from tern.toolchain import micropython_binary, repo_root, umqtt_path

if TYPE_CHECKING:
    from tern.harness.stack import BrokerTls

#: The emulated ESP32's heap (tern.device.emulate.DEFAULT_HEAP): no PSRAM.
RUN_HEAP = "100K"
#: Mirrors device_firmware/main.py's import order (one module at a time, collecting in
#: between), then takes readings without a broker: the ring fills and drops the oldest.
FIRMWARE_DRIVER = """\
import gc
import sys
import machine
import tern_config
cfg = tern_config.load()
del tern_config
del sys.modules["tern_config"]
gc.collect()
for _name in ("tern_util", "tern_ring", "umqtt.simple", "tern_cmd", "tern_link", "tern_sensors"):
    __import__(_name)
    gc.collect()
import tern_node
gc.collect()
node = tern_node.Node(cfg)
for _ in range(%d):
    node.take_reading()
gc.collect()
print("BENCH %%d %%d %%d %%d" %% (gc.mem_free(), node.ring.count, node.ring.size, node.ring.dropped))
""" % FIRMWARE_READINGS

UMQTT_DRIVER = """\
import gc
import umqtt.simple
gc.collect()
print("BENCH %d" % gc.mem_free())
"""

EMPTY_DRIVER = """\
import gc
gc.collect()
print("BENCH %d" % gc.mem_free())
"""


def run_micropython(folder: Path, script: str, timeout: float, heap: str = RUN_HEAP,
                    firmware: Path | None = None) -> list[int]:
    """Run ``script`` on the unix port (emulated board, firmware on the path); its BENCH numbers.
    ``firmware``: the folder the firmware modules come from (default the .py sources)."""
    path = folder / "driver.py"
    path.write_text(script)
    root = repo_root()
    env = dict(os.environ, MICROPYPATH=os.pathsep.join(
        [str(root / "hardware" / "emulated"), str(umqtt_path()), str(firmware or root / "device_firmware")]))
    try:
        out = subprocess.run(
            [str(micropython_binary()), "-X", f"heapsize={heap}", str(path)],
            cwd=folder, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"firmware: MicroPython driver did not finish within {timeout:.0f} s") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"firmware: MicroPython driver failed (exit {out.returncode}): {tail[0]}")
    return [int(x) for x in lines[-1].split()[1:]]


def smallest_heap(folder: Path, timeout: float, firmware: Path | None, low: int = 30, high: int = 100) -> int:
    """The smallest heap (KB) on which FIRMWARE_DRIVER runs to the end (binary search)."""
    while low < high:
        mid = (low + high) // 2
        try:
            run_micropython(folder, FIRMWARE_DRIVER, timeout, heap=f"{mid}K", firmware=firmware)
        except BenchError:
            low = mid + 1
        else:
            high = mid
    return low


#: The long run: the whole firmware (main.py) on the emulated board, acked by a plain subscriber.
# 3,000 at the emulated board's ~40 publishes/s: about 75 s of the bench's 10 minutes, and
# 75 heap samples, enough to show growth after warm-up (10,000 took 4.5 minutes).
RUN_PUBLISHES = 3_000
RUN_PUBLISHES_QUICK = 300
RUN_INTERVAL_MS = 10
_STATS = re.compile(r"^TERN stats seq=(\d+) .*mem_free=(\d+)")


class _Acker:
    """Acks every telemetry message like the gateway would (highest seq of its boot)."""

    def __init__(self, host: str, port: int) -> None:
        from tern.harness.bench.common import new_client

        self.ready = threading.Event()
        self.client = new_client("bench-acker")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe("tern/+/+/telemetry", 1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        from tern.core import codec, topics

        where = topics.parse_node_topic(msg.topic)
        last = codec.decode_readings(msg.payload, site=where.site, topic_device=where.device)[-1]
        client.publish(topics.ack_topic(where.site, where.device), codec.encode_node_ack(codec.NodeAck(last.boot, last.seq)), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _tls_files(folder: Path) -> tuple["BrokerTls", Path]:
    """A CA and a broker certificate for 127.0.0.1 issued by it: the broker's TLS listener and
    the CA file the node gets (its ``tls_ca``)."""
    from tern.harness.stack import BrokerTls
    from tern.security import pki

    ca = pki.make_ca("Tern bench CA")
    ca_file, _ = ca.write(folder, "ca")
    cert, key = pki.issue_server(ca, ["127.0.0.1"]).write(folder, "broker")
    return BrokerTls(ca_file, cert, key), ca_file


def heap_run(lab: Lab, publishes: int, *, mpy: bool = True, tls: bool = False) -> dict:
    """Run main.py for ``publishes`` acked publishes on a 100K heap; free heap over time.
    ``mpy``: the firmware as ``tern-device flash`` ships it by default (.mpy); else the sources.
    ``tls``: the node publishes through the broker's TLS listener, checking its certificate
    against a CA on its flash (the acker stays on the plain listener, as the gateway does)."""
    from tern.device.emulate import EmulatedNode

    tag = "-tls" if tls else ""
    with ExitStack() as stack:
        broker_tls, ca_file = _tls_files(lab.folder("fw-pki")) if tls else (None, None)
        broker = lab.mosquitto(stack, "fw-broker" + tag, node_tls=broker_tls)
        acker = _Acker(broker.host, broker.port)
        stack.callback(acker.close)
        if not acker.ready.wait(10):
            raise BenchError("firmware: the acker could not subscribe")
        node = EmulatedNode(lab.folder("fw-node" + tag) / "node", device="bench-node", site=SITE,
                            broker=broker.node_tls_address if tls else broker.address, ca_file=ca_file,
                            interval_ms=RUN_INTERVAL_MS, max_readings=publishes, heap=RUN_HEAP, mpy=mpy)
        node.start()
        stack.callback(node.kill)
        deadline = publishes * RUN_INTERVAL_MS / 1000 * 10 + 120  # a loaded 2-core box runs it at ~25/s
        if not node.wait_for(lambda n: (n.wait_done(0) and n.acked >= publishes) or not n.running, deadline, 0.2):
            raise BenchError(f"firmware: {publishes} publishes not acked within {deadline:.0f} s (sent {node.sent})")
        text = node.log_text()
    if "MemoryError" in text or node.boots != 1:
        raise BenchError(f"firmware: MemoryError or reboot in the {RUN_HEAP} run{tag}: {list(node.errors)[-1:]}")
    if node.acked < publishes:
        raise BenchError(f"firmware: only {node.acked} of {publishes} publishes acked")
    series = [(int(m.group(1)), int(m.group(2))) for m in map(_STATS.match, text.splitlines()) if m]
    if len(series) < 10:
        raise BenchError("firmware: too few heap samples")
    tenth = max(1, len(series) // 10)
    warm = statistics.median(f for _, f in series[tenth:2 * tenth])    # after warm-up (10-20 %)
    end = statistics.median(f for _, f in series[-tenth:])             # the last 10 %
    step = max(1, len(series) // 20)
    return {"publishes": publishes, "acked": node.acked, "free_after_warmup": int(warm), "free_at_end": int(end),
            "growth_after_warmup": int(warm - end), "free_min": min(f for _, f in series),
            "samples": len(series), "free_over_time": series[::step] + series[-1:]}


def bench_firmware(lab: Lab) -> list[Measurement]:
    """Free heap of the running firmware at the end of the long run, and with a full ring,
    vs with only umqtt.simple imported on the same heap."""
    folder = lab.folder("firmware")
    (folder / "config.json").write_text(json.dumps(
        {"site": SITE, "device": "bench-node", "broker": "127.0.0.1", "port": 1883, "ntp": False,
         "spill_max": 0}))  # RAM ring only: it must fill and drop
    timeout = lab.sizes.deadline_s
    tern_free, ring_count, ring_size, dropped = run_micropython(folder, FIRMWARE_DRIVER, timeout, heap=RUN_HEAP)
    if ring_count != ring_size or dropped != FIRMWARE_READINGS - ring_size:
        raise BenchError(f"firmware: ring not full after {FIRMWARE_READINGS} readings ({ring_count}/{ring_size}, {dropped} dropped)")
    (umqtt_free,) = run_micropython(folder, UMQTT_DRIVER, timeout, heap=RUN_HEAP)
    (empty_free,) = run_micropython(folder, EMPTY_DRIVER, timeout, heap=RUN_HEAP)
    # The same driver with the firmware as .mpy (mpy-cross; tern-device flash's default). Loaded
    # from .mpy the bytecode in RAM is the same as compiled on the board (the same free heap once
    # running); what .mpy removes is the compiler's peak at boot. So the figure is the smallest
    # heap on which the firmware imports, builds the node and fills its ring: .mpy vs .py.
    from tern.device.emulate import firmware_files
    from tern.device.release import board_files

    mpy_dir = next(f.parent for f in board_files(firmware_files(), True) if f.suffix == ".mpy")
    mpy_free, mpy_count, _, _ = run_micropython(folder, FIRMWARE_DRIVER, timeout, heap=RUN_HEAP, firmware=mpy_dir)
    if mpy_count != ring_size:
        raise BenchError(f"firmware: .mpy ring not full ({mpy_count}/{ring_size})")
    need_mpy = smallest_heap(folder, timeout, mpy_dir)
    need_py = smallest_heap(folder, timeout, None)
    mpy_row = Measurement(
        name="firmware.heap_needed_mpy", benchmark="firmware", unit="KB of heap",
        figure=float(need_mpy), baseline=float(need_py),
        what="smallest -X heapsize (1 KB steps) on which the firmware, as .mpy, imports in main.py's order, builds the node and fills its ring",
        baseline_what="the same with the .py sources, compiled on the board",
        count=FIRMWARE_READINGS,
        details={"freed_by_mpy_kb": need_py - need_mpy, "free_running_mpy": mpy_free, "free_running_py": tern_free,
                 "heap": RUN_HEAP},
    )
    # The long run as a board is flashed: .mpy (the .py sources no longer fit the 100K heap next
    # to the OTA boot loader: docs/ota.md).
    publishes = RUN_PUBLISHES_QUICK if lab.sizes == QUICK else RUN_PUBLISHES
    run = heap_run(lab, publishes)
    # The same run over TLS: what the TLS context and connection keep on the MicroPython heap.
    # (mbedtls's own record buffers are malloc'd outside it, as on the ESP32 where they come
    # from ESP-IDF's heap, not MicroPython's.)
    tls_run = heap_run(lab, publishes, tls=True)
    tls_row = Measurement(
        name="firmware.heap_free_tls", benchmark="firmware", unit="bytes free",
        figure=float(tls_run["free_at_end"]), baseline=float(run["free_at_end"]),
        what=f"gc.mem_free() of main.py (firmware as .mpy) at the end of {publishes} acked publishes over TLS "
             f"(the broker's TLS listener, its certificate checked against the CA on flash; {RUN_HEAP} heap, median of the last 10 %)",
        baseline_what="the same run over plain MQTT (firmware.heap_free's figure)",
        count=publishes,
        details={"heap": RUN_HEAP, "tls_cost": run["free_at_end"] - tls_run["free_at_end"],
                 **{k: v for k, v in tls_run.items() if k != "publishes"}},
    )
    return [mpy_row, Measurement(
        name="firmware.heap_free", benchmark="firmware", unit="bytes free",
        figure=float(run["free_at_end"]), baseline=float(umqtt_free),
        what=f"gc.mem_free() of main.py (firmware as .mpy) at the end of {run['publishes']} acked publishes ({RUN_HEAP} heap, median of the last 10 %)",
        baseline_what=f"gc.mem_free() after importing only umqtt.simple ({RUN_HEAP} heap)",
        count=run["publishes"],
        details={"heap": RUN_HEAP, **{k: v for k, v in run.items() if k != "publishes"},
                 "full_ring": {"heap": RUN_HEAP, "free": tern_free, "empty_heap_free": empty_free,
                               "firmware_used": empty_free - tern_free, "umqtt_used": empty_free - umqtt_free,
                               "ring_size": ring_size, "dropped": dropped, "readings": FIRMWARE_READINGS}},
    ), tls_row]

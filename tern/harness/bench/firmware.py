"""Stage 6, firmware: free heap with a full ring vs ``umqtt.simple`` alone."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tern.harness.bench.common import (
    FIRMWARE_HEAP,
    FIRMWARE_READINGS,
    SITE,
    BenchError,
    Measurement,
)
from tern.harness.bench.lab import Lab
from tern.toolchain import micropython_binary, repo_root, umqtt_path

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
for _name in ("tern_util", "tern_ring", "umqtt.simple", "tern_link", "tern_sensors"):
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


def run_micropython(folder: Path, script: str, timeout: float) -> list[int]:
    """Run ``script`` on the unix port (64K heap, emulated board, firmware on the path); its BENCH numbers."""
    path = folder / "driver.py"
    path.write_text(script)
    root = repo_root()
    env = dict(os.environ, MICROPYPATH=os.pathsep.join(
        [str(root / "hardware" / "emulated"), str(umqtt_path()), str(root / "device_firmware")]))
    try:
        out = subprocess.run(
            [str(micropython_binary()), "-X", f"heapsize={FIRMWARE_HEAP}", str(path)],
            cwd=folder, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"firmware: MicroPython driver did not finish within {timeout:.0f} s") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"firmware: MicroPython driver failed (exit {out.returncode}): {tail[0]}")
    return [int(x) for x in lines[-1].split()[1:]]


def bench_firmware(lab: Lab) -> list[Measurement]:
    """Free heap with the firmware loaded and a full ring vs with only umqtt.simple imported."""
    folder = lab.folder("firmware")
    (folder / "config.json").write_text(json.dumps(
        {"site": SITE, "device": "bench-node", "broker": "127.0.0.1", "port": 1883, "ntp": False}))
    timeout = lab.sizes.deadline_s
    tern_free, ring_count, ring_size, dropped = run_micropython(folder, FIRMWARE_DRIVER, timeout)
    if ring_count != ring_size or dropped != FIRMWARE_READINGS - ring_size:
        raise BenchError(f"firmware: ring not full after {FIRMWARE_READINGS} readings ({ring_count}/{ring_size}, {dropped} dropped)")
    (umqtt_free,) = run_micropython(folder, UMQTT_DRIVER, timeout)
    (empty_free,) = run_micropython(folder, EMPTY_DRIVER, timeout)
    return [Measurement(
        name="firmware.heap_free", benchmark="firmware", unit="bytes free",
        figure=float(tern_free), baseline=float(umqtt_free),
        what=f"gc.mem_free() after the firmware's imports + {FIRMWARE_READINGS} readings, ring full ({ring_size})",
        baseline_what="gc.mem_free() after importing only umqtt.simple",
        count=FIRMWARE_READINGS,
        details={"heap": FIRMWARE_HEAP, "empty_heap_free": empty_free, "firmware_used": empty_free - tern_free,
                 "umqtt_used": empty_free - umqtt_free, "ring_size": ring_size, "dropped": dropped},
    )]

# Tern node entry point: load config.json from flash, run the node.
# A bad config stops here with one clear line (no reset loop); an unexpected crash
# resets the board after a short pause so a field node recovers by itself.
import gc
import sys
import time

import machine  # noqa: F401  (built in on a board; first, while the heap is empty, on the emulator)
import tern_config

try:
    cfg = tern_config.load()
except tern_config.ConfigError as e:
    print("TERN error config: %s" % e)
    sys.exit(2)
# The validator is not needed any more: free it before compiling the node (small heaps).
FW_VERSION = tern_config.FW_VERSION
del tern_config
del sys.modules["tern_config"]   # (tern_rules, its value rules, stays for tern_cmd)
gc.collect()
# Compile the big modules one by one, collecting in between: on a small heap, compiling
# them nested inside one another's import fails for want of a contiguous block.
_mods = ["tern_util", "tern_ring", "umqtt.simple", "tern_cmd", "tern_link", "tern_sensors"]
if cfg["spill_max"]:
    _mods.insert(2, "tern_spill")
# Then the sensor protocols configured (imported lazily by the drivers, compiled here
# while the heap is still tidy).
for _spec in cfg["sensors"]:
    _need = ()
    if _spec["type"] == "uart":
        _need = ("tern_uart", "tern_nmea" if _spec.get("protocol") == "nmea" else "tern_pms")
    elif _spec["type"] == "sht3x":
        _need = ("tern_sht3x",)
    for _name in _need:
        if _name not in _mods:
            _mods.append(_name)
for _name in _mods:
    if _name == "tern_cmd":
        # Commands cost ~4 KB (with tern_rules) for good, plus what compiling them takes: on
        # a heap that would keep less than 45 KB here beyond the ring, the node runs without
        # them (and says so) rather than not at all. (A node cannot compile them later: the
        # heap of a running node is too fragmented.)
        _room = gc.mem_free() - cfg["ring_size"] * cfg["ring_slot"]
        if _room < 45000:
            print("TERN error cmd: no memory for commands (%d bytes beyond the ring), running without them" % _room)
            del sys.modules["tern_rules"]
            gc.collect()
            continue
    __import__(_name)
    gc.collect()
del _mods
import tern_node  # noqa: E402

try:
    tern_node.run(cfg, FW_VERSION)
except Exception as e:
    print("TERN error crash: %s %s" % (type(e).__name__, e))
    sys.print_exception(e)
    time.sleep(1)
    import machine
    machine.reset()

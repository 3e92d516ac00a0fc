# Tern node: the firmware proper, started by main.py (the boot loader) from the folder of the
# version that runs. Loads config.json from flash, imports the modules one by one on the
# still-tidy heap, runs the node. A bad config stops here with one clear line (no reset loop);
# an unexpected crash goes back to main.py, which resets the board.
import gc
import os
import sys


def main(ota):
    """Run the node; ``ota`` is what tern_boot.start() found (the version, a trial, a report)."""
    global load
    import tern_config
    try:
        cfg = tern_config.load()
    except tern_config.ConfigError as e:
        print("TERN error config: %s" % e)
        sys.exit(2)
    # The validator is not needed any more: free it before compiling the node (small heaps).
    fw = ota["fw"] or tern_config.FW_VERSION
    del tern_config
    del sys.modules["tern_config"]   # (tern_rules, its value rules, stays for tern_cmd)
    gc.collect()
    load(cfg)
    del load   # its code too is freed before the biggest module is compiled
    gc.collect()
    import tern_node
    tern_node.run(cfg, fw, ota)


def fetching():
    try:
        os.stat("ota/fetch")
        return True
    except OSError:
        return False


def load(cfg):
    """Import the node's modules, one at a time, on the still-tidy heap."""
    # Compile the big modules one by one, collecting in between: on a small heap, compiling
    # them nested inside one another's import fails for want of a contiguous block.
    mods = ["tern_util", "tern_ring", "umqtt.simple", "tern_cmd", "tern_fetch", "tern_link", "tern_sensors"]
    if cfg["spill_max"]:
        mods.insert(2, "tern_spill")
    if cfg["tls_ca"]:
        mods.append("tern_tls")     # (the link imports it at its first connect)
    # Then the sensor protocols configured (imported lazily by the drivers, compiled here
    # while the heap is still tidy).
    for spec in cfg["sensors"]:
        need = ()
        if spec["type"] == "uart":
            need = ("tern_uart", "tern_nmea" if spec.get("protocol") == "nmea" else "tern_pms")
        elif spec["type"] == "sht3x":
            need = ("tern_sht3x",)
        for name in need:
            if name not in mods:
                mods.append(name)
    for name in mods:
        if name == "tern_fetch" and ("tern_cmd" not in sys.modules or not fetching()):
            continue   # only at a boot with a release download to do (tern_cmd's ota_update)
        if name == "tern_cmd":
            # Commands cost ~4 KB (with tern_rules) for good, plus what compiling them takes: on
            # a heap that would keep less than 45 KB here beyond the ring, the node runs without
            # them (and says so) rather than not at all. (A node cannot compile them later: the
            # heap of a running node is too fragmented.)
            room = gc.mem_free() - cfg["ring_size"] * cfg["ring_slot"]
            if room < 45000:
                print("TERN error cmd: no memory for commands (%d bytes beyond the ring), running without them" % room)
                del sys.modules["tern_rules"]
                gc.collect()
                continue
        __import__(name)
        gc.collect()

# Tern node boot loader. It stays on the board when an over-the-air release replaces the
# rest (docs/ota.md), so it is kept small and changes rarely. tern_boot picks the version to
# run (installing a staged release, rolling back one that failed to prove itself) and puts
# its folder first on sys.path; tern_main, from that folder, is the firmware proper.
# An unexpected crash resets the board after a short pause, noted first on a trial boot, so a
# release that cannot start is rolled back within its bound of boots.
import gc
import os
import sys
import time

import machine  # (built in on a board; first, while the heap is empty, on the emulator)

ota = {"fw": "", "trial": 0}
try:
    # No ota/ folder (never updated): the flashed firmware runs, and tern_boot is not even
    # compiled (on the 100 KB board with .py files, its few KB are the margin).
    os.stat("ota")
except OSError:
    pass
else:
    try:
        import tern_boot
        ota = tern_boot.start()
    except Exception as e:   # a damaged ota/ folder must not keep the flashed firmware from running
        print("TERN error ota boot: %s %s" % (type(e).__name__, e))
    if not ota["trial"]:
        sys.modules.pop("tern_boot", None)   # kept on a trial boot only: the node confirms with it
    tern_boot = None
    gc.collect()
try:
    import tern_main
    tern_main.main(ota)
except Exception as e:
    why = "%s %s" % (type(e).__name__, e)
    print("TERN error crash: %s" % why)
    sys.print_exception(e)
    if ota["trial"]:
        sys.modules["tern_boot"].failed(why)
    time.sleep(1)
    machine.reset()

"""Tern's device side on the host: emulated nodes, the simulated serial sensor, flashing.

The firmware itself lives in ``device_firmware/`` (MicroPython, goes onto a board as is);
``hardware/emulated/`` is the board seam for the MicroPython unix port.
"""

from tern.device.emulate import EmulatedNode, Fleet, check_config, firmware_files

__all__ = ["EmulatedNode", "Fleet", "check_config", "firmware_files"]

"""Check a node config's pins against its board's pin map (``hardware/pinmaps.json``).

Each sensor's pins are checked for what the pin must do: an ADC pin must be on ADC1 (ADC2
cannot be read while Wi-Fi is on), I2C lines and a UART's TX must be able to drive (not
input-only), and no sensor may use a flash pin, a strapping pin, the REPL console's UART0
pins, a pin the board reserves, or a pin another sensor already uses. Errors are one line
naming the sensor, the key and the GPIO, and why.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from tern.core.errors import ConfigError
from tern.toolchain import repo_root

#: The firmware drivers' defaults (device_firmware/tern_sensors.py, tern_sht3x.py).
ADC_DEFAULT_PIN = 34
I2C_DEFAULT = {"scl": 18, "sda": 19}


def pinmaps_path():
    """Where the machine-readable pin maps live."""
    return repo_root() / "hardware" / "pinmaps.json"


@lru_cache(maxsize=1)
def pinmaps() -> dict[str, Any]:
    """The parsed pin maps file."""
    return json.loads(pinmaps_path().read_text())


def board_names() -> list[str]:
    """The boards the pin maps know."""
    return sorted(pinmaps()["boards"])


def board_for(board: str | None = None, chip: str = "esp32") -> dict[str, Any]:
    """A board's map by name, or the default board of ``chip``."""
    maps = pinmaps()
    name = board or maps["chips"].get(chip)
    if name not in maps["boards"]:
        raise ConfigError(f"unknown board {board or chip!r}; known: {', '.join(board_names())}")
    return {"id": name, **maps["boards"][name]}


def _gpio_check(board: dict[str, Any], where: str, pin: Any, role: str) -> int:
    """``pin`` if it may serve ``role`` (adc, input, output) on ``board``; else ConfigError."""
    name = board["name"]
    if not isinstance(pin, int) or isinstance(pin, bool) or pin not in board["gpio"]:
        raise ConfigError(f"{where}: GPIO{pin} does not exist on the {name}")
    if pin in board["flash"]:
        raise ConfigError(f"{where}: GPIO{pin} is wired to the module's SPI flash; using it crashes the board")
    if str(pin) in board["console"]:
        raise ConfigError(f"{where}: GPIO{pin} is {board['console'][str(pin)]}; keep it free for flashing and the console")
    if str(pin) in board["reserved"]:
        raise ConfigError(f"{where}: GPIO{pin} is reserved on the {name}: {board['reserved'][str(pin)]}")
    if str(pin) in board["strapping"]:
        raise ConfigError(f"{where}: GPIO{pin} is a strapping pin ({board['strapping'][str(pin)]}); "
                          "a sensor on it can stop the board from booting")
    if role == "adc":
        if pin in board["adc2"]:
            raise ConfigError(f"{where}: GPIO{pin} is on ADC2, which cannot be read while Wi-Fi is on; "
                              f"use an ADC1 pin ({', '.join(f'GPIO{p}' for p in board['adc1'])})")
        if pin not in board["adc1"]:
            raise ConfigError(f"{where}: GPIO{pin} has no ADC; use an ADC1 pin")
    if role == "output" and pin in board["input_only"]:
        raise ConfigError(f"{where}: GPIO{pin} is input-only and cannot drive this line")
    return pin


def check_pins(config: dict[str, Any], board: str | None = None, chip: str = "esp32") -> dict[str, Any]:
    """Raise ConfigError for the first pin in ``config["sensors"]`` the board cannot use that way.

    Returns the board's map. Two I2C sensors on the same bus share its pins; anything else
    sharing a pin is an error.
    """
    bmap = board_for(board, chip)
    used: dict[int, tuple[str, str]] = {}  # pin -> (owner, what)

    def take(where: str, pin: Any, role: str, owner: str) -> None:
        pin = _gpio_check(bmap, where, pin, role)
        if pin in used and used[pin][0] != owner:
            raise ConfigError(f"{where}: GPIO{pin} is already used by {used[pin][1]}")
        used[pin] = (owner, where)

    for i, spec in enumerate(config.get("sensors") or []):
        if not isinstance(spec, dict):
            continue
        kind = spec.get("type")
        where = f"sensors[{i}] ({kind})"
        if kind == "adc":
            take(f"{where}.pin", spec.get("pin", ADC_DEFAULT_PIN), "adc", f"adc{i}")
        elif kind in ("tmp102", "sht3x"):
            bus = spec.get("i2c", 0)
            for key in ("scl", "sda"):
                take(f"{where}.{key}", spec.get(key, I2C_DEFAULT[key]), "output", f"i2c{bus}:{key}")
        elif kind == "uart":
            uart = spec.get("uart", 1)
            if uart == 0:
                raise ConfigError(f"{where}.uart: UART0 carries the REPL console; use UART1 or UART2")
            defaults = bmap["uart_default"].get(str(uart), {})
            for key, role in (("tx", "output"), ("rx", "input")):
                pin = spec.get(key, defaults.get(key))
                if pin is None:
                    raise ConfigError(f"{where}.{key}: UART{uart} has no default {key} pin on the {bmap['name']}; set one")
                label = f"{where}.{key}" + ("" if key in spec else f" (UART{uart}'s default)")
                take(label, pin, role, f"uart{uart}:{key}")
    return bmap

"""Put the firmware onto a real ESP32 (already running MicroPython) with mpremote.

What goes on the board: every ``device_firmware/*.py`` file, a ``config.json`` (the one
given, checked with the firmware's own rules first, or the example), and ``umqtt/`` from
:func:`tern.toolchain.umqtt_path`. Then the board is reset so ``main.py`` runs.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

from tern.device.emulate import check_config, firmware_dir, firmware_files
from tern.core.errors import ConfigError, ToolMissing
from tern.toolchain import umqtt_path


def load_config(path: Path | None) -> Path:
    """Return the config file to flash after validating it; the example if none is given."""
    path = Path(path) if path is not None else firmware_dir() / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    check_config(config)
    return path


def mpremote_commands(port: str, config: Path, mpremote: str = "mpremote") -> list[list[str]]:
    """The mpremote invocations that flash the firmware, in order."""
    umqtt = umqtt_path() / "umqtt"
    connect = [mpremote, "connect", port]
    return [
        connect + ["cp", *[str(f) for f in firmware_files()], ":"],
        connect + ["cp", str(config), ":config.json"],
        connect + ["cp", "-r", str(umqtt), ":"],
        connect + ["reset"],
    ]


def flash(port: str, config: Path | None = None, *, dry_run: bool = False, echo=print) -> int:
    """Flash the board on ``port``; with ``dry_run`` only print the commands. Returns an exit code."""
    config_path = load_config(config)
    mpremote = shutil.which("mpremote")
    if mpremote is None and not dry_run:
        raise ToolMissing("mpremote is not installed: pip install 'tern[device]' (or pip install mpremote)")
    for cmd in mpremote_commands(port, config_path, mpremote or "mpremote"):
        echo(shlex.join(cmd))
        if dry_run:
            continue
        done = subprocess.run(cmd)
        if done.returncode != 0:
            return done.returncode
    return 0

"""Put the firmware onto a board already running MicroPython, with mpremote, and verify it.

What goes on the board: every ``device_firmware/*.py`` file, ``umqtt/`` from
:func:`tern.toolchain.umqtt_path`, and a ``config.json``: the one given, or the example, with
what the command line says (device id, site, Wi-Fi, gateway) laid over it and checked with
the firmware's own rules. Each file is then hashed on the board (sha256) and compared with the
host's copy; the board is reset so ``main.py`` runs.

Before anything is copied the port is probed, so a wrong port, a busy port and a board that
does not answer each get one clear line. ``--micropython-image`` first writes MicroPython
itself with esptool. mpremote and esptool are taken from the environment Tern runs in
(``python -m mpremote``), so an unactivated venv works; PATH is the fallback.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tern.core.errors import CodecError, ConfigError, TernError, ToolMissing
from tern.core.hostport import parse_hostport
from tern.device.emulate import BOARD_CA, check_config, firmware_dir, firmware_files
from tern.device.pins import check_pins
from tern.device.release import ReleaseError, VerifyKey, board_files
from tern.security.mosquitto_auth import AuthError, DeviceAuth
from tern.security.secret_files import write_private
from tern.toolchain import umqtt_path

#: How long a board has to show the raw REPL prompt when probed.
PROBE_TIMEOUT_S = 5.0
#: Where MicroPython's image starts in flash, per chip (Espressif's own tables).
IMAGE_OFFSETS = {"esp32": "0x1000", "esp32s2": "0x1000", "esp32s3": "0x0", "esp32c3": "0x0"}
MQTT_PORT = 1883
#: Where the fleet's OTA verify key goes (device_firmware/tern_ota.py reads it).
BOARD_OTA_KEY = "ota.key"


class FlashError(TernError):
    """Flashing could not go on; the message says why and what to do, in one line."""


# --- tools -----------------------------------------------------------------------------------


def tool_command(name: str) -> list[str]:
    """The command that runs ``name`` (mpremote, esptool) from Tern's own environment first."""
    if importlib.util.find_spec(name) is not None:
        return [sys.executable, "-m", name]
    found = shutil.which(name) or shutil.which(f"{name}.py")
    if found:
        return [found]
    raise ToolMissing(f"{name} is not installed: pip install 'tern[device]' (or pip install {name})")


# --- the config that goes onto the board -----------------------------------------------------


@dataclass(frozen=True)
class Provision:
    """What the command line says about one device; None leaves the base config's value."""

    device_id: str | None = None
    site: str | None = None
    wifi_ssid: str | None = None
    wifi_password: str | None = None
    gateway: str | None = None  # HOST or HOST:PORT of the Pi's mosquitto
    extra: dict[str, Any] = field(default_factory=dict)


def read_config(path: Path | None) -> dict[str, Any]:
    """The base config: ``path``, or the firmware's example ``config.json``."""
    path = Path(path) if path is not None else firmware_dir() / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def build_config(base: dict[str, Any], provision: Provision) -> dict[str, Any]:
    """``base`` with the provisioned values laid over it, validated by the firmware's rules."""
    config = json.loads(json.dumps(base))  # a deep copy of plain JSON
    if provision.device_id is not None:
        config["device"] = provision.device_id
    if provision.site is not None:
        config["site"] = provision.site
    wifi = dict(config.get("wifi") or {})
    if provision.wifi_ssid is not None:
        wifi["ssid"] = provision.wifi_ssid
    if provision.wifi_password is not None:
        wifi["password"] = provision.wifi_password
    config["wifi"] = wifi
    if provision.gateway is not None:
        host, port = parse_hostport(provision.gateway, MQTT_PORT)
        config["broker"], config["port"] = host, port
    config.update(provision.extra)
    check_config(config)
    return config


# --- the port ----------------------------------------------------------------------------------


def probe(port: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Check that ``port`` exists, is free and has MicroPython's raw REPL behind it."""
    import serial  # pyserial, a dependency of mpremote

    if not os.path.exists(port):
        raise FlashError(f"{port}: no such serial port (is the board plugged in? try ls /dev/ttyUSB* /dev/ttyACM*)")
    try:
        link = serial.Serial(port, 115200, timeout=0.1, exclusive=True)
    except serial.SerialException as exc:
        if isinstance(exc.__cause__, BlockingIOError) or getattr(exc, "errno", None) in (errno.EAGAIN, errno.EBUSY) \
                or "lock" in str(exc).lower():
            raise FlashError(f"{port} is busy: another program has it open "
                             f"(a serial monitor, screen, minicom or another mpremote); close it and retry") from None
        if getattr(exc, "errno", None) == errno.EACCES:
            raise FlashError(f"{port}: permission denied (add your user to the dialout group)") from None
        raise FlashError(f"{port}: cannot open: {exc}") from None
    try:
        link.write(b"\r\x03\x03\r\x01")  # interrupt whatever runs, then Ctrl-A: raw REPL
        seen = bytearray()
        deadline = time.monotonic() + timeout
        while b"raw REPL; CTRL-B to exit" not in seen and time.monotonic() < deadline:
            seen.extend(link.read(256))
        if b"raw REPL; CTRL-B to exit" not in seen:
            raise FlashError(f"the board on {port} does not answer (no MicroPython REPL within {timeout:.0f} s): "
                             f"is MicroPython on it? --micropython-image FILE writes it first")
        link.write(b"\r\x02")  # back to the friendly REPL
    finally:
        link.close()


# --- the steps ---------------------------------------------------------------------------------


def esptool_commands(port: str, image: Path, chip: str = "esp32", esptool: list[str] | None = None,
                     baud: int = 460800) -> list[list[str]]:
    """The esptool invocations that erase the flash and write MicroPython's image."""
    if chip not in IMAGE_OFFSETS:
        raise ConfigError(f"chip: expected one of {', '.join(IMAGE_OFFSETS)}, got {chip!r}")
    esptool = esptool or ["esptool"]
    base = [*esptool, "--chip", chip, "--port", port, "--baud", str(baud)]
    return [base + ["erase-flash"], base + ["write-flash", "-z", IMAGE_OFFSETS[chip], str(image)]]


@dataclass(frozen=True)
class Step:
    """One thing to do on the board, shown as a line of progress."""

    what: str
    command: list[str]


def mpremote_steps(port: str, config_file: Path, mpremote: list[str], ca_file: Path | None = None,
                   *, mpy: bool = True, ota_key: Path | None = None) -> list[Step]:
    """Copy the firmware (.mpy but main.py, or with ``mpy=False`` the sources), umqtt,
    config.json (the broker's CA, the fleet's verify key) onto the board, then list it."""
    connect = [*mpremote, "connect", port]
    umqtt = umqtt_path() / "umqtt"
    files = board_files(firmware_files(), mpy)
    # The other form of each module goes: a tern_x.py left beside a new tern_x.mpy (a board
    # flashed before with sources) would be the one imported.
    other = sorted(f.stem + (".py" if f.suffix == ".mpy" else ".mpy") for f in files if f.name != "main.py")
    tidy = "import os;[os.remove(n) for n in os.listdir() if n in %r]" % (other,)
    steps = [
        Step("firmware", connect + ["cp", *[str(f) for f in files], ":"]),
        Step("tidy", connect + ["exec", tidy]),
        Step("umqtt", connect + ["cp", "-r", str(umqtt), ":"]),
        Step("config.json", connect + ["cp", str(config_file), ":config.json"]),
    ]
    if ca_file is not None:
        steps.append(Step(BOARD_CA, connect + ["cp", str(ca_file), f":{BOARD_CA}"]))
    if ota_key is not None:
        steps.append(Step(BOARD_OTA_KEY, connect + ["cp", str(ota_key), f":{BOARD_OTA_KEY}"]))
    return steps + [Step("list", connect + ["ls", ":", "+", "ls", ":umqtt"])]


def expected_files(config_file: Path, ca_file: Path | None = None, *, mpy: bool = True,
                   ota_key: Path | None = None) -> dict[str, Path]:
    """Board path -> host file, for everything that is copied."""
    files = {f.name: f for f in board_files(firmware_files(), mpy)}
    for f in sorted((umqtt_path() / "umqtt").glob("*.py")):
        files[f"umqtt/{f.name}"] = f
    files["config.json"] = config_file
    if ca_file is not None:
        files[BOARD_CA] = ca_file
    if ota_key is not None:
        files[BOARD_OTA_KEY] = ota_key
    return files


def add_credentials(config: dict[str, Any], auth_dir: Path, dry_run: bool = False) -> str:
    """Provision the device's MQTT account in the gateway's ``auth_dir``; put its password in ``config``.

    Returns the device id. The password exists only in the board's config and, hashed, in
    the gateway's password file; it is never printed.
    """
    device = config.get("device")
    if not device:
        raise FlashError("--auth-dir needs --device-id: the account is named after the device")
    if dry_run:
        config["mqtt_password"] = "(generated when flashing)"
    else:
        try:
            config["mqtt_password"] = DeviceAuth(auth_dir).add_device(device, config["site"])
        except (AuthError, CodecError) as exc:
            raise FlashError(f"--auth-dir {auth_dir}: {exc}") from None
        except OSError as exc:
            raise FlashError(f"--auth-dir {auth_dir}: cannot write the password file: {exc.strerror}") from None
    return device


HASH_SCRIPT = """\
import hashlib, binascii
for n in {names!r}:
    h = hashlib.sha256()
    with open(n, "rb") as f:
        while True:
            b = f.read(512)
            if not b:
                break
            h.update(b)
    print(n, binascii.hexlify(h.digest()).decode())
"""


def verify(port: str, files: dict[str, Path], mpremote: list[str]) -> list[str]:
    """Hash every copied file on the board; return the names whose sha256 differs (or is missing)."""
    script = HASH_SCRIPT.format(names=sorted(files))
    done = subprocess.run([*mpremote, "connect", port, "exec", script], capture_output=True, text=True, timeout=120)
    on_board: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, _, digest = line.strip().rpartition(" ")
        if name in files:
            on_board[name] = digest
    if done.returncode != 0 and not on_board:
        raise FlashError(f"could not hash the files on the board: {_last_line(done.stderr or done.stdout)}")
    return [name for name, path in sorted(files.items())
            if on_board.get(name) != hashlib.sha256(path.read_bytes()).hexdigest()]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --- the whole job -----------------------------------------------------------------------------


def flash(port: str, config: Path | None = None, *, provision: Provision | None = None,
          image: Path | None = None, chip: str = "esp32", dry_run: bool = False,
          reset: bool = True, echo: Callable[[str], None] = print,
          progress: Callable[[str, int, int], None] | None = None,
          auth_dir: Path | None = None, ca_file: Path | None = None,
          mpy: bool = True, ota_key: Path | None = None) -> int:
    """Flash the board on ``port``; with ``dry_run`` only print the commands. Returns an exit code.

    ``progress(step, done, total)`` is called before each step and once at the end. With
    ``auth_dir`` the device gets its own MQTT account on the gateway (tern.security); with
    ``ca_file`` it speaks TLS to the gateway's broker, checked against that CA. ``mpy``
    (default) ships the firmware precompiled (.mpy: no compiling on the board, ~heap freed, see
    docs/ota.md); ``ota_key`` is the fleet's verify key (``tern-device keys``), without which
    the board refuses every over-the-air release.
    """
    provision = provision or Provision()
    board_config = build_config(read_config(config), provision)
    if ca_file is not None:
        if not Path(ca_file).is_file():
            raise FlashError(f"--ca {ca_file}: no such file")
        board_config["tls_ca"] = BOARD_CA
    if auth_dir is not None:
        device = add_credentials(board_config, Path(auth_dir), dry_run)
        if not dry_run:
            echo(f"{device}: MQTT account added in {auth_dir}; reload mosquitto to let it in "
                 "(systemctl reload mosquitto)")
    check_config(board_config)
    check_pins(board_config, chip=chip)  # every pin against the board's map (hardware/pinmaps.json)
    if ota_key is not None:
        try:
            VerifyKey.load(Path(ota_key))   # a secret key or a typo must not go onto a board
        except ReleaseError as exc:
            raise FlashError(f"--ota-key {ota_key}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="tern-flash-") as tmp:
        config_file = Path(tmp) / "config.json"
        write_private(config_file, json.dumps(board_config, indent=2) + "\n")
        mpremote = ["mpremote"] if dry_run else tool_command("mpremote")
        steps: list[Step] = []
        if image is not None:
            if not dry_run and not Path(image).is_file():
                raise FlashError(f"{image}: no such MicroPython image")
            esptool = ["esptool"] if dry_run else tool_command("esptool")
            steps += [Step("MicroPython image", cmd) for cmd in esptool_commands(port, Path(image), chip, esptool)]
        steps += mpremote_steps(port, config_file, mpremote, ca_file, mpy=mpy, ota_key=ota_key)
        if dry_run:
            for step in steps:
                echo(shlex.join(step.command))
            return 0
        total = len(steps) + 1 + int(reset)
        if image is None:
            probe(port)
        for index, step in enumerate(steps):
            if progress:
                progress(step.what, index, total)
            done = subprocess.run(step.command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise FlashError(f"{step.what}: {_last_line(done.stderr or done.stdout)}")
            if step.what == "list":
                echo(done.stdout.rstrip())
        if progress:
            progress("verify", len(steps), total)
        files = expected_files(config_file, ca_file, mpy=mpy, ota_key=ota_key)
        wrong = verify(port, files, mpremote)
        if wrong:
            raise FlashError(f"verify: {len(wrong)} file(s) differ on the board: {', '.join(wrong)}")
        echo(f"verified {len(files)} files by sha256")
        if reset:
            if progress:
                progress("reset", len(steps) + 1, total)
            subprocess.run([*mpremote, "connect", port, "reset"], capture_output=True, timeout=60)
        if progress:
            progress("done", total, total)
    return 0

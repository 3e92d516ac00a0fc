"""``tern-device``: run emulated nodes, flash a real board, or (optionally) QEMU.

    tern-device emulate --count N --broker HOST:PORT --site S --interval-ms MS --readings N
                        [--heap 100K] [--workdir DIR] [--exit-when-done]
    tern-device flash --port /dev/ttyUSB0 [--config FILE] [--device-id ID] [--site S]
                      [--wifi-ssid SSID] [--gateway HOST[:PORT]] [--micropython-image FILE]
                      [--dry-run]
    tern-device qemu --image FLASH.bin [--self-test]
    tern-device keys [--out-dir DIR] [--name fleet] [--height 10]
    tern-device release build DIR --version V [--key KEYFILE] --out RELEASE_DIR [--min-heap B]
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from tern.core.errors import TernError
from tern.tables import Column, fitted_table
from tern.device.emulate import DEFAULT_HEAP


def _heap(text: str) -> str:
    if not re.fullmatch(r"\d+[KkMm]?", text):
        raise argparse.ArgumentTypeError(f"heap must look like 64K, 2M or 70000, got {text!r}")
    return text.upper()


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tern-device", description="Tern sensor nodes: emulate, flash, qemu.")
    sub = parser.add_subparsers(dest="command", required=True)

    em = sub.add_parser("emulate", help="run N emulated nodes (the real firmware on the MicroPython unix port)")
    em.add_argument("--count", type=_positive, default=1)
    em.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    em.add_argument("--site", default="site1")
    em.add_argument("--interval-ms", type=_positive, default=1000)
    em.add_argument("--readings", type=_non_negative, default=0, help="readings per node (0 = forever)")
    em.add_argument("--heap", type=_heap, default=DEFAULT_HEAP,
                    help=f"MicroPython heap of each node (default {DEFAULT_HEAP}: an ESP32 without PSRAM)")
    em.add_argument("--keepalive", type=_positive, default=30)
    em.add_argument("--prefix", default="node", help="nodes are named PREFIX-1..PREFIX-N")
    em.add_argument("--workdir", type=Path, default=None, help="folder for the nodes' flash and logs")
    em.add_argument("--exit-when-done", action="store_true", help="exit once every node sent all its readings")

    fl = sub.add_parser("flash", help="copy firmware, config.json and umqtt onto a board with mpremote, verify")
    fl.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0")
    fl.add_argument("--config", type=Path, default=None,
                    help="base config.json (default: the example); the options below override it")
    fl.add_argument("--device-id", default=None, help="the node's id (default: esp32-<chip id>)")
    fl.add_argument("--site", default=None)
    fl.add_argument("--wifi-ssid", default=None)
    fl.add_argument("--wifi-password-env", default="TERN_WIFI_PASSWORD", metavar="VAR",
                    help="environment variable holding the Wi-Fi password (default TERN_WIFI_PASSWORD; "
                         "kept off the command line so it stays out of shell history)")
    fl.add_argument("--gateway", default=None, metavar="HOST[:PORT]", help="the Pi's mosquitto")
    fl.add_argument("--micropython-image", type=Path, default=None, metavar="FILE",
                    help="first erase the flash and write this MicroPython image with esptool")
    fl.add_argument("--chip", default="esp32", help="chip for esptool (esp32, esp32s3, ...)")
    fl.add_argument("--auth-dir", type=Path, help="the gateway's account folder (tern-gateway devices): give the "
                    "device its own MQTT account and write its password into its config (needs --device-id)")
    fl.add_argument("--ca", type=Path, help="CA certificate of the gateway's broker: the node connects with TLS")
    fl.add_argument("--ota-key", type=Path, metavar="FILE", help="the fleet's verify key (tern-device keys: "
                    "NAME.pub): without it the board refuses every over-the-air release")
    fl.add_argument("--py", action="store_true", help="ship the .py sources instead of .mpy (the 100 KB "
                    "board then has ~30 KB less heap: compiling on the board; see docs/ota.md)")
    fl.add_argument("--no-reset", action="store_true", help="leave the board in the REPL afterwards")
    fl.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    ke = sub.add_parser("keys", help="make the fleet's key pair for signing releases (NAME.key secret, NAME.pub verify key)")
    ke.add_argument("--out-dir", type=Path, default=Path("."))
    ke.add_argument("--name", default="fleet")
    ke.add_argument("--height", type=_positive, default=10,
                    help="Merkle tree height: 2^H releases can be signed with this key (default 10: 1024)")

    re_ = sub.add_parser("release", help="firmware releases for over-the-air updates")
    rsub = re_.add_subparsers(dest="release_command", required=True)
    rb = rsub.add_parser("build", help="compile DIR to .mpy, write the manifest, sign it")
    rb.add_argument("dir", type=Path, help="the firmware folder (device_firmware)")
    rb.add_argument("--version", required=True)
    rb.add_argument("--key", type=Path, help="the fleet's secret key (tern-device keys): unsigned without it")
    rb.add_argument("--out", type=Path, required=True, help="the release folder to write (new or empty)")
    rb.add_argument("--min-heap", type=_positive, default=None,
                    help="free heap (bytes, at boot) a board must have to take the release")
    rb.add_argument("--trial-boots", type=_positive, default=3,
                    help="boots the release has to prove itself (connected, a reading acked) before rollback")
    rb.add_argument("--trial-s", type=_positive, default=300, help="seconds per trial boot to prove itself")

    qe = sub.add_parser("qemu", help="run a MicroPython flash image under Espressif QEMU (optional)")
    qe.add_argument("--image", type=Path, help="merged 4 MB flash image (esptool merge_bin)")
    qe.add_argument("--self-test", action="store_true",
                    help="flash the firmware over the emulated UART, run its config check, stop QEMU")
    return parser


#: The fleet table's columns: node and state never give way; boot first, then the counters.
FLEET_COLUMNS = (
    Column("node"), Column("state"), Column("boot", 6), Column("sent", 1, "right"), Column("acked", 1, "right"),
    Column("resent", 4, "right"), Column("dropped", 3, "right"), Column("connects", 5, "right"), Column("last error", 2),
)


def _table(fleet, width: int = 80) -> "object":
    rows = []
    for node in fleet:
        state = "done" if node.wait_done(0) else ("running" if node.running else f"exited {node.exit_code}")
        error = node.errors[-1] if node.errors else ""
        rows.append([node.device, state, node.boot, str(node.sent), str(node.acked), str(node.resent),
                     str(node.dropped), str(node.connects), error[:40]])
    return fitted_table(FLEET_COLUMNS, rows, width, title="tern-device emulate")


#: How long --exit-when-done waits for the gateway to acknowledge the last readings.
ACK_GRACE_S = 10.0


def cmd_emulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from tern.device.emulate import Fleet

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tern-nodes-"))
    fleet = Fleet(
        workdir, count=args.count, broker=args.broker, site=args.site, prefix=args.prefix,
        interval_ms=args.interval_ms, max_readings=args.readings, heap=args.heap, keepalive=args.keepalive,
    )
    console = Console()
    console.print(f"nodes in {workdir} (logs: <node>/node.log); Ctrl-C to stop")
    code = 0
    try:
        _interrupt_on(STOP_SIGNALS)
        fleet.start()
        with Live(_table(fleet, console.width), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(0.5)
                live.update(_table(fleet, console.width))
                if args.exit_when_done and all(n.wait_done(0) for n in fleet):
                    # Done means published; give the gateway a moment to ack the last ones,
                    # since a node that exits still holding unacked readings takes them along.
                    deadline = time.monotonic() + ACK_GRACE_S
                    while time.monotonic() < deadline and any(n.acked < n.sent for n in fleet):
                        time.sleep(0.1)
                    live.update(_table(fleet, console.width))
                    unacked = sum(max(0, n.sent - n.acked) for n in fleet)
                    if unacked:
                        console.print(f"{unacked} readings were not acknowledged by a gateway within {ACK_GRACE_S:.0f} s")
                        code = 1
                    break
                if not any(n.running for n in fleet):
                    console.print("every node has exited; see the logs")
                    code = 1
                    break
    except KeyboardInterrupt:
        pass
    finally:
        # A second signal must not cut the stop short and orphan the nodes it had not reached.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        fleet.stop_all()
    return code


#: The signals that stop `emulate` as Ctrl-C does: a service manager's stop, a closed terminal.
#: The nodes run in sessions of their own (a reset of one must not reach the others), so a
#: signal to the emulator never reaches them: it has to stop them itself.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt_on(signals: tuple[signal.Signals, ...]) -> None:
    """Turn each of ``signals`` into KeyboardInterrupt, so the fleet is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in signals:
        signal.signal(sig, interrupt)


def cmd_flash(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from tern.device.flash import Provision, flash

    provision = Provision(
        device_id=args.device_id, site=args.site, wifi_ssid=args.wifi_ssid,
        wifi_password=os.environ.get(args.wifi_password_env) or None, gateway=args.gateway,
    )
    if args.dry_run:
        return flash(args.port, args.config, provision=provision, image=args.micropython_image,
                     chip=args.chip, dry_run=True, reset=not args.no_reset,
                     auth_dir=args.auth_dir, ca_file=args.ca, mpy=not args.py, ota_key=args.ota_key)
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, transient=not console.is_terminal) as bar:
        task = bar.add_task("flash", total=1)

        def progress(step: str, done: int, total: int) -> None:
            bar.update(task, description=f"flash {args.port}: {step}", completed=done, total=total)

        code = flash(args.port, args.config, provision=provision, image=args.micropython_image,
                     chip=args.chip, reset=not args.no_reset, echo=console.print, progress=progress,
                     auth_dir=args.auth_dir, ca_file=args.ca, mpy=not args.py, ota_key=args.ota_key)
    console.print(f"flashed {args.port}" + ("" if args.no_reset else "; the board was reset and runs main.py"))
    return code


def cmd_keys(args: argparse.Namespace) -> int:
    from tern.device.release import make_keys

    secret, public = args.out_dir / f"{args.name}.key", args.out_dir / f"{args.name}.pub"
    key = make_keys(secret, public, args.height)
    print(f"{secret}: the secret key (keep it off the boards and out of git; it counts the "
          f"{1 << key.height} one-time keys it signs with)")
    print(f"{public}: the verify key (key id {key.key_id}): tern-device flash --ota-key {public}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from tern.device.release import DEFAULT_MIN_HEAP, build_release

    release = build_release(args.dir, args.version, args.out, args.key,
                            min_heap=args.min_heap or DEFAULT_MIN_HEAP, trial_boots=args.trial_boots,
                            trial_s=args.trial_s)
    signed = f"signed (key id {release.key_id})" if release.key_id else "UNSIGNED: nodes will refuse it"
    print(f"release {release.version}: {len(release.files)} files, {release.size} bytes of bytecode "
          f"v{release.mpy}, {signed}, in {release.folder}")
    return 0


def cmd_qemu(args: argparse.Namespace) -> int:
    from tern.device.qemu import run_qemu

    return run_qemu(args.image, self_test=args.self_test)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"emulate": cmd_emulate, "flash": cmd_flash, "qemu": cmd_qemu, "keys": cmd_keys,
                "release": cmd_release}
    try:
        return handlers[args.command](args)
    except TernError as exc:
        print(f"tern-device {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``tern-device qemu``: a MicroPython ESP32 image under Espressif's QEMU, where one exists.

Only Espressif's fork of ``qemu-system-xtensa`` has the ``esp32`` machine (Debian's build
does not; :func:`tern.toolchain.qemu_esp32` asks the binary). Without ``--self-test`` QEMU runs
in the terminal with the board's UART on stdio. With it, the UART goes to a pseudo-terminal,
the firmware is flashed over it exactly as onto a real board (:func:`tern.device.flash.flash`),
and the firmware's own config check runs on the emulated chip; then QEMU is stopped.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tern.device.flash import Provision, flash, tool_command
from tern.toolchain import qemu_esp32

#: How long QEMU may take to say where the emulated UART is.
PTY_TIMEOUT_S = 30.0
SELF_TEST = "import tern_config\nc = tern_config.load()\nprint('TERN self-test ok', c['site'], c['device'])\n"


def qemu_command(qemu: Path, image: Path, serial: str = "mon:stdio") -> list[str]:
    """QEMU's command line for a merged 4 MB flash image.

    User-mode NAT: the guest reaches the host's broker at 10.0.2.2. Only MicroPython builds
    with CONFIG_ETH_USE_OPENETH have a network under QEMU.
    """
    return [str(qemu), "-nographic", "-machine", "esp32", "-drive", f"file={image},if=mtd,format=raw",
            "-nic", "user,model=open_eth", "-serial", serial]


def _uart_pty(process: subprocess.Popen, timeout: float) -> str:
    """Read QEMU's output until it names the pty its UART was redirected to."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()
        seen += line
        found = re.search(r"char device redirected to (/dev/pts/\d+)", line)
        if found:
            return found.group(1)
    raise RuntimeError(f"QEMU did not open a pty for the UART within {timeout:.0f} s: {seen[-200:]!r}")


def run_qemu(image: Path | None, *, self_test: bool = False) -> int:
    """Run the image (interactive) or the self-test; return the exit code."""
    qemu, why = qemu_esp32()
    if qemu is None:
        print(f"tern-device qemu: {why}; use `tern-device emulate` instead", file=sys.stderr)
        return 2
    if image is None or not Path(image).is_file():
        print("tern-device qemu: --image must name a merged flash image (esptool merge_bin --fill-flash-size 4MB)",
              file=sys.stderr)
        return 2
    if not self_test:
        cmd = qemu_command(qemu, Path(image))
        print(shlex.join(cmd))
        return subprocess.run(cmd).returncode
    process = subprocess.Popen(qemu_command(qemu, Path(image), serial="pty"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        port = _uart_pty(process, PTY_TIMEOUT_S)
        flash(port, provision=Provision(device_id="qemu-1"), reset=False)
        done = subprocess.run([*tool_command("mpremote"), "connect", port, "exec", SELF_TEST],
                              capture_output=True, text=True, timeout=60)
        print(done.stdout.strip() or done.stderr.strip())
        return 0 if "TERN self-test ok" in done.stdout else 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()

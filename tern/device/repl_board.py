"""An emulated board on a pseudo-terminal that speaks MicroPython's raw REPL.

It lets the real ``mpremote`` (and so ``tern-device flash``) be tried without hardware: the
board's serial port is a pty (``ReplBoard.port``, a symlink to it if asked), its flash is a
folder, and the Python it is sent runs on the MicroPython unix port with that folder as its
working directory.

The unix port of MicroPython 1.25 has no raw REPL, so the host side speaks the protocol (the
bytes are those of MicroPython's ``pyexec.c`` and ``docs/reference/repl.rst``):

- friendly REPL: Ctrl-A enters the raw REPL (``raw REPL; CTRL-B to exit\\r\\n>``);
- raw REPL: code until Ctrl-D, answered ``OK``, then the code's output, ``\\x04``, its
  exception text, ``\\x04``, and the ``>`` prompt again; Ctrl-D on an empty buffer is a soft
  reset (``MPY: soft reboot``: a fresh interpreter); Ctrl-B back to the friendly REPL;
- raw-paste mode (``\\x05A\\x01``): answered ``R\\x01`` and a window size, with ``\\x01`` for
  every further window, until the host's Ctrl-D, which the board acknowledges with ``\\x04``.

``machine.reset()`` (the emulated ``machine`` module ends the process with exit code 77) is a
hard reset: the interpreter starts again and, with ``boot_main``, runs ``main.py`` from the
flash folder as a real board would.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import threading
import time
import tty
from pathlib import Path
from types import TracebackType

from tern.core.errors import TernError
from tern.toolchain import micropython_binary, repo_root

RESET_EXIT_CODE = 77
#: Bytes the host may send in raw-paste mode before the board asks for more.
PASTE_WINDOW = 128
BANNER = (b"\r\nMicroPython v1.25.0 on Tern emulated board (unix port); esp32 emulated\r\n"
          b"Type \"help()\" for more information.\r\n>>> ")
RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n>"

# The interpreter side: mounts the flash folder as the root filesystem (as a board's flash is
# "/" with cwd "/", so `mpremote cp x :` lands in the folder and never on the host's "/"),
# then reads "<length>\n<code>" blocks from stdin and runs each in one namespace (mpremote
# defines names in one exec and uses them in the next), ending with the raw REPL's two \x04
# markers. `machine` (the emulated one, from the host's MICROPYPATH) is imported before the
# remount hides the host's folders. MicroPython syntax only; {flash} is filled in.
DRIVER = """\
import sys, os, vfs, machine
vfs.umount("/")
vfs.mount(vfs.VfsPosix({flash!r}), "/")
os.chdir("/")
_g = {{"__name__": "__main__"}}
_in = sys.stdin.buffer
while True:
    _n = _in.readline()
    if not _n:
        break
    _n = int(_n)
    _code = b""
    while len(_code) < _n:
        _part = _in.read(_n - len(_code))
        if not _part:
            raise SystemExit
        _code += _part
    try:
        exec(_code.decode(), _g)
        sys.stdout.write("\\x04")
    except SystemExit:
        raise
    except BaseException as _e:
        sys.stdout.write("\\x04")
        sys.print_exception(_e, sys.stdout)
    sys.stdout.write("\\x04")
"""


class BoardError(TernError):
    """The emulated board could not start."""


class ReplBoard:
    """A MicroPython board behind a pty, its flash a folder; see the module docstring."""

    def __init__(self, flash_dir: Path, *, link: Path | None = None, heap: str = "100K",
                 boot_main: bool = False, env: dict[str, str] | None = None) -> None:
        self.flash_dir = Path(flash_dir)
        self.link = Path(link) if link else None
        self.heap = heap
        self.boot_main = boot_main
        self.extra_env = dict(env or {})
        #: Everything the board wrote to its serial port (for tests and diagnostics).
        self.console = bytearray()
        self.hard_resets = 0
        self.soft_resets = 0
        self._master = -1
        self._slave = -1
        self._slave_name = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interp: subprocess.Popen | None = None
        self._main: subprocess.Popen | None = None
        self._lock = threading.Lock()

    # --- life cycle -------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The serial port to give mpremote: the symlink if one was asked for, else the pty."""
        return str(self.link) if self.link else self._slave_name

    def start(self) -> "ReplBoard":
        """Open the pty, start the interpreter, serve the port in a background thread."""
        self.flash_dir.mkdir(parents=True, exist_ok=True)
        self._master, self._slave = os.openpty()
        # Raw mode: no echo, no CR/LF translation; the REPL's bytes pass untouched.
        tty.setraw(self._slave)
        tty.setraw(self._master)
        self._slave_name = os.ttyname(self._slave)
        if self.link:
            self.link.unlink(missing_ok=True)
            self.link.symlink_to(self._slave_name)
        # The board's side keeps the slave open too, so the master never reads EIO between
        # two mpremote runs.
        self._start_interpreter()
        if self.boot_main:
            self._start_main()
        self._thread = threading.Thread(target=self._serve, name="repl-board", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the interpreter and the serving thread; close the pty."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self._kill(self._interp)
        self._kill(self._main)
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self.link:
            self.link.unlink(missing_ok=True)

    def __enter__(self) -> "ReplBoard":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def main_running(self) -> bool:
        """Whether the firmware's main.py is running (after a hard reset with boot_main)."""
        return self._main is not None and self._main.poll() is None

    # --- the interpreter ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        emulated = repo_root() / "hardware" / "emulated"
        # The flash folder first, as on a board: what was copied there (umqtt/, the firmware)
        # is what imports; the emulated machine/network modules stand in for the chip.
        path = os.pathsep.join([str(self.flash_dir), str(emulated)])
        return {**os.environ, **self.extra_env, "MICROPYPATH": path}

    def _start_interpreter(self) -> None:
        self._interp = subprocess.Popen(
            [str(micropython_binary()), "-X", f"heapsize={self.heap}", "-c",
             DRIVER.format(flash=str(self.flash_dir.resolve()))],
            cwd=self.flash_dir, env=self._env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)

    def _start_main(self) -> None:
        if not (self.flash_dir / "main.py").is_file():
            return
        self._main = subprocess.Popen(
            [str(micropython_binary()), "-X", f"heapsize={self.heap}", "main.py"],
            cwd=self.flash_dir, env=self._env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._pump_main, args=(self._main,), daemon=True).start()

    def _pump_main(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            self._write(chunk)

    @staticmethod
    def _kill(process: subprocess.Popen | None) -> None:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=5)

    def _restart(self, *, hard: bool) -> None:
        self._kill(self._interp)
        self._kill(self._main)
        self._main = None
        self._start_interpreter()
        if hard:
            self.hard_resets += 1
            if self.boot_main:
                self._start_main()
        else:
            self.soft_resets += 1

    def _run(self, code: bytes) -> None:
        """Run one block; forward its output up to and including the two \\x04 markers."""
        assert self._interp and self._interp.stdin and self._interp.stdout
        try:
            self._interp.stdin.write(b"%d\n" % len(code) + code)
            self._interp.stdin.flush()
        except BrokenPipeError:
            self._restart(hard=False)
            self._write(b"\x04interpreter restarted\x04")
            return
        markers = 0
        out = self._interp.stdout
        deadline = time.monotonic() + 60  # no flashing step runs longer; a hung block ends here
        while markers < 2 and time.monotonic() < deadline and not self._stop.is_set():
            ready, _, _ = select.select([out], [], [], 0.2)
            if not ready:
                continue
            chunk = out.read1(4096)
            if not chunk:  # the process ended: machine.reset(), or a crash
                code_ = self._interp.wait(timeout=5)
                self._restart(hard=code_ == RESET_EXIT_CODE)
                return
            markers += chunk.count(b"\x04")
            self._write(chunk)
        if markers < 2:
            self._write(b"\x04" * (2 - markers))

    # --- the serial side ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        with self._lock:
            self.console.extend(data)
            if self._master >= 0:
                view = memoryview(data)
                while view:
                    try:
                        written = os.write(self._master, view)
                    except BlockingIOError:
                        time.sleep(0.001)
                        continue
                    view = view[written:]

    def _read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self._master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self._master, 4096)
        except OSError:  # nobody has the port open: nothing to read
            time.sleep(0.05)
            return b""

    def _serve(self) -> None:
        mode = "friendly"
        code = bytearray()
        pending = bytearray()
        paste_received = 0
        while not self._stop.is_set():
            data = self._read(0.2)
            if not data:
                continue
            pending.extend(data)
            while pending:
                byte = pending[0]
                if mode == "paste":
                    if byte == 0x04:
                        del pending[0]
                        self._write(b"\x04")  # end of data acknowledged; output follows
                        self._run(bytes(code))
                        code.clear()
                        self._write(b">")
                        mode = "raw"
                        continue
                    take = pending[:]
                    end = take.find(b"\x04")
                    if end >= 0:
                        take = take[:end]
                    before = paste_received // PASTE_WINDOW
                    code.extend(take)
                    paste_received += len(take)
                    del pending[:len(take)]
                    # One \x01 per window consumed: the host may send another window.
                    self._write(b"\x01" * (paste_received // PASTE_WINDOW - before))
                    continue
                if mode == "raw" and byte == 0x05:
                    if len(pending) < 3:
                        more = self._read(1.0)
                        if not more:
                            del pending[0]
                            continue
                        pending.extend(more)
                        continue
                    if pending[:3] == b"\x05A\x01":
                        del pending[:3]
                        code.clear()
                        paste_received = 0
                        self._write(b"R\x01" + struct.pack("<H", PASTE_WINDOW))
                        mode = "paste"
                        continue
                del pending[0]
                if mode == "friendly":
                    if byte == 0x01:
                        mode = "raw"
                        code.clear()
                        self._write(b"\r\n" + RAW_PROMPT)
                    elif byte == 0x03:
                        self._kill(self._main)  # Ctrl-C stops the running firmware
                        self._write(b"\r\nKeyboardInterrupt\r\n>>> ")
                    elif byte == 0x04:
                        self._restart(hard=False)
                        self._write(b"MPY: soft reboot\r\n" + BANNER)
                    continue
                # raw mode
                if byte == 0x01:
                    code.clear()
                    self._write(b"\r\n" + RAW_PROMPT)
                elif byte == 0x02:
                    mode = "friendly"
                    self._write(BANNER)
                elif byte == 0x03:
                    code.clear()
                elif byte == 0x04:
                    if code:
                        self._write(b"OK")
                        self._run(bytes(code))
                        code.clear()
                        self._write(b">")
                    else:
                        self._restart(hard=False)
                        self._write(b"MPY: soft reboot\r\n" + RAW_PROMPT)
                else:
                    code.append(byte)

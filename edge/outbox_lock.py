"""One gateway per outbox: an exclusive lock on a file beside the outbox, naming its holder.

Two gateways on one outbox would take the same rows and send each reading twice, and each
would delete what the other had not had confirmed. The lock is ``flock`` on
``<outbox>.lock``: the kernel drops it when the holder exits, however it exits, so a crash
never leaves a stale lock behind; the file only says which pid held it last.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from tern.core.errors import ConfigError


class OutboxLocked(ConfigError):
    """Another gateway holds the outbox; the message names its pid."""


def lock_path(outbox_path: str | Path) -> Path:
    """The lock file of an outbox."""
    return Path(f"{outbox_path}.lock")


class OutboxLock:
    """The exclusive lock of one outbox, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, outbox_path: str | Path) -> None:
        self.outbox_path = Path(outbox_path)
        self.path = lock_path(outbox_path)
        self._fd: int | None = None

    def acquire(self) -> "OutboxLock":
        """Take the lock, or raise :class:`OutboxLocked` naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # as the outbox itself does
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutboxLocked(
                f"outbox {self.outbox_path} is in use by another gateway (pid {holder}): "
                "one outbox takes one gateway; stop the other one first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the lock go (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

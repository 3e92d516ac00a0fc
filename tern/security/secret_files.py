"""Files that hold secrets: written owner-only, and checked when read."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600, keeping an existing file's owner.

    The temporary file is created 0600 from the start, so the secret is never readable by
    others, not even for the moment between writing and a chmod.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, PRIVATE_MODE)
        if path.exists():
            # Keep the owner: mosquitto (running as its own user) must still read a file that
            # root rewrites with `tern-gateway devices add`.
            st = path.stat()
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                except PermissionError:
                    pass
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exposure_warning(path: Path) -> str | None:
    """A one-line warning if the secret file at ``path`` is readable by group or others."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"warning: {path} holds secrets but is readable by others "
                f"(mode {stat.S_IMODE(mode):o}); fix with: chmod 600 {path}")
    return None

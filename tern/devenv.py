"""The repository's own ``.venv``: created once, ``pip install -e '.[dev]'`` again whenever
``pyproject.toml`` (or the venv itself) is newer than the stamp ``.cache/venv.stamp``.

Standard library only: ``make setup`` runs this with the system's python, before the venv exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def _root() -> Path:
    return Path(__file__).resolve().parent.parent


def venv_dir() -> Path:
    """The venv folder, ``<repo>/.venv``."""
    return _root() / ".venv"


def venv_python() -> Path:
    """The venv's python (it may not exist yet)."""
    return venv_dir() / "bin" / "python"


def _stamp() -> Path:
    # The repository's .cache even when TERN_CACHE points elsewhere: the venv is this work tree's.
    return _root() / ".cache" / "venv.stamp"


def venv_current() -> bool:
    """True if the venv exists and was installed after the last change of ``pyproject.toml``."""
    stamp, config = _stamp(), venv_dir() / "pyvenv.cfg"
    if not stamp.is_file() or not config.is_file() or not venv_python().exists():
        return False
    made = stamp.stat().st_mtime_ns
    return all(path.stat().st_mtime_ns <= made for path in (_root() / "pyproject.toml", config))


def _base_python() -> str:
    """The interpreter to make the venv with: this one, or the one under it when run from a venv."""
    if sys.prefix != sys.base_prefix:
        return getattr(sys, "_base_executable", sys.executable)
    return sys.executable


def ensure_venv(run: Callable[[list[str], str], None], say: Callable[[str], None]) -> str:
    """Create the venv if absent and install the project with its dev extras if the stamp is stale.

    ``run(cmd, what)`` runs one command (raising on failure). Returns a note for the step line.
    """
    if venv_current():
        return "cached"
    root = _root()
    if not (venv_dir() / "pyvenv.cfg").is_file():
        say("venv: creating .venv")
        run([_base_python(), "-m", "venv", str(venv_dir())], "python -m venv")
    say("venv: pip install -e '.[dev]'")
    _stamp().unlink(missing_ok=True)
    run([str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{root}[dev]"],
        "pip install -e '.[dev]'")
    _stamp().parent.mkdir(parents=True, exist_ok=True)
    _stamp().touch()
    return "installed"

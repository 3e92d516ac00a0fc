"""Over-the-air updates, the node's side: signed releases staged on the emulated board's flash,
installed at boot (or refused), proved by an acked reading, rolled back when they cannot start;
a SIGKILL at every file-system step of the switch leaves a board that boots old or new.

Real outcomes only: the files in the node's flash folder and the births it publishes on a real
mosquitto (paho), acked by a paho subscriber standing in for the gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from helpers.ota import firmware_release, fleet_keys
from tern.core import codec, topics
from tern.device import EmulatedNode
from tern.device.emulate import emulated_dir, firmware_dir
from tern.device.release import (VerifyKey, build_release, check_release, sign, verify)
from tern.harness.stack import Mosquitto
from tern.toolchain import micropython_binary, umqtt_path

SITE = "lab"
FACTORY = "0.1.0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fleet_keys(tmp_path_factory.mktemp("keys"), height=4, other=True)


@pytest.fixture(scope="module")
def release(keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return firmware_release(keys, tmp_path_factory.mktemp("rel"), "0.4.0")


class Gateway:
    """Acks every reading (as the gateway does) and records each status payload."""

    def __init__(self, port: int) -> None:
        self.births: list[dict] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe([("tern/+/+/telemetry", 1), ("tern/+/+/status", 1)])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        where = topics.parse_node_topic(msg.topic)
        if msg.topic.endswith("/status"):
            with self.lock:
                self.births.append(json.loads(msg.payload))
            return
        last = codec.decode_readings(msg.payload, site=where.site, topic_device=where.device)[-1]
        client.publish(topics.ack_topic(where.site, where.device),
                       codec.encode_node_ack(codec.NodeAck(last.boot, last.seq)), qos=1)

    def online(self) -> list[dict]:
        with self.lock:
            return [b for b in self.births if b.get("state") == "online"]

    def wait_birth(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for b in self.online():
                if predicate(b):
                    return b
            time.sleep(0.05)
        raise AssertionError(f"no such birth within {timeout} s; births: {self.online()}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def gateway(tmp_path: Path):
    with Mosquitto(tmp_path / "broker") as broker:
        gw = Gateway(broker.port)
        try:
            yield broker, gw
        finally:
            gw.close()


def make_node(tmp_path: Path, broker: Mosquitto, keys: dict[str, Path], device: str = "ota-1") -> EmulatedNode:
    return EmulatedNode(tmp_path / device, device=device, site=SITE, broker=broker.address, interval_ms=200,
                        ota_key=keys["pub"], extra_config={"spill_max": 0})


def stage(node: EmulatedNode, release: Path) -> Path:
    """What the transport (tern_fetch) leaves on the board: the release in ota/stage, then 'ready'."""
    folder = node.workdir / "ota" / "stage"
    shutil.copytree(release, folder)
    (folder / "ready").write_text("")
    return folder


def state(node: EmulatedNode) -> dict:
    return json.loads((node.workdir / "ota" / "state").read_text())


# --- host side --------------------------------------------------------------------------------


@pytest.mark.quick
def test_release_manifest_and_signature(keys: dict[str, Path], release: Path, tmp_path: Path) -> None:
    text = (release / "manifest").read_text()
    lines = text.splitlines()
    assert lines[:3] == ["tern-release 1", "version 0.4.0", "mpy 6"]
    files = [line.split() for line in lines if line.startswith("file ")]
    assert "main.py" not in text and {f[1] for f in files} == {p.stem + ".mpy" for p in firmware_dir().glob("*.py")
                                                               if p.name != "main.py"}
    for _, name, size, digest in files:
        data = (release / name).read_bytes()
        assert len(data) == int(size) and data[:2] == b"M\x06"
    key = VerifyKey.load(keys["pub"])
    assert check_release(release, key) == []
    sig = (release / "manifest.sig").read_bytes()
    assert len(sig) == 17 + 32 * (67 + 4)
    assert not verify(text.replace("0.4.0", "0.4.1").encode(), sig, key)
    assert not verify(text.encode(), sign(text.encode(), keys["other"]), key)
    # Each signature takes the next one-time key: never the same leaf twice.
    assert sign(b"x", keys["key"])[12:16] != sign(b"x", keys["key"])[12:16]


def test_keys_and_release_build_on_the_command_line(tmp_path: Path) -> None:
    cli = str(Path(sys.executable).parent / "tern-device")
    out = subprocess.run([cli, "keys", "--out-dir", str(tmp_path), "--height", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "fleet.key").stat().st_mode & 0o077 == 0
    again = subprocess.run([cli, "keys", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    out = subprocess.run([cli, "release", "build", str(firmware_dir()), "--version", "0.4.0", "--key",
                          str(tmp_path / "fleet.key"), "--out", str(tmp_path / "rel")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "signed" in out.stdout, out.stderr
    assert check_release(tmp_path / "rel", VerifyKey.load(tmp_path / "fleet.pub")) == []


# --- on the emulated board -------------------------------------------------------------------


def test_a_good_release_switches_and_proves_itself(tmp_path: Path, gateway, keys, release) -> None:
    broker, gw = gateway
    node = make_node(tmp_path, broker, keys)
    try:
        node.start()
        gw.wait_birth(lambda b: b.get("fw") == FACTORY and "ota" not in b, 20)
        node.stop()
        stage(node, release)
        node.start()
        gw.wait_birth(lambda b: b.get("fw") == "0.4.0" and b.get("ota") == {"st": "trial", "ver": "0.4.0"}, 20)
        # Connected and a reading acked: it stays, and says so in a fresh birth.
        gw.wait_birth(lambda b: b.get("fw") == "0.4.0" and (b.get("ota") or {}).get("st") == "ok", 20)
        flash = node.workdir
        assert not (flash / "ota" / "stage").exists()
        for name in (release / "manifest").read_text().split("\n"):
            if name.startswith("file "):
                f = name.split()[1]
                assert (flash / "ota" / "0.4.0" / f).read_bytes() == (release / f).read_bytes()
        assert state(node) == {**state(node), "cur": "0.4.0", "prev": "", "ok": 1}
        assert "TERN ota switched flashed to 0.4.0" in node.log_text()
        # A reboot runs 0.4.0 again, no longer on trial.
        node.stop()
        n = len(gw.online())
        node.start()
        birth = gw.wait_birth(lambda b: gw.online().index(b) >= n, 20)
        assert birth["fw"] == "0.4.0" and "ota" not in birth
    finally:
        node.kill()


@pytest.mark.parametrize("damage", ["other_key", "unsigned", "corrupt_file"])
def test_a_bad_release_is_refused_and_the_old_version_runs(tmp_path: Path, gateway, keys, release, damage) -> None:
    broker, gw = gateway
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    if damage == "other_key":
        (bad / "manifest.sig").write_bytes(sign((bad / "manifest").read_bytes(), keys["other"]))
        why = "signed with another key"
    elif damage == "unsigned":
        (bad / "manifest.sig").unlink()
        why = "unsigned"
    else:
        link = bad / "tern_link.mpy"
        data = bytearray(link.read_bytes())
        data[len(data) // 2] ^= 0x40   # one flipped bit
        link.write_bytes(bytes(data))
        why = "tern_link.mpy corrupt"
    node = make_node(tmp_path, broker, keys)
    try:
        node.flash()
        stage(node, bad)
        node.start()
        birth = gw.wait_birth(lambda b: "ota" in b, 20)
        assert birth["fw"] == FACTORY, birth
        # (The version is told only once the manifest is known to be signed.)
        claimed = "0.4.0" if damage == "corrupt_file" else "?"
        assert birth["ota"]["st"] == "refused" and birth["ota"]["ver"] == claimed and why in birth["ota"]["why"], birth
        assert not (node.workdir / "ota" / "0.4.0").exists() and not (node.workdir / "ota" / "stage" / "ready").exists()
        if damage == "corrupt_file":   # only the bad file goes: the transport fetches it again
            assert not (node.workdir / "ota" / "stage" / "tern_link.mpy").exists()
            assert (node.workdir / "ota" / "stage" / "tern_node.mpy").exists()
        assert node.wait_for(lambda n: n.acked > 0, 20)   # the old version keeps running
        assert node.boots == 1
    finally:
        node.kill()


def test_a_release_that_raises_at_import_rolls_back_within_its_bound(tmp_path: Path, gateway, keys) -> None:
    broker, gw = gateway
    source = tmp_path / "src"
    shutil.copytree(firmware_dir(), source)
    link = source / "tern_link.py"
    link.write_text(link.read_text() + "\nraise ImportError('tern_link 0.5.0 is broken')\n")
    build_release(source, "0.5.0", tmp_path / "rel", keys["key"], trial_boots=2)
    node = make_node(tmp_path, broker, keys)
    try:
        node.flash()
        stage(node, tmp_path / "rel")
        node.start()
        birth = gw.wait_birth(lambda b: "ota" in b, 40)
        assert birth["fw"] == FACTORY, birth
        assert birth["ota"] == {"st": "rolled_back", "ver": "0.5.0", "why": "ImportError tern_link 0.5.0 is broken"}
        # Within the bound: 2 trial boots crashed, the third boot went back.
        assert node.boots == 1 and node.resets == 2, node.log_text()
        assert list(node.reset_causes) == ["SOFT_RESET", "SOFT_RESET"]
        assert "TERN error ota rolled back 0.5.0 to flashed" in node.log_text()
        assert state(node)["cur"] == "" and state(node)["ok"] == 1
        assert node.wait_for(lambda n: n.acked > 0, 20)
    finally:
        node.kill()


# --- SIGKILL at every step of the switch ------------------------------------------------------

#: Runs tern_boot.start() with every file-system call of tern_boot and tern_ota counted; at
#: call number KILL_AT the process SIGKILLs itself (no cleanup, no flush), as a power cut would.
KILL_DRIVER = """\
import os, sys
import ffi
libc = ffi.open("libc.so.6")
_kill = libc.func("i", "kill", "ii")
_getpid = libc.func("i", "getpid", "")
KILL_AT = %d
n = [0]
def step(what):
    n[0] += 1
    if n[0] == KILL_AT:
        print("KILLED at", what)
        _kill(_getpid(), 9)
class FakeOs:
    def __getattr__(self, name):
        real = getattr(os, name)
        if name in ("rename", "remove", "mkdir", "rmdir"):
            def wrapped(*a):
                step(name)
                return real(*a)
            return wrapped
        return real
class FakeFile:
    def __init__(self, f):
        self.f = f
    def write(self, b):
        step("write")
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        step("close")
        self.f.close()
def fake_open(path, mode="r"):
    if "w" in mode:
        step("open")
        return FakeFile(open(path, mode))
    return open(path, mode)
import tern_boot, tern_ota
for m in (tern_boot, tern_ota):
    m.os = FakeOs()
    m.open = fake_open
sys.modules["tern_ota"] = tern_ota
print("RAN", tern_boot.start()["fw"], n[0])
"""

#: Boots as main.py does, then imports every module of the version chosen: prints it.
BOOT_DRIVER = """\
import sys
import tern_boot
info = tern_boot.start()
for name in ("tern_util", "tern_ring", "tern_link", "tern_node", "tern_main", "tern_sensors"):
    __import__(name)
print("BOOTED", info["fw"] or "flashed", sys.modules["tern_link"].__file__)
"""


def _run(folder: Path, script: str) -> subprocess.CompletedProcess:
    (folder / "driver.py").write_text(script)
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(emulated_dir()), str(umqtt_path()), str(folder)]))
    try:
        return subprocess.run([str(micropython_binary()), "-X", "heapsize=100K", "driver.py"], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        (folder / "driver.py").unlink()


def test_sigkill_at_every_step_of_the_switch_boots_old_or_new(tmp_path: Path, keys, release) -> None:
    board = EmulatedNode(tmp_path / "board", device="k-1", site=SITE, broker="127.0.0.1:1", ota_key=keys["pub"])
    board.flash()
    stage(board, release)
    template = tmp_path / "template"
    shutil.copytree(board.workdir, template)
    # How many steps the whole switch takes (no kill): each is then a kill point.
    whole = _run(board.workdir, KILL_DRIVER % 0)
    assert whole.returncode == 0 and "RAN 0.4.0" in whole.stdout, whole.stdout + whole.stderr
    steps = int(whole.stdout.split("RAN 0.4.0")[1].split()[0])
    assert steps >= 5
    outcomes = {}
    for kill_at in range(1, steps + 1):
        flash = tmp_path / f"k{kill_at}"
        shutil.copytree(template, flash)
        killed = _run(flash, KILL_DRIVER % kill_at)
        assert killed.returncode == -9, killed.stdout + killed.stderr
        booted = _run(flash, BOOT_DRIVER)
        assert booted.returncode == 0, f"kill at step {kill_at}: " + booted.stdout + booted.stderr
        version = booted.stdout.split("BOOTED ")[1].split()[0]
        # Old or new, and the modules came from that version's folder.
        assert version in ("flashed", "0.4.0"), booted.stdout
        assert ("/ota/0.4.0/" in booted.stdout) == (version == "0.4.0"), booted.stdout
        outcomes[kill_at] = version
    # Killed before 'ready' is gone, the next boot installs again; after it, the old version
    # runs until the state file's rename; from that rename on, the new one.
    assert set(outcomes.values()) == {"flashed", "0.4.0"}, outcomes
    assert outcomes[steps] == "0.4.0", outcomes


#: Verifies the release's signature with the board's verify key (tern_ota as .mpy, as shipped).
VERIFY_DRIVER = """\
import gc, time
import tern_ota
key = tern_ota.read_key()
d, n = tern_ota.file_hash("ota/stage/manifest", bytearray(512))
gc.collect()
free = gc.mem_free()
t = time.ticks_us()
tern_ota.verify(d, "ota/stage/manifest.sig", key)
print("VERIFIED", free, time.ticks_diff(time.ticks_us(), t))
"""


def test_the_signature_is_verified_in_a_few_kb_of_heap(tmp_path: Path, keys, release) -> None:
    """The figure docs/ota.md gives: the verify fits in 3 KB of free heap (an 18K heap leaves
    ~4.7 KB free once the interpreter and tern_ota are loaded) and takes milliseconds."""
    board = EmulatedNode(tmp_path / "board", device="v-1", site=SITE, broker="127.0.0.1:1", ota_key=keys["pub"])
    board.flash()
    stage(board, release)
    for f in board.workdir.glob("*.py"):
        f.unlink()   # only the .mpy: nothing compiled
    (board.workdir / "driver.py").write_text(VERIFY_DRIVER)
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(emulated_dir()), str(board.workdir)]))
    out = subprocess.run([str(micropython_binary()), "-X", "heapsize=18K", "driver.py"], cwd=board.workdir, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "VERIFIED" in out.stdout, out.stdout + out.stderr
    free, micros = map(int, out.stdout.split("VERIFIED")[1].split())
    assert free < 6000 and micros < 2_000_000

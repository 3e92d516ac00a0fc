"""``make pi-check``: docs/gateway.md's install, run on an emulated Raspberry Pi.

    python -m tern.harness.pi_check [--mode auto|chroot|proot] [--budget 2400] [--rebuild]

Builds a Debian bookworm arm64 root with debootstrap (first stage on the host, second stage
emulated by qemu-user-static), then runs the ``sh`` blocks of docs/gateway.md's numbered
sections inside it, in order, as root, as a person would on a fresh Pi: apt-get, the venv and
``pip install '/opt/tern[edge]'``, ``tern-gateway devices init/add``, the mosquitto config,
``/etc/tern/gateway.toml`` and ``tern-gateway check``. Then it starts mosquitto and the gateway
the way their systemd units would (systemd does not run in the root), with a cloud broker on
the host, sends node readings with the node's own account and checks that they are
acknowledged to the node, reach the cloud broker in batches, are confirmed there and leave the
outbox, and that SIGTERM stops the gateway with exit code 0.

A few doc lines cannot run as written in a root without systemd or a network: each is
replaced by what it does (listed in :data:`SUBSTITUTIONS`, printed when used). A doc line
the check does not know runs as written, so a changed doc is checked as changed.

Every broker listens on loopback only (the doc's ``listener 1883`` becomes
``listener PORT 127.0.0.1``), every step has a timeout and the whole run a budget. The root
and every cache live under ``$TERN_PI_DIR`` (default /var/tmp/tern-pi), never in the
repository; a second run reuses the root and installs the doc's files afresh.

How arm64 binaries run here: with binfmt_misc (mounted if it is not, and qemu-aarch64
registered by Debian's qemu-user-static with the F flag) ``chroot`` runs them directly, in a
mount namespace of their own (``unshare``) that holds /proc, /dev and /sys. Without binfmt
(no privilege to mount it), ``proot -q qemu-aarch64-static`` does the same through ptrace,
more slowly. ``--mode`` picks one; ``auto`` tries chroot first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

SUITE = "bookworm"
ARCH = "arm64"
#: What Raspberry Pi OS has before docs/gateway.md starts, beyond debootstrap's minbase:
#: sudo (every doc line uses it), systemd (systemd-sysusers in section 5) and the CAs.
BASE_PACKAGES = ("sudo", "systemd", "ca-certificates")
#: Host tools, as Debian packages: the command each provides.
HOST_TOOLS = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static", "proot": "proot",
              "unshare": "util-linux"}
DOC = "docs/gateway.md"
#: Where the repository goes in the root, as in the doc.
OPT_TERN = "/opt/tern"
GATEWAY_ID = "pi-gw-1"
PATH_IN_ROOT = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: pip's CA bundle inside the root: the host's (its egress may re-sign TLS), see _prepare_root.
CA_IN_ROOT = "/etc/tern-pi-check/ca.crt"


def pi_dir() -> Path:
    """Where the root, its caches and the logs live (``$TERN_PI_DIR``, default /var/tmp/tern-pi)."""
    return Path(os.environ.get("TERN_PI_DIR", "/var/tmp/tern-pi"))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


class CheckFailed(Exception):
    """A step failed; the message says what and where its log is."""


# --------------------------------------------------------------------------------------------
# Steps: each printed with its duration, bounded by its timeout and the run's budget
# --------------------------------------------------------------------------------------------


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def cap(self, timeout: float) -> float:
        left = self.left()
        if left <= 1:
            raise CheckFailed(f"the run's budget of {self.seconds:.0f} s is spent")
        return min(timeout, left)


class Report:
    """Prints ``[  12.3 s] step ... ok (detail)`` lines and keeps them for the summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, bool, str]] = []
        self.start = time.monotonic()

    def step(self, name: str) -> "_Step":
        return _Step(self, name)

    def note(self, text: str) -> None:
        print(f"           {text}", flush=True)


class _Step:
    def __init__(self, report: Report, name: str) -> None:
        self.report, self.name, self.detail = report, name, ""

    def __enter__(self) -> "_Step":
        self.t0 = time.monotonic()
        print(f"---------- {self.name}", flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        took = time.monotonic() - self.t0
        ok = exc_type is None
        detail = self.detail if ok else f"{exc_type.__name__}: {exc}"
        self.report.rows.append((self.name, took, ok, detail))
        print(f"[{took:7.1f} s] {self.name}: {'ok' if ok else 'FAILED'}{' (' + detail + ')' if detail else ''}",
              flush=True)
        return False


def run_host(cmd: Sequence[str], timeout: float, log: Path, *, input_text: str | None = None,
             env: dict | None = None) -> str:
    """Run ``cmd`` in a session of its own, output to ``log``; kill its whole group at the timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                start_new_session=True, env=env)
        try:
            proc.communicate(input_text.encode() if input_text is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            proc.wait(10)
            raise CheckFailed(f"timed out after {timeout:.0f} s: {shlex.join(cmd)[:200]} (log {log})") from None
    text = log.read_text(errors="replace")
    tail = text[text.rfind(f"$ {shlex.join(cmd)}"):]
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {shlex.join(cmd)[:200]}\n{_tail(tail, 25)}\n(log {log})")
    return tail.split("\n", 1)[1] if "\n" in tail else ""


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _tail(text: str, lines: int) -> str:
    return "\n".join("    | " + line for line in text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Host tools, binfmt and the two ways into the root
# --------------------------------------------------------------------------------------------


def ensure_host_tools(log: Path, timeout: float) -> str:
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return "debootstrap, qemu-user-static, proot found"
    if os.geteuid() != 0:
        raise CheckFailed(f"need root to install {' '.join(missing)} (and to build the root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_host(["apt-get", "update", "-qq"], timeout, log, env=env)
    run_host(["apt-get", "install", "-y", "-qq", *missing], timeout, log, env=env)
    return "installed " + " ".join(missing)


BINFMT = Path("/proc/sys/fs/binfmt_misc")


def ensure_binfmt(log: Path) -> str:
    """Make the kernel hand arm64 ELF files to qemu if it can be done here; say what was found."""
    if not (BINFMT / "status").exists():
        result = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                                capture_output=True, text=True, timeout=20)
        if result.returncode != 0:
            return f"binfmt_misc is not mounted and cannot be ({result.stderr.strip()})"
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, timeout=20)
    if not entry.exists():
        return "binfmt_misc mounted, but qemu-aarch64 is not registered"
    text = entry.read_text()
    flags = re.search(r"^flags: (\S*)", text, re.M)
    state = text.splitlines()[0] if text else "?"
    return f"binfmt qemu-aarch64 {state}, flags {flags.group(1) if flags else '?'}"


class Root:
    """Commands inside the arm64 root, through chroot (binfmt) or proot (ptrace)."""

    def __init__(self, path: Path, mode: str, logs: Path) -> None:
        self.path, self.mode, self.logs = path, mode, logs
        self.env = {
            "PATH": PATH_IN_ROOT, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
            "PIP_PROGRESS_BAR": "off",
        }

    def argv(self, inner: Sequence[str]) -> list[str]:
        envd = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in self.env.items())]
        if self.mode == "chroot":
            r = shlex.quote(str(self.path))
            setup = (f"mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && "
                     f"mount -t sysfs sysfs {r}/sys && exec chroot {r} {shlex.join([*envd, *inner])}")
            # A mount namespace of its own: the mounts go away with the last process in it.
            return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup]
        qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
        return ["proot", "-q", qemu, "-r", str(self.path), "-b", "/dev", "-b", "/proc", "-b", "/sys",
                "-w", "/root", *envd, *inner]

    def sh(self, script: str, timeout: float, log_name: str, cwd: str = "/root") -> str:
        """Run a shell script inside as root; raise CheckFailed on a non-zero exit or the timeout."""
        return run_host(self.argv(["/bin/sh", "-c", f"cd {cwd} && {script}"]), timeout, self.logs / log_name)

    def spawn(self, script: str, log: Path) -> subprocess.Popen:
        """Start a long-running script inside (its own session: stopped with its group)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
        return subprocess.Popen(self.argv(["/bin/sh", "-c", script]), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def file(self, inside: str) -> Path:
        return self.path / inside.lstrip("/")


def works(root: Root, timeout: float = 60) -> str | None:
    """None if ``uname -m`` inside says aarch64, else why not."""
    try:
        out = run_host(root.argv(["/bin/uname", "-m"]), timeout, root.logs / f"probe-{root.mode}.log")
    except CheckFailed as exc:
        return str(exc).splitlines()[0]
    return None if "aarch64" in out else f"uname -m said {out.strip()!r}"


# --------------------------------------------------------------------------------------------
# Building the root
# --------------------------------------------------------------------------------------------


def first_stage(path: Path, mirror: str, log: Path, timeout: float) -> str:
    if (path / ".tern-stage2").exists() or ((path / "debootstrap" / "debootstrap").exists()
                                            and (path / ".tern-stage1").exists()):
        return "reused"  # the second stage removes /debootstrap
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_host(["debootstrap", "--foreign", f"--arch={ARCH}", "--variant=minbase",
              f"--include={','.join(BASE_PACKAGES)}", SUITE, str(path), mirror], timeout, log)
    (path / ".tern-stage1").write_text(mirror + "\n")
    return f"{SUITE} {ARCH} minbase + {', '.join(BASE_PACKAGES)} from {mirror}"


def second_stage(root: Root, timeout: float) -> str:
    if (root.path / ".tern-stage2").exists():
        return "reused"
    run_host(root.argv(["/debootstrap/debootstrap", "--second-stage"]), timeout, root.logs / "second-stage.log")
    (root.path / ".tern-stage2").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    size = subprocess.run(["du", "-sm", str(root.path)], capture_output=True, text=True).stdout.split()[0]
    return f"{size} MB"


def prepare_root(root: Root) -> str:
    """What a Pi has and a fresh debootstrap root lacks, and what running it here needs.

    Never a doc step: apt sources and settings (the host's, for its mirror), DNS, the host's
    name in /etc/hosts (sudo looks it up), pip's CA bundle (the host's egress may re-sign
    TLS), debconf without a terminal, and policy-rc.d so apt starts no service in the root.
    """
    done = []
    host_sources = Path("/etc/apt/sources.list.d/debian.sources")
    if host_sources.exists():
        (root.file("/etc/apt/sources.list.d")).mkdir(parents=True, exist_ok=True)
        shutil.copy(host_sources, root.file("/etc/apt/sources.list.d/debian.sources"))
        root.file("/etc/apt/sources.list").write_text("")
        done.append("apt sources")
    # The host's mirror may serve an archive snapshot whose Release files are past Valid-Until.
    checks = [line.strip() for conf in sorted(Path("/etc/apt/apt.conf.d").glob("*")) if conf.is_file()
              for line in conf.read_text(errors="replace").splitlines()
              if re.match(r"\s*Acquire::Check-(Valid-Until|Date)\b", line)]
    if checks:
        root.file("/etc/apt/apt.conf.d/99tern-pi-check").write_text("\n".join(checks) + "\n")
        done.append("apt: " + " ".join(checks))
    sandbox = root.file("/etc/apt/apt.conf.d/99tern-pi-check-proot")
    if root.mode == "proot":
        # Under proot apt's drop to the _apt user cannot run gpgv: `apt-get update` then only
        # warns and keeps no lists. As root it verifies them.
        sandbox.write_text('APT::Sandbox::User "root";\n')
        done.append("apt sandbox user root (proot)")
    elif sandbox.exists():
        sandbox.unlink()
    shutil.copy("/etc/resolv.conf", root.file("/etc/resolv.conf"))
    hostname = socket.gethostname()
    hosts = root.file("/etc/hosts")
    text = hosts.read_text() if hosts.exists() else ""
    if hostname not in text.split():
        hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost\n" + text)
    ca = root.file(CA_IN_ROOT)
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", ca)
    # /etc/pip.conf, not an environment variable: sudo resets the environment.
    root.file("/etc/pip.conf").write_text(f"[global]\ncert = {CA_IN_ROOT}\ntimeout = 180\n"
                                          "disable-pip-version-check = true\nprogress-bar = off\n")
    policy = root.file("/usr/sbin/policy-rc.d")
    policy.write_text("#!/bin/sh\n# pi-check: no service starts inside the root\nexit 101\n")
    policy.chmod(0o755)
    root.sh("echo 'debconf debconf/frontend select Noninteractive' | debconf-set-selections", 120,
            "prepare.log")
    done += ["resolv.conf", "hosts", "pip CA", "policy-rc.d", "debconf"]
    return ", ".join(done)


# --------------------------------------------------------------------------------------------
# docs/gateway.md: its sh blocks, and the lines that cannot run as written here
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocLine:
    section: str
    command: str


def doc_commands(text: str) -> list[DocLine]:
    """The commands of the ``sh`` blocks under the numbered ``## N.`` sections, in order
    (a line ending in a backslash continues on the next)."""
    out: list[DocLine] = []
    section, in_block, pending = "", False, ""
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("## "):
            section = line[3:].strip()
        elif stripped.startswith("```"):
            in_block = not in_block and stripped in ("```sh", "```bash", "```shell")
        elif in_block and re.match(r"\d+\.", section):
            if not stripped and not pending:
                continue
            pending += stripped
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip() + " "
                continue
            command = re.sub(r"\s+#.*$", "", pending).strip() if not pending.startswith("#") else ""
            if command:
                out.append(DocLine(section, command))
            pending = ""
    return out


def doc_toml(text: str, section_prefix: str = "4.") -> dict:
    """The settings of the ``toml`` blocks in the config section (``## 4.``)."""
    settings: dict = {}
    section, block = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.strip().startswith("```"):
            if block is not None:
                if section.startswith(section_prefix):
                    settings.update(tomllib.loads("\n".join(block)))
                block = None
            elif line.strip() == "```toml":
                block = []
        elif block is not None:
            block.append(line)
    return settings


def set_toml_key(text: str, key: str, value: object) -> str:
    """``key = value`` in place of the key's line, commented out or not (first one), else appended."""
    rendered = f"{key} = {json.dumps(value)}"
    pattern = re.compile(rf"^#?\s*{re.escape(key)}\s*=.*$", re.M)
    if pattern.search(text):
        return pattern.sub(lambda _m: rendered, text, count=1)
    return text.rstrip("\n") + f"\n{rendered}\n"


@dataclass
class Site:
    """What the run learns and sets up, shared by the substitutions and the live check."""

    local_port: int
    cloud_port: int
    doc_text: str
    device: str = ""
    site: str = ""
    config_out: str = ""
    mosquitto: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None
    gateway_log: Path | None = None
    mosquitto_log: Path | None = None


@dataclass(frozen=True)
class Substitution:
    pattern: str
    why: str
    action: Callable[["Check", re.Match], str]


class Check:
    """One run: the root, the site's ports, the report."""

    def __init__(self, root: Root, site: Site, budget: Budget, report: Report) -> None:
        self.root, self.site, self.budget, self.report = root, site, budget, report

    # ----- the substitutions ------------------------------------------------------------

    def copy_repo(self, _m: re.Match) -> str:
        """``git clone <your Tern repository> /opt/tern``: the working tree's tracked files."""
        files = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root(), capture_output=True, check=True,
                               timeout=60).stdout.split(b"\0")
        dest = self.root.file(OPT_TERN)
        if dest.exists():
            shutil.rmtree(dest)
        count = 0
        for name in filter(None, files):
            src = repo_root() / name.decode()
            if not src.is_file():
                continue  # deleted in the working tree
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            count += 1
        return f"copied {count} tracked files of {repo_root()} to {OPT_TERN}"

    def start_mosquitto(self, _m: re.Match) -> str:
        """``systemctl restart mosquitto``: Debian's unit, by hand, on a loopback port."""
        conf = self.root.file("/etc/mosquitto/mosquitto.conf")
        text = conf.read_text()
        text, n = re.subn(r"^listener\s+1883\b.*$", f"listener {self.site.local_port} 127.0.0.1", text, flags=re.M)
        if n != 1:
            raise CheckFailed(f"/etc/mosquitto/mosquitto.conf has {n} 'listener 1883' lines, expected 1")
        conf.write_text(text)
        unit = parse_unit(self.root.file("/lib/systemd/system/mosquitto.service").read_text())
        self.stop_process("mosquitto")
        for pre in unit.exec_start_pre:
            self.root.sh(pre, self.budget.cap(60), "mosquitto-start.log", cwd="/")
        self.site.mosquitto_log = self.root.logs / "mosquitto.out"
        self.site.mosquitto = self.root.spawn(f"exec {unit.exec_start}", self.site.mosquitto_log)
        wait_port(self.site.local_port, self.budget.cap(60), self.site.mosquitto, "mosquitto")
        return f"{unit.exec_start} (listener {self.site.local_port} 127.0.0.1)"

    def mosquitto_status(self, _m: re.Match) -> str:
        proc = self.site.mosquitto
        if proc is None or proc.poll() is not None:
            raise CheckFailed(f"mosquitto is not running:\n{_tail(self._read(self.site.mosquitto_log), 15)}")
        log = self.root.file("/var/log/mosquitto/mosquitto.log")
        last = self._read(log).strip().splitlines()[-1:] if log.exists() else []
        return f"mosquitto runs (pid {proc.pid}); its log: {last[0] if last else '-'}"

    def edit_config(self, _m: re.Match) -> str:
        """``sudoedit /etc/tern/gateway.toml``: what the doc's text says to set."""
        path = self.root.file("/etc/tern/gateway.toml")
        text = path.read_text()
        settings = {
            "gateway_id": GATEWAY_ID,
            "cloud_broker": f"127.0.0.1:{self.site.cloud_port}",
            "local_broker": f"127.0.0.1:{self.site.local_port}",
            "outbox_path": "/var/lib/tern/outbox.db",
            **doc_toml(self.site.doc_text),
        }
        for key, value in settings.items():
            text = set_toml_key(text, key, value)
        tomllib.loads(text)  # still TOML
        path.write_text(text)
        return ", ".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())

    def no_systemd(self, m: re.Match) -> str:
        return "nothing to do without a running systemd"

    def start_gateway(self, _m: re.Match) -> str:
        """``systemctl enable --now tern-gateway``: the unit's ExecStart, as its User, with its
        StateDirectory, LoadCredential, UMask and Environment, by hand."""
        unit = parse_unit(self.root.file("/etc/systemd/system/tern-gateway.service").read_text())
        user, group = unit.user or "root", unit.group or unit.user or "root"
        prep = []
        for state in unit.state_directories:
            prep.append(f"install -d -m {unit.state_directory_mode} -o {user} -g {group} /var/lib/{state}")
        cred_dir = "/run/credentials/tern-gateway.service"
        if unit.credentials:
            prep.append(f"install -d -m 0500 -o {user} {cred_dir}")
        for name, source in unit.credentials:
            prep.append(f"install -m 0400 -o {user} {shlex.quote(source)} {cred_dir}/{name}")
        self.root.sh(" && ".join(prep) or "true", self.budget.cap(60), "gateway-start.log", cwd="/")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in unit.environment.items())
        groups = ",".join(unit.supplementary_groups) or ""
        setpriv = (f"setpriv --reuid={user} --regid={group} "
                   + (f"--groups={groups} " if groups else "--clear-groups ")
                   + "--inh-caps=-all --no-new-privs")
        script = f"umask {unit.umask} && cd / && exec env {env} {setpriv} {unit.exec_start}"
        self.site.gateway_log = self.root.logs / "gateway.out"
        self.site.gateway = self.root.spawn(script, self.site.gateway_log)
        return f"{unit.exec_start} as {user}:{group} (+{groups or '-'}), umask {unit.umask}"

    def gateway_status(self, _m: re.Match) -> str:
        line = wait_log(self.site.gateway_log, "ingest connected to", self.budget.cap(180), self.site.gateway,
                        "the gateway")
        return "the gateway runs; " + line.split(": ", 1)[-1].strip()

    # ----- the doc, in order --------------------------------------------------------------

    def run_doc(self) -> None:
        for i, line in enumerate(doc_commands(self.site.doc_text), 1):
            with self.report.step(f"doc {line.section.split()[0]} {line.command[:90]}") as step:
                step.detail = self.run_doc_line(i, line)

    def run_doc_line(self, i: int, line: DocLine) -> str:
        for sub in SUBSTITUTIONS:
            match = re.fullmatch(sub.pattern, line.command)
            if match:
                self.report.note(f"instead ({sub.why}):")
                return sub.action(self, match)
        add = re.search(r"tern-gateway devices add (\S+) --site (\S+)(?: --config-out (\S+))?", line.command)
        if add:
            self.site.device, self.site.site, self.site.config_out = add.group(1), add.group(2), add.group(3) or ""
        timeout = 1500 if re.search(r"apt-get install|pip install", line.command) else 600
        out = self.root.sh(line.command, self.budget.cap(timeout), f"doc-{i:02d}.log")
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        if "apt-get update" in line.command:
            # apt-get update exits 0 when an index cannot be fetched or verified: the install
            # after it would then use old lists, or none.
            bad = [ln for ln in lines if re.match(r"(W|E|Err):", ln)]
            if bad:
                raise CheckFailed("apt-get update could not fetch or verify every index:\n" + _tail("\n".join(bad), 8))
        if "tern-gateway check" in line.command:
            for ln in lines:
                self.report.note(ln)
        if "pip install" in line.command:
            wheels = [ln for ln in lines if "Downloading" in ln or "Using cached" in ln or "Building wheel" in ln]
            for ln in wheels:
                self.report.note(ln.strip()[:150])
        return _shorten(lines[-1]) if lines else ""

    # ----- helpers ------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path | None) -> str:
        try:
            return path.read_text(errors="replace") if path else ""
        except OSError:
            return ""

    def stop_process(self, which: str, timeout: float = 30) -> int | None:
        proc = getattr(self.site, which)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        _killpg(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            proc.wait(10)
            raise CheckFailed(f"{which} did not stop within {timeout:.0f} s of SIGTERM") from None


def _shorten(text: str, n: int = 140) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 1] + "…"


SUBSTITUTIONS = (
    Substitution(r"sudo git clone \S.* /opt/tern", "the repository is this working tree, copied in",
                 Check.copy_repo),
    Substitution(r"sudo systemctl restart mosquitto", "no systemd in the root: Debian's mosquitto unit by hand, "
                 "listener on loopback", Check.start_mosquitto),
    Substitution(r"sudo systemctl status mosquitto.*", "no systemd: is the process alive", Check.mosquitto_status),
    Substitution(r"sudoedit /etc/tern/gateway\.toml", "no editor: the settings the doc names, with loopback brokers",
                 Check.edit_config),
    Substitution(r"sudo systemctl daemon-reload", "no systemd in the root", Check.no_systemd),
    Substitution(r"sudo systemctl enable --now tern-gateway", "no systemd: the unit's ExecStart by hand, "
                 "as its user, with its state directory and credential", Check.start_gateway),
    Substitution(r"systemctl status tern-gateway.*", "no systemd: wait for the gateway's ingest to connect",
                 Check.gateway_status),
)


# --------------------------------------------------------------------------------------------
# systemd units, read as far as starting one by hand needs
# --------------------------------------------------------------------------------------------


@dataclass
class Unit:
    exec_start: str = ""
    exec_start_pre: list[str] = field(default_factory=list)
    user: str = ""
    group: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    state_directories: list[str] = field(default_factory=list)
    state_directory_mode: str = "0755"
    credentials: list[tuple[str, str]] = field(default_factory=list)
    supplementary_groups: list[str] = field(default_factory=list)
    umask: str = "0022"


def parse_unit(text: str) -> Unit:
    unit = Unit()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if key in ("ExecStart", "ExecStartPre"):
            command = value.lstrip("-+!@:")
            if key == "ExecStart":
                unit.exec_start = command
            else:
                unit.exec_start_pre.append(command)
        elif key == "User":
            unit.user = value
        elif key == "Group":
            unit.group = value
        elif key == "Environment":
            for word in shlex.split(value):
                k, _, v = word.partition("=")
                unit.environment[k] = v
        elif key == "StateDirectory":
            unit.state_directories += value.split()
        elif key == "StateDirectoryMode":
            unit.state_directory_mode = value
        elif key == "LoadCredential":
            name, _, source = value.partition(":")
            unit.credentials.append((name, source))
        elif key == "SupplementaryGroups":
            unit.supplementary_groups += value.split()
        elif key == "UMask":
            unit.umask = value
    return unit


# --------------------------------------------------------------------------------------------
# Waiting, bounded
# --------------------------------------------------------------------------------------------


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CheckFailed(f"{what} exited with code {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise CheckFailed(f"{what}: nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def wait_log(path: Path | None, needle: str, timeout: float, proc: subprocess.Popen | None, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = Check._read(path)
        for line in text.splitlines():
            if needle in line:
                return line
        if proc is not None and proc.poll() is not None:
            raise CheckFailed(f"{what} exited with code {proc.returncode}:\n{_tail(text, 20)}")
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: no {needle!r} in its log after {timeout:.0f} s:\n{_tail(text, 20)}")
        time.sleep(0.5)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


# --------------------------------------------------------------------------------------------
# The live check: a node on the Pi's mosquitto, a bridge stand-in on the host's cloud broker
# --------------------------------------------------------------------------------------------


def live_check(check: Check, readings: int) -> str:
    """Readings from a node with its own account: acked to the node, batched to the cloud,
    confirmed, gone from the outbox. Returns a one-line summary; raises CheckFailed."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from tern.core import codec, topics
    from tern.core.codec import Confirm, Reading, Status

    site = check.site
    if not (site.device and site.site and site.config_out):
        raise CheckFailed("the doc adds no device with `tern-gateway devices add DEVICE --site S --config-out F`")
    node_conf = json.loads(check.root.file(f"/root/{site.config_out}").read_text())
    password = node_conf["mqtt_password"]

    def client(client_id: str, clean: bool = True) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                        clean_session=clean, protocol=mqtt.MQTTv311)
        c.reconnect_delay_set(1, 2)
        return c

    # The bridge's side of the contract on the cloud broker: decode batches, confirm them.
    batches: list = []
    lock = threading.Lock()
    bridge = client(f"pi-check-bridge-{uuid.uuid4().hex[:6]}", clean=False)
    bridge_ready = threading.Event()
    bridge.on_connect = lambda c, *a: c.subscribe(topics.batch_topic(GATEWAY_ID), qos=1)
    bridge.on_subscribe = lambda *a: bridge_ready.set()

    def on_batch(c, _u, msg) -> None:
        batch = codec.decode_batch(msg.payload, topic_gateway=topics.parse_batch_topic(msg.topic))
        with lock:
            batches.append(batch)
        c.publish(topics.confirm_topic(batch.gateway),
                  codec.encode_confirm(Confirm(batch.gateway, batch.bseq, len(batch.readings))), qos=1)

    bridge.on_message = on_batch
    bridge.connect("127.0.0.1", site.cloud_port)
    bridge.loop_start()

    # The node: its account (client id = username on the Pi's broker), its will, its birth.
    boot = secrets.token_hex(4)
    acks: list = []
    node = client(site.device)
    node.username_pw_set(site.device, password)
    node.will_set(topics.status_topic(site.site, site.device),
                  codec.encode_status(Status(site.device, "offline", boot)), qos=1, retain=True)
    node_ready = threading.Event()
    node.on_connect = lambda c, *a: c.subscribe(topics.ack_topic(site.site, site.device), qos=1)
    node.on_subscribe = lambda *a: node_ready.set()
    node.on_message = lambda _c, _u, msg: acks.append(codec.decode_node_ack(msg.payload))
    node.connect("127.0.0.1", site.local_port, keepalive=30)
    node.loop_start()
    try:
        if not (bridge_ready.wait(check.budget.cap(20)) and node_ready.wait(check.budget.cap(20))):
            raise CheckFailed("the node or the bridge stand-in could not subscribe")
        t0 = time.monotonic()
        node.publish(topics.status_topic(site.site, site.device),
                     codec.encode_status(Status(site.device, "online", boot, fw="pi-check", reset="PWRON_RESET")),
                     qos=1, retain=True)

        def acked() -> int:
            return max((a.seq for a in acks if a.boot == boot), default=0)

        def send_from(first: int) -> None:
            for seq in range(first, readings + 1):
                reading = Reading(site.device, boot, seq, int(time.time() * 1000), {"t": 20.0 + seq / 10, "n": seq})
                node.publish(topics.telemetry_topic(site.site, site.device), codec.encode_reading(reading), qos=1)

        # As the firmware does: what is not acked is sent again (the gateway drops duplicates).
        send_from(1)
        tries = 1
        while not wait_for(lambda: acked() >= readings, check.budget.cap(20)):
            if tries >= 6:
                raise CheckFailed(f"node acked up to seq {acked()} of {readings} after {tries} sends")
            send_from(acked() + 1)
            tries += 1
        t_ack = time.monotonic() - t0

        def delivered() -> set[int]:
            with lock:
                return {r.seq for b in batches for r in b.readings if r.device == site.device and r.boot == boot}

        def statuses() -> list[str]:
            with lock:
                return [s.state for b in batches for s in b.statuses if s.device == site.device]

        if not wait_for(lambda: len(delivered()) >= readings and "online" in statuses(), check.budget.cap(60)):
            raise CheckFailed(f"the cloud broker got {len(delivered())} of {readings} readings and "
                              f"statuses {statuses()} in {len(batches)} batches")
        t_cloud = time.monotonic() - t0
        check.report.note(f"node acked seq {acked()} of {readings} after {t_ack:.1f} s (sends: {tries}); "
                          f"cloud: {len(delivered())} readings + birth in {len(batches)} batches after {t_cloud:.1f} s")

        # The doc's "What is waiting" command: everything confirmed leaves the outbox.
        def outbox() -> dict:
            out = check.root.sh("/opt/tern/.venv/bin/tern-gateway outbox --outbox /var/lib/tern/outbox.db "
                                "--format json", check.budget.cap(120), "outbox.log")
            return json.loads(out[out.index("{"):])

        deadline = time.monotonic() + check.budget.cap(90)
        doc = outbox()
        while (doc["pending"] or doc["status_pending"]) and time.monotonic() < deadline:
            time.sleep(2)
            doc = outbox()
        check.report.note(f"tern-gateway outbox: pending {doc['pending']}, status events pending "
                          f"{doc['status_pending']}, dead letters {doc['dead_letters']}, last bseq {doc['last_bseq']}")
        if doc["pending"] or doc["status_pending"] or doc["dead_letters"]:
            raise CheckFailed("the outbox is not empty after the cloud confirmed every batch")
        return (f"{readings} readings acked in {t_ack:.1f} s, in the cloud in {t_cloud:.1f} s, "
                f"{len(batches)} batches confirmed, outbox empty")
    finally:
        for c in (node, bridge):
            c.disconnect()
            c.loop_stop()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("auto", "chroot", "proot"), default="auto",
                        help="how arm64 binaries run: chroot through binfmt_misc, or proot (ptrace)")
    parser.add_argument("--budget", type=float, default=2400, help="seconds for the whole run (default 2400)")
    parser.add_argument("--readings", type=int, default=20, help="node readings to send (default 20)")
    parser.add_argument("--rebuild", action="store_true", help="build the root afresh")
    args = parser.parse_args(argv)

    from tern.harness.stack import Mosquitto
    from tern.toolchain import debian_mirror

    base = pi_dir()
    root_path = base / "rootfs"
    logs = base / "logs" / time.strftime("%Y%m%d-%H%M%S")
    report, budget = Report(), Budget(args.budget)
    print(f"pi-check: docs/gateway.md on Debian {SUITE} {ARCH} under qemu-user; root {root_path}, logs {logs}",
          flush=True)
    cloud: Mosquitto | None = None
    check: Check | None = None
    ok = False
    try:
        with report.step("host tools") as step:
            step.detail = ensure_host_tools(logs / "host-tools.log", budget.cap(600))
        with report.step("binfmt_misc") as step:
            step.detail = ensure_binfmt(logs / "binfmt.log")
        if args.rebuild and root_path.exists():
            shutil.rmtree(root_path)
        with report.step("debootstrap first stage (host)") as step:
            step.detail = first_stage(root_path, debian_mirror(), logs / "first-stage.log", budget.cap(900))
        with report.step("how arm64 runs here") as step:
            tried = []
            for mode in (("chroot", "proot") if args.mode == "auto" else (args.mode,)):
                why = works(Root(root_path, mode, logs))
                if why is None:
                    break
                tried.append(f"{mode}: {why}")
            else:
                raise CheckFailed("no way to run arm64 binaries here: " + "; ".join(tried))
            root = Root(root_path, mode, logs)
            step.detail = mode + (f" (not {'; '.join(tried)})" if tried else "")
        with report.step("debootstrap second stage (emulated)") as step:
            step.detail = second_stage(root, budget.cap(1800))
        with report.step("root: apt sources, DNS, pip CA, no services") as step:
            step.detail = prepare_root(root)
            # A fresh install each run: the doc's own files go, the base system stays.
            root.sh("rm -rf /opt/tern /etc/tern /etc/mosquitto/tern /var/lib/tern /var/lib/mosquitto/mosquitto.db "
                    "/run/credentials /root/*.json /etc/sysusers.d/tern.conf "
                    "/etc/systemd/system/tern-gateway.service /var/log/mosquitto/mosquitto.log",
                    budget.cap(120), "reset.log")
        site = Site(local_port=free_port(), cloud_port=free_port(), doc_text=(repo_root() / DOC).read_text())
        with report.step("cloud broker on the host (loopback)") as step:
            cloud = Mosquitto(logs / "cloud", port=site.cloud_port)
            cloud.start()
            step.detail = f"mosquitto on {cloud.address}"
        check = Check(root, site, budget, report)
        check.run_doc()
        with report.step("live: node readings acked, batched, confirmed") as step:
            step.detail = live_check(check, args.readings)
        with report.step("systemctl stop (SIGTERM)") as step:
            t0 = time.monotonic()
            code = check.stop_process("gateway", timeout=30)
            if code != 0:
                raise CheckFailed(f"the gateway exited with {code} on SIGTERM:\n"
                                  f"{_tail(Check._read(site.gateway_log), 15)}")
            step.detail = f"exit 0 after {time.monotonic() - t0:.1f} s"
        ok = True
    except CheckFailed:
        pass  # already printed by its step
    except Exception as exc:  # noqa: BLE001 - a run reports, it does not crash
        print(f"pi-check: {type(exc).__name__}: {exc}", flush=True)
    finally:
        if check is not None:
            for which in ("gateway", "mosquitto"):
                try:
                    check.stop_process(which, timeout=20)
                except CheckFailed as exc:
                    print(f"pi-check: {exc}")
            if check.site.gateway_log and not ok:
                print("gateway log (last lines):\n" + _tail(Check._read(check.site.gateway_log), 20))
        if cloud is not None:
            cloud.stop()
    total = time.monotonic() - report.start
    print("\nstep times:")
    for name, took, passed, _detail in report.rows:
        print(f"  {took:7.1f} s  {'ok  ' if passed else 'FAIL'} {name}")
    print(f"{'PASS' if ok else 'FAIL'}: pi-check in {total:.0f} s ({total / 60:.1f} min), logs in {logs}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

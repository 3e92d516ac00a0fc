"""Local service runners: the real mosquitto and Kafka-protocol broker, on loopback.

The test suite and ``make demo`` start their infrastructure through this module, so both
run on the same parts the same way. Every wait here is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Sequence

from tern.core.errors import TernError
from tern.core.hostport import parse_hostport
from tern.security.mosquitto_auth import mosquitto_conf

LOOPBACK = "127.0.0.1"

#: mosquitto's default of 1000 queued QoS 1 messages per offline session drops data
#: silently; a gateway or bridge session must be able to fall far behind without loss.
DEFAULT_MAX_QUEUED = 1_000_000


class ServiceError(TernError, RuntimeError):
    """A local service did not start or stop as it should; the message says which and why."""


#: ``LOW-HIGH``: hand out ports from this block only (below the kernel's ephemeral range), so
#: parallel test workers, each with a block of its own, never pick the same port. Without it
#: the kernel picks any free port.
PORT_BLOCK_ENV = "TERN_PORT_BLOCK"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now.

    With ``TERN_PORT_BLOCK`` set, ports come from that block in turn (a counter beside the
    block's lock file, shared by every process of the worker), never twice in a row: a broker
    a test stops and restarts keeps its port, and no other test is handed it meanwhile.
    """
    block = os.environ.get(PORT_BLOCK_ENV, "").strip()
    if block:
        return _port_from_block(host, block)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_from_block(host: str, block: str) -> int:
    import fcntl
    import tempfile

    try:
        low, high = (int(part) for part in block.split("-"))
    except ValueError:
        raise ServiceError(f"{PORT_BLOCK_ENV}={block!r}: expected LOW-HIGH, e.g. 20000-22999") from None
    if not 1024 <= low < high <= 65535:
        raise ServiceError(f"{PORT_BLOCK_ENV}={block!r}: expected 1024 <= LOW < HIGH <= 65535")
    state = Path(tempfile.gettempdir()) / f"tern-ports-{low}-{high}"
    with open(state, "a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)  # released when the file closes
        counter.seek(0)
        text = counter.read().strip()
        start = int(text) if text.isdigit() and low <= int(text) <= high else low
        size = high - low + 1
        for step in range(size):
            port = low + (start - low + step) % size
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            counter.seek(0)
            counter.truncate()
            counter.write(str(low + (port - low + 1) % size))
            return port
    raise ServiceError(f"no free port left in {PORT_BLOCK_ENV}={block}")


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on host:port, or raise ServiceError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"process exited with code {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


class ManagedProcess:
    """A child process with a log file, started and stopped within deadlines."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> Sequence[str]:
        """The command line to start; subclasses override."""
        raise NotImplementedError

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            list(self.command()),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            # A session of its own, so a Ctrl-C meant for the demo reaches us, not the
            # broker: we stop the broker ourselves, in order.
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the process: a crash, with no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self):
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class BrokerTls:
    """Certificate files for a TLS listener; ``require_client_cert`` makes it mutual TLS."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_client_cert: bool = False

    def listener_lines(self) -> list[str]:
        """The mosquitto.conf lines for the listener above them."""
        lines = [f"cafile {self.cafile}", f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.require_client_cert:
            # The certificate's common name becomes the username the ACL sees.
            lines += ["require_certificate true", "use_identity_as_username true"]
        return lines


class Mosquitto(ManagedProcess):
    """A private mosquitto on a loopback port, with persistence and a raised queue limit.

    ``port`` stays the same across :meth:`stop` / :meth:`start`, so a test can restart the
    broker and have clients reconnect to it; persistence keeps sessions and queued messages.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = True,
        max_queued_messages: int = DEFAULT_MAX_QUEUED,
        extra_conf: str = "",
        auth_folder: Path | None = None,
        tls: BrokerTls | None = None,
        acl_file: Path | None = None,
        node_tls: BrokerTls | None = None,
    ) -> None:
        super().__init__(workdir)
        #: A tern.security DeviceAuth folder: password file, ACL, anonymous access off.
        self.auth_folder = auth_folder
        self.tls = tls
        #: A second listener, with TLS, as the Pi's broker has for nodes on the Wi-Fi (the
        #: gateway stays on the first); on ``node_tls_port``, kept across restarts.
        self.node_tls = node_tls
        self.node_tls_port = free_port() if node_tls else None
        #: An ACL without a password file (clients known by certificate); anonymous access off.
        self.acl_file = acl_file
        self.host = LOOPBACK
        self.port = port or free_port()
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.extra_conf = extra_conf
        self.conf_path = self.workdir / "mosquitto.conf"

    @property
    def address(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def node_tls_address(self) -> str:
        """``host:port`` of the nodes' TLS listener (``node_tls``)."""
        if self.node_tls_port is None:
            raise ServiceError("this mosquitto has no node TLS listener")
        return f"{self.host}:{self.node_tls_port}"

    def config_text(self) -> str:
        """The mosquitto.conf this broker runs with."""
        lines = [
            f"listener {self.port} {self.host}",
            *(self.tls.listener_lines() if self.tls else []),
            *self._auth_lines(),
            *self._node_tls_lines(),
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"max_queued_messages {self.max_queued_messages}",
            # As deploy/mosquitto-pi.conf: the gateway acks only after its commit, so this
            # window is how many readings one commit can take.
            "max_inflight_messages 1000",
            # Small PUBACKs and PUBLISHes go out at once instead of waiting out delayed ACKs.
            "set_tcp_nodelay true",
            # Persist at once on shutdown only; a periodic autosave would be a silent data
            # point of its own and the tests restart brokers gracefully.
            "autosave_interval 0",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_dest stdout",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto switches to the 'mosquitto' user, which cannot write the
            # persistence file into our folders: that would lose every queued message.
            lines.append("user root")
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def _node_tls_lines(self) -> list[str]:
        if self.node_tls is None:
            return []
        lines = [f"listener {self.node_tls_port} {self.host}", *self.node_tls.listener_lines()]
        if self.auth_folder is not None:
            # A listener option, unlike the password file and the ACL: say it again here.
            lines.append("use_username_as_clientid true")
        return lines

    def _auth_lines(self) -> list[str]:
        if self.auth_folder is not None:
            return mosquitto_conf(self.auth_folder).splitlines()
        if self.acl_file is not None:
            return ["allow_anonymous false", f"acl_file {self.acl_file}"]
        return ["allow_anonymous true"]

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password file and ACL (as ``systemctl reload`` does)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGHUP)

    def command(self) -> Sequence[str]:
        from tern.toolchain import mosquitto_binary

        return [str(mosquitto_binary()), "-c", str(self.conf_path)]

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        """Write the config, start mosquitto and wait until it accepts connections."""
        self.conf_path.write_text(self.config_text())
        self._spawn()
        try:
            wait_for_port(self.host, self.port, timeout, self.process)
            if self.node_tls_port is not None:
                wait_for_port(self.host, self.node_tls_port, timeout, self.process)
        except ServiceError as exc:
            self.stop()
            raise ServiceError(f"mosquitto on {self.address}: {exc}\n{self.log_tail()}") from None
        return self


class Tansu(ManagedProcess):
    """The Kafka-protocol broker Tansu (memory storage) on a loopback port."""

    name = "tansu"
    kind = "tansu"
    #: One broker: every topic has one replica, and min.insync.replicas means nothing.
    replication_factor = 1
    min_insync_replicas = 1

    def __init__(self, workdir: Path, port: int | None = None, advertised_port: int | None = None) -> None:
        super().__init__(workdir)
        self.host = LOOPBACK
        self.port = port or free_port()
        #: Set when clients reach Tansu through something else (a TLS terminator in tests).
        self.advertised_port = advertised_port or self.port

    @property
    def bootstrap(self) -> str:
        """The bootstrap address for Kafka clients."""
        return f"{self.host}:{self.port}"

    def command(self) -> Sequence[str]:
        from tern.toolchain import tansu_binary

        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.host}:{self.advertised_port}"
        return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised]

    def start(self, timeout: float = 15.0) -> "Tansu":
        """Start Tansu and wait until it answers Kafka metadata requests."""
        self._spawn()
        try:
            wait_for_port(self.host, self.port, timeout, self.process)
            if self.advertised_port == self.port:  # else only the front end can answer clients
                asyncio.run(_wait_kafka_ready(self.bootstrap, timeout))
        except Exception as exc:  # ServiceError, or whatever aiokafka raised while probing
            self.stop()
            raise ServiceError(f"tansu on {self.bootstrap}: {exc}\n{self.log_tail()}") from None
        return self

    def close(self) -> None:
        """Stop Tansu (the name every harness Kafka shares, see tern.harness.kafka)."""
        self.stop()


async def _wait_kafka_ready(bootstrap: str, timeout: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as exc:  # aiokafka raises several kinds while a broker boots
            last = exc
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
    raise ServiceError(f"Kafka at {bootstrap} not ready after {timeout:.0f} s: {last!r}")


async def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int = 3, timeout: float = 15.0,
                        replication: int | None = None, min_insync: int | None = None) -> None:
    """Create Kafka topics that do not exist yet, with ``replication`` copies and, if given,
    ``min.insync.replicas``; raises ServiceError if the broker refuses one.

    ``replication`` None: one copy per broker, at most 3 (Tansu: 1; a 3-node cluster: 3, so
    its min.insync.replicas of 2 can be met).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    configs = {"min.insync.replicas": str(min_insync)} if min_insync else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        if replication is None:
            replication = max(1, min(3, len((await admin.describe_cluster())["brokers"])))
        missing = [NewTopic(t, num_partitions=partitions, replication_factor=replication, topic_configs=configs)
                   for t in topics if t not in existing]
        if missing:
            response = await admin.create_topics(missing)
            for entry in response.topic_errors:
                code = entry[1]
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise ServiceError(f"cannot create Kafka topic {entry[0]!r}: {for_code(code).__name__} {entry[2:]}")
    finally:
        await admin.close()


def kafka_bootstrap_from_env() -> str | None:
    """The external Kafka given by ``KAFKA_BOOTSTRAP``, or None to start Tansu."""
    value = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if value:
        parse_hostport(value)
    return value or None

"""A real Apache Kafka cluster (KRaft, combined broker+controller nodes) on loopback.

Each node is its own JVM, so a test can SIGKILL one broker and restart it. The nodes run the
jars ``make setup`` fetched with Maven (``tern.toolchain.kafka_libs``) with the shared settings
of ``deploy/kafka/broker.properties`` plus their own id, listeners, quorum voters and data
folder. The quorum is static (``controller.quorum.voters``): every node's storage is formatted
with one cluster id before the first start.

Start-up on 2 shared cores, measured: ~3 s formatting (three JVMs at once), ~6-10 s until all
brokers are registered and an RF 3 topic is writable. C1-only JIT (``-XX:TieredStopAtLevel=1``)
more than halves the start (15 s -> 6 s for three nodes), at a throughput cost that tests do not
feel; ``fast_start=False`` gives the full JIT for benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Sequence

from tern.harness.kafka_config import broker_settings, log4j_config_path
from tern.harness.stack import LOOPBACK, ManagedProcess, ServiceError, free_port, wait_for_port

#: A topic the readiness check creates with replication factor 3, then deletes.
READY_TOPIC = "tern.harness.ready"


def random_cluster_id() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes them (URL-safe base64 of 16 bytes).

    Like Kafka's own, never one starting with '-' (it would read as an option).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class KafkaNode(ManagedProcess):
    """One combined broker+controller JVM; its log is ``<workdir>/kafka-<id>.log``."""

    def __init__(self, workdir: Path, node_id: int, broker_port: int, controller_port: int,
                 heap_mb: int, fast_start: bool, sasl_port: int | None = None) -> None:
        self.name = f"kafka-{node_id}"
        super().__init__(workdir)
        self.node_id = node_id
        self.broker_port = broker_port
        self.controller_port = controller_port
        #: Port of the SASL_SSL listener (SCRAM-SHA-512 over TLS), when the cluster has one.
        self.sasl_port = sasl_port
        self.heap_mb = heap_mb
        self.fast_start = fast_start
        self.properties_path = self.workdir / f"node-{node_id}.properties"
        self.data_dir = self.workdir / f"data-{node_id}"

    @property
    def address(self) -> str:
        """``host:port`` of this node's broker listener."""
        return f"{LOOPBACK}:{self.broker_port}"

    @property
    def sasl_address(self) -> str | None:
        """``host:port`` of this node's SASL_SSL listener, or None without one."""
        return f"{LOOPBACK}:{self.sasl_port}" if self.sasl_port else None

    def java_command(self, main_class: str, *args: str) -> list[str]:
        """A ``java`` command line running ``main_class`` from Kafka's jars with lean JVM options."""
        from tern.toolchain import java_binary, kafka_libs

        options = [f"-Xmx{self.heap_mb}m", "-Xss512k", "-XX:+UseSerialGC", "-XX:-UsePerfData",
                   "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j_config_path()}"]
        if self.fast_start:
            options.append("-XX:TieredStopAtLevel=1")
        return [str(java_binary()), *options, "-cp", f"{kafka_libs()}/*", main_class, *args]

    def command(self) -> Sequence[str]:
        return self.java_command("kafka.Kafka", str(self.properties_path))

    def start(self, timeout: float = 60.0) -> "KafkaNode":
        """Start the JVM and wait until its broker port accepts connections."""
        self._spawn()
        try:
            wait_for_port(LOOPBACK, self.broker_port, timeout, self.process)
        except ServiceError as exc:
            self.kill()
            raise ServiceError(f"Kafka node {self.node_id} on {self.address}: {exc}\n{self.log_tail()}") from None
        return self


class ApacheKafkaCluster:
    """``nodes`` Apache Kafka nodes on loopback ports, formatted, started and checked ready.

    ``with ApacheKafkaCluster(workdir) as kafka: kafka.bootstrap`` ... ; per node (ids 1..nodes):
    :meth:`kill` (SIGKILL), :meth:`stop` (graceful), :meth:`restart`; :meth:`leader_of` a partition.
    Every wait is bounded; a failure raises ServiceError with the failing node's log tail.

    ``scram_users`` (name -> password) gives every node a second client listener, SASL_SSL
    with SCRAM-SHA-512 (:attr:`sasl_bootstrap`), its certificate issued by a CA made here with
    :mod:`tern.security.pki` (:attr:`ca_file`), and creates those users when the storage is
    formatted (``StorageTool format --add-scram``). The PLAINTEXT listener stays as it is (the
    brokers talk to each other over it), so one cluster serves both kinds of test.
    """

    kind = "apache"

    def __init__(self, workdir: Path, nodes: int = 3, heap_mb: int = 512, *, fast_start: bool = True,
                 overrides: dict[str, str] | None = None, start_timeout: float = 90.0,
                 scram_users: dict[str, str] | None = None) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError(f"nodes must be 1-9, got {nodes}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.cluster_id = random_cluster_id()
        #: Extra broker settings over deploy/kafka/broker.properties (e.g. shorter timeouts).
        self.overrides = dict(overrides or {})
        #: SCRAM-SHA-512 users (name -> password) of the SASL_SSL listener; empty: no such listener.
        self.scram_users = dict(scram_users or {})
        for name, password in self.scram_users.items():
            if not name or any(c in name + password for c in ",=[]'\""):
                raise ValueError(f"SCRAM user {name!r}: names and passwords may not hold , = [ ] or quotes")
        self.nodes: dict[int, KafkaNode] = {
            n: KafkaNode(self.workdir, n, free_port(), free_port(), heap_mb, fast_start,
                         free_port() if self.scram_users else None)
            for n in range(1, nodes + 1)
        }
        #: Seconds the last :meth:`start` took (formatting included), for reports.
        self.start_seconds = 0.0

    # --- addresses and settings ---------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """Every broker, ``host:port,...``: clients find the cluster through any live one."""
        return ",".join(node.address for node in self.nodes.values())

    @property
    def sasl_bootstrap(self) -> str:
        """Every broker's SASL_SSL listener, ``host:port,...`` (ValueError without ``scram_users``)."""
        if not self.scram_users:
            raise ValueError("this cluster has no SASL_SSL listener (give scram_users)")
        return ",".join(str(node.sasl_address) for node in self.nodes.values())

    @property
    def tls_dir(self) -> Path:
        """Where the SASL_SSL listener's CA and server certificate are (``ca.crt``, ``kafka.pem``)."""
        return self.workdir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA that issued the SASL_SSL listener's certificate: what clients trust."""
        return self.tls_dir / "ca.crt"

    @property
    def replication_factor(self) -> int:
        """The replication factor Tern's topics get here: 3, or fewer on a smaller cluster."""
        return min(3, len(self.nodes))

    @property
    def min_insync_replicas(self) -> int:
        """min.insync.replicas of Tern's topics: 2 with three copies (one broker may be down)."""
        return min(2, self.replication_factor)

    def node_properties(self, node: KafkaNode) -> dict[str, str]:
        """The full settings of ``node``: the shared file, its own topology, then the overrides."""
        settings = broker_settings()
        voters = ",".join(f"{n.node_id}@{LOOPBACK}:{n.controller_port}" for n in self.nodes.values())
        listeners = f"PLAINTEXT://{LOOPBACK}:{node.broker_port},CONTROLLER://{LOOPBACK}:{node.controller_port}"
        advertised = f"PLAINTEXT://{LOOPBACK}:{node.broker_port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if node.sasl_port:
            listeners += f",SASL_SSL://{LOOPBACK}:{node.sasl_port}"
            advertised += f",SASL_SSL://{LOOPBACK}:{node.sasl_port}"
            protocols += ",SASL_SSL:SASL_SSL"
        settings.update({
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": listeners,
            "advertised.listeners": advertised,
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": str(node.data_dir),
            # The shared file's RF 3 cannot be met by a smaller test cluster.
            "default.replication.factor": str(self.replication_factor),
            "offsets.topic.replication.factor": str(self.replication_factor),
            "transaction.state.log.replication.factor": str(self.replication_factor),
            "min.insync.replicas": str(self.min_insync_replicas),
            "transaction.state.log.min.isr": str(self.min_insync_replicas),
            # Two shared cores: Kafka's defaults (3 network, 8 I/O threads per node) only contend.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        })
        if node.sasl_port:
            settings.update({
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                # One PEM file holding the (unencrypted PKCS#8) key and the certificate.
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
                "listener.name.sasl_ssl.ssl.keystore.location": str(self.tls_dir / "kafka.pem"),
            })
        settings.update(self.overrides)
        return settings

    # --- whole cluster ------------------------------------------------------------------

    def start(self) -> "ApacheKafkaCluster":
        """Format every node's storage, start all nodes and wait until the cluster is ready."""
        started = time.monotonic()
        deadline = started + self.start_timeout
        if self.scram_users:
            self._write_tls()
        for node in self.nodes.values():
            text = "".join(f"{k}={v}\n" for k, v in self.node_properties(node).items())
            node.properties_path.write_text(text)
        try:
            self._format(deadline)
            for node in self.nodes.values():
                node._spawn()
            for node in self.nodes.values():
                try:
                    wait_for_port(LOOPBACK, node.broker_port, max(1.0, deadline - time.monotonic()), node.process)
                except ServiceError as exc:
                    raise ServiceError(f"Kafka node {node.node_id}: {exc}\n{node.log_tail()}") from None
            self._wait_ready(deadline)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _write_tls(self) -> None:
        """A CA and a server certificate for the SASL_SSL listener (loopback), made here."""
        from tern.security import pki

        ca = pki.make_ca("Tern test Kafka CA")
        ca.write(self.tls_dir, "ca")
        server = pki.issue_server(ca, [LOOPBACK, "localhost"])
        (self.tls_dir / "kafka.pem").write_bytes(server.key_pem + server.cert_pem)
        (self.tls_dir / "kafka.pem").chmod(0o600)

    def _format(self, deadline: float) -> None:
        """``kafka-storage format`` every node at once (each is a JVM start of ~2 s)."""
        jobs = []
        for node in self.nodes.values():
            log = open(self.workdir / f"format-{node.node_id}.log", "wb")
            scram = [arg for name, password in self.scram_users.items()
                     for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")]
            command = node.java_command("kafka.tools.StorageTool", "format", "-t", self.cluster_id,
                                        "-c", str(node.properties_path), *scram)
            jobs.append((node, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, cwd=self.workdir)))
        failed = []
        for node, log, process in jobs:
            try:
                code = process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(10)
            log.close()
            if code != 0:
                failed.append((node, code))
        if failed:
            node, code = failed[0]
            tail = (self.workdir / f"format-{node.node_id}.log").read_text(errors="replace").splitlines()[-10:]
            raise ServiceError(f"formatting Kafka node {node.node_id}'s storage failed (exit {code}):\n" + "\n".join(tail))

    def _wait_ready(self, deadline: float, node_ids: Sequence[int] | None = None) -> None:
        """Until the metadata lists every broker (or ``node_ids``) and an RF-N topic takes a write."""
        wanted = set(node_ids or self.nodes)
        try:
            asyncio.run(_wait_cluster(self.bootstrap, wanted, self.replication_factor, deadline))
        except ServiceError as exc:
            tails = "\n".join(f"--- kafka-{n.node_id}.log\n{n.log_tail(8)}" for n in self.nodes.values())
            raise ServiceError(f"Apache Kafka cluster at {self.bootstrap} not ready: {exc}\n{tails}") from None

    def close(self, timeout: float = 15.0) -> None:
        """Stop every node: SIGTERM to all at once, SIGKILL to any still alive after ``timeout``."""
        running = [n for n in self.nodes.values() if n.running]
        for node in running:
            assert node.process is not None
            node.process.terminate()
        deadline = time.monotonic() + timeout
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # The last brokers of a cluster without a controller quorum wait for one.
                os.kill(node.process.pid, signal.SIGKILL)
                node.process.wait(10)
        for node in self.nodes.values():
            node._close_log()

    def __enter__(self) -> "ApacheKafkaCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- one node -----------------------------------------------------------------------

    def node(self, node_id: int) -> KafkaNode:
        """The node with id ``node_id`` (1-based); KeyError names the ids there are."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"no Kafka node {node_id} (nodes are {sorted(self.nodes)})") from None

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: a crash, no controlled shutdown."""
        self.node(node_id).kill()

    def stop(self, node_id: int, timeout: float = 30.0) -> None:
        """Stop one node gracefully (controlled shutdown moves its leaderships away first)."""
        self.node(node_id).stop(timeout)

    def restart(self, node_id: int, timeout: float = 60.0) -> None:
        """Start a stopped or killed node again (same ports, same data) and wait until it is back
        in the cluster's metadata. A running node is stopped first."""
        node = self.node(node_id)
        if node.running:
            node.stop()
        node.start(timeout)
        deadline = time.monotonic() + timeout
        try:
            asyncio.run(_wait_brokers(self.bootstrap, {node_id}, deadline))
        except ServiceError as exc:
            raise ServiceError(f"Kafka node {node_id} did not rejoin: {exc}\n{node.log_tail()}") from None

    def leader_of(self, topic: str, partition: int, timeout: float = 15.0) -> int | None:
        """The node id leading ``topic``'s ``partition`` (None: no leader right now)."""
        return asyncio.run(_leader_of(self.bootstrap, topic, partition, timeout))

    def partitions(self, topic: str, timeout: float = 15.0) -> list[dict]:
        """``topic``'s partitions as the metadata has them (``partition``, ``leader``, ``isr``, ...).

        Asked again (bounded) while the client happens to pick a broker that is down.
        """
        return asyncio.run(_partitions(self.bootstrap, topic, timeout))

    def wait_out_of_isr(self, node_id: int, topic: str, timeout: float = 60.0) -> None:
        """Wait until ``node_id`` is in no in-sync replica set of ``topic`` (after a kill the
        controller fences it once ``broker.session.timeout.ms``, 9 s, has passed)."""
        deadline = time.monotonic() + timeout
        last: list[dict] = []
        while time.monotonic() < deadline:
            last = self.partitions(topic, max(1.0, deadline - time.monotonic()))
            if last and all(node_id not in p["isr"] and p["leader"] != node_id for p in last):
                return
            time.sleep(0.3)
        raise ServiceError(f"node {node_id} still in {topic}'s ISR after {timeout:.0f} s: {last}")

    def running_nodes(self) -> list[int]:
        """Ids of the nodes whose JVM is alive."""
        return [n for n, node in self.nodes.items() if node.running]


# --- admin-client probes (each bounded by its deadline) ---------------------------------------


async def _admin(bootstrap: str, timeout_ms: int = 5000):
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await asyncio.wait_for(admin.start(), timeout_ms / 1000 + 1)
    return admin


async def _wait_brokers(bootstrap: str, wanted: set[int], deadline: float) -> None:
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            admin = await _admin(bootstrap)
        except Exception as exc:  # brokers still booting refuse or drop connections
            last = repr(exc)
            await asyncio.sleep(0.3)
            continue
        try:
            cluster = await asyncio.wait_for(admin.describe_cluster(), 10)
            seen = {b["node_id"] for b in cluster["brokers"]}
            if wanted <= seen:
                return
            last = f"brokers {sorted(seen)} registered, waiting for {sorted(wanted - seen)}"
        except Exception as exc:
            last = repr(exc)
        finally:
            await admin.close()
        await asyncio.sleep(0.3)
    raise ServiceError(last)


async def _wait_cluster(bootstrap: str, wanted: set[int], replication: int, deadline: float) -> None:
    """All ``wanted`` brokers registered, then an RF ``replication`` topic created, led and written."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    await _wait_brokers(bootstrap, wanted, deadline)
    last = "topic not created yet"
    while time.monotonic() < deadline:
        admin = None
        try:
            admin = await _admin(bootstrap)
            response = await admin.create_topics([NewTopic(READY_TOPIC, 1, replication)])
            for entry in response.topic_errors:
                code, message = entry[1], entry[2] if len(entry) > 2 else ""
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise for_code(code)(message)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000)
            await asyncio.wait_for(producer.start(), 10)
            try:
                await asyncio.wait_for(producer.send_and_wait(READY_TOPIC, b"ready"), 10)
            finally:
                await producer.stop()
            await admin.delete_topics([READY_TOPIC])
            return
        except Exception as exc:  # leaders not elected yet, controller moving, ...
            last = repr(exc)
        finally:
            if admin is not None:
                await admin.close()
        await asyncio.sleep(0.3)
    raise ServiceError(f"no RF {replication} topic could be written: {last}")


async def _partitions(bootstrap: str, topic: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = None
        try:
            admin = await _admin(bootstrap, 3000)
            (described,) = await asyncio.wait_for(admin.describe_topics([topic]), 5)
            return sorted(described["partitions"], key=lambda p: p["partition"])
        except Exception as exc:  # the client tried a broker that is down: ask again
            last = exc
        finally:
            if admin is not None:
                await admin.close()
        await asyncio.sleep(0.2)
    raise ServiceError(f"no metadata for topic {topic!r} within {timeout:.0f} s: {last!r}")


async def _leader_of(bootstrap: str, topic: str, partition: int, timeout: float) -> int | None:
    for entry in await _partitions(bootstrap, topic, timeout):
        if entry["partition"] == partition:
            return entry["leader"] if entry["leader"] >= 0 else None
    raise ServiceError(f"topic {topic!r} has no partition {partition}")

"""The bridge's Kafka TLS and SASL settings, tried against a real Kafka-protocol broker.

Tansu (our test broker) has no usable TLS listener in the build we install, so TLS is
terminated in front of it by tests/tlsproxy.py, with Tansu advertising the terminator's port.
SASL: Tansu's memory storage cannot hold SCRAM users, so the SASL tests run on the session's
Apache Kafka cluster (tests/conftest.py ``apache_kafka``): its SASL_SSL listener, SCRAM-SHA-512,
the user made when the storage was formatted.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import read_all
from tern.core.errors import ConfigError
from tern.edge.service import Gateway
from tern.harness.kafka_cluster import ApacheKafkaCluster
from tern.harness.observe import wait_until as poll_until
from tern.harness.stack import Tansu, ensure_topics
from conftest import APACHE_KAFKA_SCRAM_USER
from helpers.apache import apache_bridge_config as bridge_config, fresh_names
from helpers import wait_until
from helpers.pipeline import by_device, feed, pipeline_gateway_config as gateway_config
from tern.security import pki
from tern.cloud.kafka_security import KafkaSecurity
from tlsproxy import TlsTerminator


def test_settings_are_validated_with_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected one of PLAINTEXT, SSL"):
        KafkaSecurity(protocol="TLS")
    with pytest.raises(ConfigError, match="SASL mechanism"):
        KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password="p")
    with pytest.raises(ConfigError, match="username and a password"):
        KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u")
    with pytest.raises(ConfigError, match="security protocol is PLAINTEXT"):
        KafkaSecurity(sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p")
    with pytest.raises(ConfigError, match="no such file"):
        KafkaSecurity(protocol="SSL", ca_file=str(tmp_path / "missing.crt")).aiokafka_options()
    secret = tmp_path / "kafka.pw"
    secret.write_text("pw-from-file-123\n")
    secret.chmod(0o600)
    sec = KafkaSecurity.from_env({"TERN_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
                                  "TERN_KAFKA_SASL_MECHANISM": "scram-sha-512",
                                  "TERN_KAFKA_SASL_USERNAME": "bridge",
                                  "TERN_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    options = sec.aiokafka_options()
    assert options["sasl_plain_password"] == "pw-from-file-123"
    assert options["security_protocol"] == "SASL_SSL" and isinstance(options["ssl_context"], ssl.SSLContext)
    assert "pw-from-file-123" not in sec.describe() + repr(sec)


@pytest.fixture()
def tls_kafka(tmp_path: Path):
    """Tansu behind a mutual-TLS terminator; yields (bootstrap, certificate folder)."""
    certs = tmp_path / "certs"
    ca = pki.make_ca()
    ca.write(certs, "ca")
    pki.issue_server(ca, ["127.0.0.1"]).write(certs, "kafka")
    pki.issue_client(ca, "bridge").write(certs, "bridge")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
    server.load_cert_chain(str(certs / "kafka.crt"), str(certs / "kafka.key"))
    server.verify_mode = ssl.CERT_REQUIRED
    tansu = Tansu(tmp_path / "tansu")
    front = TlsTerminator(tansu.port, server)
    tansu.advertised_port = front.port
    front.start()
    tansu.start()
    try:
        yield f"127.0.0.1:{front.port}", certs
    finally:
        tansu.stop()
        front.stop()


async def _roundtrip(bootstrap: str, security: KafkaSecurity, topic: str) -> list[bytes]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=10000,
                                **security.aiokafka_options())
    await asyncio.wait_for(producer.start(), 30)
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"over-tls-{i}".encode(), key=b"node-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                request_timeout_ms=10000, **security.aiokafka_options())
    await asyncio.wait_for(consumer.start(), 30)
    try:
        batch = await consumer.getmany(timeout_ms=15000, max_records=10)
        return [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()


def test_records_travel_over_mutual_tls(tls_kafka) -> None:
    bootstrap, certs = tls_kafka
    security = KafkaSecurity(protocol="SSL", ca_file=str(certs / "ca.crt"),
                             cert_file=str(certs / "bridge.crt"), key_file=str(certs / "bridge.key"))
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    assert asyncio.run(_roundtrip(bootstrap, security, topic)) == [b"over-tls-0", b"over-tls-1", b"over-tls-2"]


def test_no_client_certificate_no_connection(tls_kafka) -> None:
    bootstrap, certs = tls_kafka

    async def attempt() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                    **KafkaSecurity(protocol="SSL", ca_file=str(certs / "ca.crt")).aiokafka_options())
        try:
            await asyncio.wait_for(producer.start(), 20)
            await asyncio.wait_for(producer.send_and_wait("x", b"should-not-land"), 10)
        finally:
            await producer.stop()

    with pytest.raises(Exception):
        asyncio.run(attempt())


#: The SASL tests run on the session's Apache Kafka cluster (its SASL_SSL listener): they share
#: its xdist worker with the other Apache Kafka tests (the rest of this module runs anywhere).
APACHE = (pytest.mark.apache_kafka, pytest.mark.xdist_group("apache_kafka"))


def apache_marks(test):
    """Mark ``test`` as an Apache Kafka test (one worker, one cluster)."""
    for mark in APACHE:
        test = mark(test)
    return test


def sasl_security(cluster: ApacheKafkaCluster, password: str | None = None) -> KafkaSecurity:
    """SCRAM-SHA-512 over TLS as the cluster's user (with ``password``, a wrong one)."""
    return KafkaSecurity(protocol="SASL_SSL", ca_file=str(cluster.ca_file), sasl_mechanism="SCRAM-SHA-512",
                         sasl_username=APACHE_KAFKA_SCRAM_USER,
                         sasl_password=password or cluster.scram_users[APACHE_KAFKA_SCRAM_USER])


@apache_marks
def test_sasl_scram_sha512_over_tls_on_apache_kafka_and_the_bridge_writes(
        tmp_path: Path, mosquitto_factory, apache_kafka: ApacheKafkaCluster) -> None:
    security = sasl_security(apache_kafka)
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(apache_kafka.bootstrap, [topic], replication=3, min_insync=2))
    assert len(asyncio.run(_roundtrip(apache_kafka.sasl_bootstrap, security, topic))) == 3
    # The bridge over SASL_SSL only: it creates its topics, writes, and the gateway's outbox drains.
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    names = fresh_names("sasl")
    devices = ["sasl-1", "sasl-2"]
    gateway = Gateway(gateway_config(tmp_path, pi, cloud))
    bridge = BridgeThread(bridge_config(cloud.address, apache_kafka.sasl_bootstrap, names, kafka_security=security,
                                        enable_idempotence=True))
    with gateway, bridge:
        assert gateway.wait_connected(30)
        feed(gateway, devices, 50)
        wait_until(lambda: gateway.outbox.pending() == 0, 60, "the outbox drained over SASL_SSL")
    # Read back over the PLAINTEXT listener: the records are really in the cluster.
    records = read_all(apache_kafka.bootstrap, names["readings"], timeout_s=30, expect=100)
    assert by_device(records) == {d: list(range(50)) for d in devices}
    assert bridge.bridge.stats()["kafka_auth_failures"] == 0


def failed_authentications(cluster: ApacheKafkaCluster) -> int:
    """"The "Failed authentication" lines in the brokers' logs: one per refused connection."""
    return sum((cluster.workdir / f"kafka-{n}.log").read_text(errors="replace").count("Failed authentication with")
               for n in cluster.nodes)


@apache_marks
def test_wrong_sasl_password_is_one_line_per_attempt_with_back_off_and_nothing_confirmed(
        tmp_path: Path, mosquitto_factory, apache_kafka: ApacheKafkaCluster) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    names = fresh_names("saslbad")
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "bridge.log"
    before = failed_authentications(apache_kafka)
    gateway = Gateway(gateway_config(tmp_path, pi, cloud))
    with open(log_path, "wb") as log, gateway:
        assert gateway.wait_connected(30)
        feed(gateway, ["bad-1"], 20)
        bridge = subprocess.Popen(
            [sys.executable, "-m", "tern.cloud", "run", "--mqtt", cloud.address, "--kafka", apache_kafka.sasl_bootstrap,
             "--topic", names["readings"], "--status-topic", names["status"], "--deadletter", names["deadletter"],
             "--name", f"bad{uuid.uuid4().hex[:6]}", "--no-commands", "--stats-every", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ, TERN_KAFKA_SECURITY_PROTOCOL="SASL_SSL", TERN_KAFKA_CA=str(apache_kafka.ca_file),
                     TERN_KAFKA_SASL_MECHANISM="SCRAM-SHA-512", TERN_KAFKA_SASL_USERNAME=APACHE_KAFKA_SCRAM_USER,
                     TERN_KAFKA_SASL_PASSWORD=wrong))
        text = lambda: log_path.read_text(errors="replace")  # noqa: E731
        seen: list[float] = []  # when each refusal line appeared (polled every 50 ms)

        def refusals_so_far() -> int:
            count = text().count("refused the bridge's credentials")
            seen.extend([time.monotonic()] * (count - len(seen)))
            return count

        try:
            # Back-off 1, 2, 4 s: the fourth attempt comes ~7 s after the first (a tight loop
            # would make four in well under a second).
            assert poll_until(lambda: refusals_so_far() >= 4 or bridge.poll() is not None, 40, interval=0.05), text()
            spread = seen[3] - seen[0]
            assert bridge.poll() is None, text()[-3000:]
            assert gateway.outbox.pending() == 20 and gateway.stats()["batches_confirmed"] == 0
        finally:
            bridge.terminate()
            try:
                bridge.wait(20)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait(10)
    log_text = text()
    lines = log_text.strip().splitlines()
    refusals = [line for line in lines if "refused the bridge's credentials" in line]
    attempts = failed_authentications(apache_kafka) - before
    print(f"\nwrong SASL password: {len(refusals)} log lines, {attempts} refused connections at the brokers, "
          f"attempts 1-4 spread over {spread:.1f} s; first: {refusals[0]}")
    # One line per attempt, saying what is wrong and what to check; nothing else said.
    assert all("SaslAuthenticationFailed" in line and "TERN_KAFKA_SASL_PASSWORD" in line and "retrying in" in line
               for line in refusals), refusals
    assert [line for line in lines if line not in refusals and "stopped:" not in line] == [], lines
    # Backed off, not a tight loop: 1 + 2 + 4 s between the first four attempts, and one
    # connection each at the brokers (aiokafka's own bootstrap never tries the bad password).
    assert spread >= 6.0, spread
    assert 4 <= len(refusals) <= 5, refusals
    assert attempts <= len(refusals) + 1, (attempts, len(refusals))
    assert wrong not in log_text
    assert "Traceback" not in log_text and "Future exception was never retrieved" not in log_text

"""The bridge's Kafka TLS and SASL settings, tried against a real Kafka-protocol broker.

Tansu (our test broker) has no usable TLS listener in the build we install, so TLS is
terminated in front of it by tests/tlsproxy.py, with Tansu advertising the terminator's port.
SASL: Tansu's memory storage cannot hold SCRAM users (they are created through the broker, which
refuses unauthenticated clients once authentication is on), so a SASL success needs a real Kafka:
set TERN_TEST_KAFKA_SASL_BOOTSTRAP, _MECHANISM, _USERNAME, _PASSWORD to run that test.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tern.core.errors import ConfigError
from tern.harness.stack import Tansu
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


@pytest.mark.skipif(not os.environ.get("TERN_TEST_KAFKA_SASL_BOOTSTRAP"),
                    reason="SASL needs a Kafka with SCRAM/PLAIN users (Tansu's memory storage cannot keep "
                           "them): set TERN_TEST_KAFKA_SASL_BOOTSTRAP, _MECHANISM, _USERNAME, _PASSWORD")
def test_sasl_against_a_real_kafka() -> None:
    env = os.environ
    security = KafkaSecurity(protocol=env.get("TERN_TEST_KAFKA_SASL_PROTOCOL", "SASL_PLAINTEXT"),
                             ca_file=env.get("TERN_TEST_KAFKA_SASL_CA"),
                             sasl_mechanism=env["TERN_TEST_KAFKA_SASL_MECHANISM"],
                             sasl_username=env["TERN_TEST_KAFKA_SASL_USERNAME"],
                             sasl_password=env["TERN_TEST_KAFKA_SASL_PASSWORD"])
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    assert len(asyncio.run(_roundtrip(env["TERN_TEST_KAFKA_SASL_BOOTSTRAP"], security, topic))) == 3

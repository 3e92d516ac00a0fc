"""Shared fixtures: real brokers on loopback, started per test (mosquitto) or per session (Kafka).

With ``KAFKA_BOOTSTRAP`` set, the Kafka fixtures use that cluster instead of starting Tansu;
every test then writes to topics whose names are unique to the run, so runs never mix.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tern.harness.stack import Mosquitto, Tansu, ensure_topics, kafka_bootstrap_from_env


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist registers this mark when it is installed; without it the mark must still be known.
    config.addinivalue_line("markers", "xdist_group(name): keep these tests on one xdist worker (--dist loadgroup)")


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start as many private mosquittos as a test needs; all are stopped afterwards."""
    started: list[Mosquitto] = []

    def start(name: str = "mosquitto", **options) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"{name}-{len(started)}", **options).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """One private mosquitto on a free loopback port."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a Kafka-protocol broker: ``KAFKA_BOOTSTRAP`` or a private Tansu."""
    external = kafka_bootstrap_from_env()
    if external:
        yield external
        return
    broker = Tansu(tmp_path_factory.mktemp("tansu")).start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kafka_topics(kafka_bootstrap: str) -> dict[str, str]:
    """Fresh Kafka topic names for one test (readings, status, deadletter), already created."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "readings": f"test.readings.{suffix}",
        "status": f"test.status.{suffix}",
        "deadletter": f"test.deadletter.{suffix}",
    }
    asyncio.run(ensure_topics(kafka_bootstrap, list(names.values())))
    return names

"""The bridge's allow-list: batches from gateways it does not serve are dead-lettered with a reason."""

from __future__ import annotations

import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.config import BridgeConfig
from tern.cloud.consume import read_all
from tern.core.errors import ConfigError

from helpers import bridge_config, make_batch


def test_unlisted_gateway_is_deadlettered_listed_one_lands(mosquitto, kafka_bootstrap, kafka_topics, gateway_factory):
    config = bridge_config(mosquitto, kafka_bootstrap, kafka_topics, allowed_gateways="gw-ok, gw-also", connect_timeout_s=10)
    assert config.allowed_gateways == ("gw-ok", "gw-also")
    with BridgeThread(config) as bridge:
        intruder = gateway_factory(mosquitto, "gw-intruder")
        intruder.publish(make_batch("gw-intruder", 1, ["dev-i"], per_device=2, first_seq=1))
        allowed = gateway_factory(mosquitto, "gw-ok")
        allowed.publish(make_batch("gw-ok", 1, ["dev-a"], per_device=3, first_seq=1))
        allowed.wait_confirms([1], timeout=20)
        intruder.assert_no_confirm(1, within=2)
        stats = bridge.stats()
    dead = read_all(kafka_bootstrap, kafka_topics["deadletter"], timeout_s=10, expect=1)
    assert len(dead) == 1 and b"gateway not allowed" in dead[0].headers["error"]
    assert dead[0].headers["source_topic"] == b"tern-gw/gw-intruder/batch"
    readings = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=10, expect=3)
    assert sorted((r.value["device"], r.value["seq"]) for r in readings) == [("dev-a", 1), ("dev-a", 2), ("dev-a", 3)]
    assert stats["deadlettered"] == 1


def test_allow_list_from_the_environment_is_validated() -> None:
    assert BridgeConfig.from_env({"TERN_BRIDGE_ALLOWED_GATEWAYS": "a1,b2"}).allowed_gateways == ("a1", "b2")
    with pytest.raises(ConfigError, match="allowed_gateways"):
        BridgeConfig.from_env({"TERN_BRIDGE_ALLOWED_GATEWAYS": "ok,+/#"})

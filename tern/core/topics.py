"""MQTT topic names and Kafka topic defaults: the one place that spells them.

Node side (the Pi's local broker), one set of topics per device::

    tern/<site>/<device>/telemetry   node -> gateway, QoS 1, one reading per message
    tern/<site>/<device>/status      retained; birth ("online") and last will ("offline")
    tern/<site>/<device>/ack         gateway -> node, QoS 1: readings up to seq are in the outbox
    tern/<site>/<device>/cmd         gateway -> node, QoS 1: a command (see tern.core.commands)
    tern/<site>/<device>/reply       node -> gateway, QoS 1: the node's answer to a command
    tern/<site>/<device>/fw_get      node -> gateway, QoS 0: "<version> <file index> <offset>"
    tern/<site>/<device>/fw          gateway -> node, QoS 0: a binary release chunk (tern.core.ota_wire)

Gateway side (the cloud broker), one set of topics per gateway::

    tern-gw/<gateway>/batch          gateway -> bridge, QoS 1, a compressed batch envelope
    tern-gw/<gateway>/confirm        bridge -> gateway, QoS 1: batch bseq is in Kafka
    tern-gw/<gateway>/cmd            bridge -> gateway, QoS 1: a command for one of its nodes
    tern-gw/<gateway>/release        operator -> gateway, QoS 1: a firmware release bundle (ota_wire)
    tern-bridge/<bridge>/status      retained; the bridge's "online" and its last will ("offline")

N bridges split the batches with a shared subscription, ``$share/<group>/tern-gw/+/batch``
(:func:`shared_filter`): the broker hands each batch to one member of the group.

The firmware spells the node topics itself (it cannot import this module); the contract
tests check that it spells them the same way.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

from tern.core.errors import CodecError

ROOT = "tern"
GATEWAY_ROOT = "tern-gw"

TELEMETRY = "telemetry"
STATUS = "status"
ACK = "ack"
COMMAND = "cmd"
REPLY = "reply"
FW_GET = "fw_get"
FW = "fw"
NODE_KINDS = (TELEMETRY, STATUS, ACK, COMMAND, REPLY, FW_GET, FW)

TELEMETRY_FILTER = f"{ROOT}/+/+/{TELEMETRY}"
STATUS_FILTER = f"{ROOT}/+/+/{STATUS}"
REPLY_FILTER = f"{ROOT}/+/+/{REPLY}"
FW_GET_FILTER = f"{ROOT}/+/+/{FW_GET}"
BATCH_FILTER = f"{GATEWAY_ROOT}/+/batch"

KAFKA_READINGS = "tern.readings"
KAFKA_STATUS = "tern.status"
KAFKA_DEADLETTER = "tern.deadletter"
KAFKA_COMMANDS = "tern.commands"
KAFKA_COMMAND_RESULTS = "tern.command-results"

# Ids become MQTT topic levels, Kafka keys and ACL patterns: keep them to a safe alphabet
# so that no id can smuggle a wildcard, a level separator or a control character.
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class NodeTopic(NamedTuple):
    """A parsed per-device topic."""

    site: str
    device: str
    kind: str


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid site, device or gateway id, else raise CodecError."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise CodecError(f"invalid {what} {value!r}: want 1-64 of [A-Za-z0-9_.-], not starting with . _ or -")
    return value


def node_topic(site: str, device: str, kind: str) -> str:
    """Build ``tern/<site>/<device>/<kind>``."""
    if kind not in NODE_KINDS:
        raise CodecError(f"unknown node topic kind {kind!r}")
    return f"{ROOT}/{check_id(site, 'site')}/{check_id(device, 'device')}/{kind}"


def telemetry_topic(site: str, device: str) -> str:
    """Topic a node publishes its readings on."""
    return node_topic(site, device, TELEMETRY)


def status_topic(site: str, device: str) -> str:
    """Retained topic holding a node's birth message or last will."""
    return node_topic(site, device, STATUS)


def ack_topic(site: str, device: str) -> str:
    """Topic the gateway acknowledges a node's readings on."""
    return node_topic(site, device, ACK)


def command_topic(site: str, device: str) -> str:
    """Topic the gateway hands a node its commands on."""
    return node_topic(site, device, COMMAND)


def reply_topic(site: str, device: str) -> str:
    """Topic a node answers its commands on."""
    return node_topic(site, device, REPLY)


def fw_get_topic(site: str, device: str) -> str:
    """Topic a node asks for release chunks on."""
    return node_topic(site, device, FW_GET)


def fw_topic(site: str, device: str) -> str:
    """Topic the gateway answers a node's chunk requests on."""
    return node_topic(site, device, FW)


@lru_cache(maxsize=4096)
def parse_node_topic(topic: str) -> NodeTopic:
    """Split a per-device topic, raising CodecError for anything else.

    Cached (the gateway parses the same few topics for every message; an invalid topic
    raises and is never kept)."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != ROOT or parts[3] not in NODE_KINDS:
        raise CodecError(f"not a tern node topic: {topic!r}")
    return NodeTopic(check_id(parts[1], "site"), check_id(parts[2], "device"), parts[3])


def batch_topic(gateway: str) -> str:
    """Topic a gateway publishes its batch envelopes on (cloud broker)."""
    return f"{GATEWAY_ROOT}/{check_id(gateway, 'gateway')}/batch"


def confirm_topic(gateway: str) -> str:
    """Topic the bridge confirms a gateway's batches on, once Kafka holds them."""
    return f"{GATEWAY_ROOT}/{check_id(gateway, 'gateway')}/confirm"


def parse_batch_topic(topic: str) -> str:
    """Return the gateway id of a batch topic, raising CodecError for anything else."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != GATEWAY_ROOT or parts[2] != "batch":
        raise CodecError(f"not a tern batch topic: {topic!r}")
    return check_id(parts[1], "gateway")


def gateway_command_topic(gateway: str) -> str:
    """Topic the bridge hands a gateway the commands for its nodes on (cloud broker)."""
    return f"{GATEWAY_ROOT}/{check_id(gateway, 'gateway')}/cmd"


def gateway_release_topic(gateway: str) -> str:
    """Topic a firmware release bundle reaches a gateway on (cloud broker, its command session)."""
    return f"{GATEWAY_ROOT}/{check_id(gateway, 'gateway')}/release"


#: Each bridge's presence on the cloud broker: retained "online" while it runs, its last
#: will "offline" when it dies (gateways and operators may read it; see docs/contracts.md).
BRIDGE_ROOT = "tern-bridge"
BRIDGE_STATUS_FILTER = f"{BRIDGE_ROOT}/+/status"


def bridge_status_topic(bridge: str) -> str:
    """Retained status topic of bridge ``bridge`` (its configured name) on the cloud broker."""
    return f"{BRIDGE_ROOT}/{check_id(bridge, 'bridge name')}/status"


#: MQTT 5 / mosquitto shared subscriptions: ``$share/<group>/<filter>``.
SHARE_PREFIX = "$share"


def check_share_group(group: str) -> str:
    """Return ``group`` if it can name a shared subscription group, else raise CodecError."""
    if not isinstance(group, str) or not _ID.fullmatch(group):
        raise CodecError(f"invalid share group {group!r}: want 1-64 of [A-Za-z0-9_.-], not starting with . _ or -")
    return group


def shared_filter(group: str, topic_filter: str) -> str:
    """``$share/<group>/<topic_filter>``: members of ``group`` each get a share of the messages."""
    return f"{SHARE_PREFIX}/{check_share_group(group)}/{topic_filter}"

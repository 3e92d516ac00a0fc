"""Tern's cloud side: the MQTT→Kafka bridge and a small Kafka reader.

``tern.cloud.bridge`` subscribes to the gateways' batch topics on the cloud broker, writes every
reading to Kafka (key = device id) and only then acknowledges the MQTT message and confirms
the batch to its gateway. Nothing is acknowledged that Kafka does not hold.
"""

from tern.cloud.config import BridgeConfig

__all__ = ["BridgeConfig"]

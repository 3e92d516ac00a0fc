"""Tern: sensor readings from MicroPython nodes over MQTT to Kafka, without losing any.

This package holds what the edge gateway, the cloud bridge and the tools share: the wire
codec and topic names (one place), the toolchain locator and the local service runners.
"""

__version__ = "0.1.0"
